"""Tiny, random stand-ins of real multimodal checkpoints, for tests and the built-in example.

`build_tiny_family` saves one tiny base causal LM plus several multimodal LLMs of REAL
transformers classes (LLaVA, Video-LLaVA, LLaVA-NeXT-Video, Qwen2-Audio, Mistral3, Voxtral)
whose language models are that base plus small, source-specific perturbations. Everything is
written with ``save_pretrained``, so the checkpoints have the real key layouts
(``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*`` ...), the real
placeholder tokens added to the tokenizer, and LLaVA's vocabulary padding; optionally the
transformers-5 layout (``model.language_model.*``) and sharding. Merging these is meaningful:
the LM deltas are known, small and differ between sources.

Nothing is downloaded; configs are built from tiny sizes. Each source also gets the processor
config its real checkpoint ships (``preprocessor_config.json``), sized for the tiny encoders:
28 px images, and a 1 s audio window of 32 mel frames at 16 kHz.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

SOURCE_KINDS = ("llava", "video_llava", "llava_next_video", "qwen2_audio", "mistral3", "voxtral", "llava_next")
TEXT_FAMILIES = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
                 "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}
BASE_VOCAB = 96  # <unk> <s> </s> w0..w92
IMAGE_SIZE, PATCH_SIZE, NUM_MEL_BINS, AUDIO_RATE = 28, 14, 8, 16000


@dataclass
class TinyFamily:
    base: Path  # plain causal LM dir (config.json, model.safetensors, tokenizer files)
    sources: dict[str, Path]  # source kind -> dir of the saved MLLM
    vocab_size: int  # base vocabulary size V0 (rows of base embed_tokens)


def _clip(h):  # LLaVA's default vision_feature_layer=-2 needs >= 2 layers
    return T.CLIPVisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=h).to_dict()


def _pixtral(h):  # 56 px: 4x4 patches -> 2x2 merged tokens (1 merged token trips a squeeze in transformers)
    return dict(model_type="pixtral", hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                num_attention_heads=2, head_dim=h // 2, image_size=2 * IMAGE_SIZE, patch_size=PATCH_SIZE)


def _qwen2_audio(h):
    return dict(model_type="qwen2_audio_encoder", d_model=h, encoder_layers=1, encoder_attention_heads=2,
                encoder_ffn_dim=2 * h, num_mel_bins=NUM_MEL_BINS, max_source_positions=16)


def _voxtral_audio(h):  # the projector reads 4 stacked frames: intermediate_size = 4 * hidden
    return dict(model_type="voxtral_encoder", hidden_size=h, intermediate_size=4 * h, num_hidden_layers=1,
                num_attention_heads=2, head_dim=h // 2, num_mel_bins=NUM_MEL_BINS, max_source_positions=16)


def _clip_proc():
    size = IMAGE_SIZE
    return T.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


GRID = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def _llava_next_proc():  # anyres: a base view plus up to 2x2 tiles of 28 px
    size = IMAGE_SIZE
    return T.LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     image_grid_pinpoints=GRID)


def _whisper_proc():  # a 1 s window of 32 mel frames: what the tiny encoders' 16 positions take
    return T.WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=AUDIO_RATE, hop_length=AUDIO_RATE // 32,
                                     n_fft=2 * (AUDIO_RATE // 32), chunk_length=1)


# kind -> (model class, config class, encoder config key, encoder config builder,
#          added tokens (in id order), {config field: placeholder token}, pad token, vocab multiple, processor)
_KINDS = {
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig", "vision_config", _clip,
              ("<image>", "<pad>"), {"image_token_index": "<image>"}, "<pad>", 8, _clip_proc),
    "video_llava": ("VideoLlavaForConditionalGeneration", "VideoLlavaConfig", "vision_config", _clip,
                    ("<image>", "<video>"), {"image_token_index": "<image>", "video_token_index": "<video>"},
                    None, 1, _clip_proc),
    "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoConfig", "vision_config", _clip,
                         ("<image>", "<video>"), {"image_token_index": "<image>", "video_token_index": "<video>"},
                         None, 1, _clip_proc),
    "qwen2_audio": ("Qwen2AudioForConditionalGeneration", "Qwen2AudioConfig", "audio_config", _qwen2_audio,
                    ("<|AUDIO|>",), {"audio_token_index": "<|AUDIO|>"}, None, 1, _whisper_proc),
    "mistral3": ("Mistral3ForConditionalGeneration", "Mistral3Config", "vision_config", _pixtral,
                 ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), {"image_token_index": "[IMG]"}, None, 1,
                 lambda: T.PixtralImageProcessor(size={"longest_edge": 2 * IMAGE_SIZE}, patch_size=PATCH_SIZE)),
    "voxtral": ("VoxtralForConditionalGeneration", "VoxtralConfig", "audio_config", _voxtral_audio,
                ("[AUDIO]",), {"audio_token_id": "[AUDIO]"}, None, 1, _whisper_proc),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextConfig", "vision_config", _clip,
                   ("<image>",), {"image_token_index": "<image>"}, None, 1, _llava_next_proc),
}


def _tokenizer(added=(), pad=None) -> T.PreTrainedTokenizerFast:
    """Word-level base tokenizer; sources append their special tokens, as real checkpoints do."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(BASE_VOCAB - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if pad:
        tok.pad_token = pad
    return tok


def _text_config(family, vocab, hidden, layers, tie, **kw):
    return TEXT_FAMILIES[family][0](vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=hidden // 2, max_position_embeddings=64, tie_word_embeddings=tie,
                                    bos_token_id=1, eos_token_id=2, **kw)


def _scale(t: torch.Tensor) -> float:
    """Std of the tensor; RMS for constant ones (norm weights = 1); 0.02 for all-zero (fresh biases)."""
    std = t.std().item() if t.numel() > 1 else 0.0
    return std or t.pow(2).mean().sqrt().item() or 0.02


def _perturb(t: torch.Tensor, gen: torch.Generator, delta_scale: float) -> torch.Tensor:
    """t + delta_scale * scale(t) * randn, computed in float32, returned in t's dtype."""
    t32 = t.float()
    return (t32 + delta_scale * _scale(t32) * torch.randn(t32.shape, generator=gen)).to(t.dtype)


def _save_kwargs(shard_size):
    return {} if shard_size is None else {"max_shard_size": shard_size}


def _hf5_key(key: str) -> str:
    """Legacy -> transformers-5 key: language_model.model.X -> model.language_model.X, etc."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key.startswith("language_model."):  # language_model.lm_head.weight
        return key[len("language_model."):]
    return "model." + key


def _rewrite_checkpoint(d: Path, fn) -> None:
    """Apply fn to every tensor (key, tensor) -> (key, tensor) in every shard; keep the index in sync."""
    keymap = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            meta = fh.metadata()
        sd = load_file(f)
        new = dict(fn(k, sd[k]) for k in sorted(sd))
        keymap.update(zip(sorted(sd), new))
        save_file(new, f, metadata=meta)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        j = json.loads(idx.read_text())
        j["weight_map"] = {keymap[k]: v for k, v in j["weight_map"].items()}
        idx.write_text(json.dumps(j, indent=2, sort_keys=True) + "\n")


def _build_source(kind, k, base, d, *, text_family, seed, tie, dtype, delta_scale, num_layers, hidden_size,
                  shard_size):
    cls_name, cfg_name, enc_key, enc_fn, added, fields, pad, multiple, proc = _KINDS[kind]
    tok = _tokenizer(added, pad)
    vocab = math.ceil(len(tok) / multiple) * multiple  # LLaVA-1.5 pads 32002 -> 32064
    extra = {"pad_token_id": tok.pad_token_id} if pad else {}
    text = _text_config(text_family, vocab, hidden_size, num_layers, tie, **extra)
    ids = {field: tok.convert_tokens_to_ids(t) for field, t in fields.items()}
    try:
        extra_cfg = {"image_grid_pinpoints": GRID} if kind == "llava_next" else {}
        cfg = getattr(T, cfg_name)(text_config=text.to_dict(), **{enc_key: enc_fn(hidden_size)}, **ids,
                                   tie_word_embeddings=tie, **extra_cfg)
        torch.manual_seed(seed * 1000 + 500 + k)  # encoder/connector/new rows: the class's own init
        model = getattr(T, cls_name)(cfg)
    except Exception as e:  # noqa: BLE001 - report any refusal uniformly
        raise ValueError(f"transformers can't build {kind} with text_family={text_family!r}: {e}") from e
    out_emb, in_emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if tie and out_emb.data_ptr() != in_emb.data_ptr():  # e.g. Qwen2Audio, Voxtral: no _tied_weights_keys
        raise ValueError(f"transformers can't tie word embeddings for {kind} ({cls_name})")
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    b_sd, s_sd = base.get_decoder().state_dict(), model.get_decoder().state_dict()
    pairs = [(b_sd[n], s_sd[n]) for n in sorted(b_sd)]
    if not tie:
        pairs.append((base.get_output_embeddings().weight, out_emb))
    with torch.no_grad():
        for b, s in pairs:  # shared rows = base + delta; added rows keep their random init
            s[tuple(slice(0, n) for n in b.shape)].copy_(_perturb(b, gen, delta_scale))
    model.to(dtype).save_pretrained(d, **_save_kwargs(shard_size))
    tok.save_pretrained(d)
    proc().save_pretrained(d)


def build_tiny_family(root, kinds=("llava", "video_llava", "llava_next_video", "qwen2_audio"), *,
                      text_family="llama", seed=0, layout="legacy", tie_word_embeddings=False,
                      dtype=torch.float32, delta_scale=0.05, num_layers=2, hidden_size=16,
                      shard_size=None) -> TinyFamily:
    """Save a tiny base LM under root/base and one perturbed MLLM per kind under root/<kind>.

    Source k (its index in SOURCE_KINDS) uses seeds derived from (seed, k) only, so its tensors do
    not depend on which other kinds are requested. layout="hf5" rewrites the saved keys to the
    transformers-5 layout (model.language_model.*, lm_head.*, model.vision_tower.* ...).
    ValueError for what transformers can't build, e.g. tied embeddings for qwen2_audio/voxtral
    (their classes have no _tied_weights_keys, so the lm_head would be saved anyway).
    """
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown:
        raise ValueError(f"unknown source kinds {unknown}; choose from {SOURCE_KINDS}")
    if text_family not in TEXT_FAMILIES:
        raise ValueError(f"text_family must be one of {sorted(TEXT_FAMILIES)}, got {text_family!r}")
    if layout not in ("legacy", "hf5"):
        raise ValueError(f"layout must be 'legacy' or 'hf5', got {layout!r}")
    root = Path(root)
    torch.manual_seed(seed)
    base_cfg = _text_config(text_family, BASE_VOCAB, hidden_size, num_layers, tie_word_embeddings)
    base = TEXT_FAMILIES[text_family][1](base_cfg).to(dtype)
    base.save_pretrained(root / "base", **_save_kwargs(shard_size))
    _tokenizer().save_pretrained(root / "base")
    sources = {}
    for kind in kinds:
        d = sources[kind] = root / kind
        _build_source(kind, SOURCE_KINDS.index(kind), base, d, text_family=text_family, seed=seed,
                      tie=tie_word_embeddings, dtype=dtype, delta_scale=delta_scale, num_layers=num_layers,
                      hidden_size=hidden_size, shard_size=shard_size)
        if layout == "hf5":
            _rewrite_checkpoint(d, lambda key, t: (_hf5_key(key), t))
    return TinyFamily(base=root / "base", sources=sources, vocab_size=BASE_VOCAB)


def perturb_like(base_dir, out_dir, *, seed, delta_scale=0.05) -> Path:
    """Copy a plain causal LM to out_dir with every tensor perturbed like the sources' LM tensors.

    For plain (text-only) mergekit configs. Tensors are visited file by file, key by key (sorted),
    with a generator seeded by 10**6 + seed, apart from build_tiny_family's streams.
    """
    out_dir = Path(out_dir)
    shutil.copytree(base_dir, out_dir, dirs_exist_ok=True)  # config, tokenizer, shard index
    gen = torch.Generator().manual_seed(10**6 + seed)
    _rewrite_checkpoint(out_dir, lambda key, t: (key, _perturb(t, gen, delta_scale)))
    return out_dir
