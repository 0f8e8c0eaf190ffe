"""Tiny, random stand-ins of real multimodal checkpoints, for tests and the built-in example.

`build_tiny_family` saves one tiny base causal LM plus several multimodal LLMs of REAL
transformers classes (the `tiny` stand-ins each family file declares) whose language models are
that base plus small, source-specific perturbations. Everything is
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

import inspect
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from mergekit_multimodal.families import tiny_sources

#: every family's tiny stand-ins (families/<name>.py, `Family.tiny`), in seed order
SOURCE_KINDS = tuple(tiny_sources())
#: the ones the built-in example composes (and the default of `build_tiny_family`)
EXAMPLE_KINDS = tuple(k for k, (_, t) in tiny_sources().items() if t.in_example)
TEXT_FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM), "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
BASE_VOCAB = 96  # <unk> <s> </s> w0..w92


@dataclass
class TinyFamily:
    base: Path  # plain causal LM dir (config.json, model.safetensors, tokenizer files)
    sources: dict[str, Path]  # source kind -> dir of the saved MLLM
    vocab_size: int  # base vocabulary size V0 (rows of base embed_tokens)


def _tokenizer(added=(), pad=None, named=None) -> transformers.PreTrainedTokenizerFast:
    """Word-level base tokenizer; sources append their special tokens, as real checkpoints do
    (`named`: tokenizer attributes such as Gemma 3's `boi_token`, added first, in `added`'s order)."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(BASE_VOCAB - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"extra_special_tokens": dict(named)} if named else {}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                               **extra)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if pad:
        tok.pad_token = pad
    return tok


def _text_classes(family):
    """(config class, causal-LM class, extra config fields) of a text family: one of TEXT_FAMILIES,
    or a stand-in's declared `text_model` (named by its config class)."""
    if family in TEXT_FAMILIES:
        return (*TEXT_FAMILIES[family], {})
    for _, t in tiny_sources().values():
        if t.text_model and t.text_model[0] == family:
            cfg, lm, extra = t.text_model
            return getattr(transformers, cfg), getattr(transformers, lm) if isinstance(lm, str) else lm(), dict(extra)
    raise ValueError(f"text_family must be one of {sorted(TEXT_FAMILIES)} or a stand-in's text model, got {family!r}")


def _resolve_text_family(kinds, text_family):
    """The text family the stand-ins need: the one they declare (Gemma 3's), else the given one or llama."""
    declared = {tiny_sources()[k][1].text_model[0] for k in kinds if tiny_sources()[k][1].text_model}
    if len(declared) > 1 or (declared and text_family not in (None, *declared)):
        raise ValueError(f"stand-ins {list(kinds)} need text models {sorted(declared)}; "
                         f"text_family={text_family!r} does not fit them all")
    return declared.pop() if declared else text_family or "llama"


def _text_config(family, vocab, hidden, layers, tie, **kw):
    cfg_cls, _, extra = _text_classes(family)
    return cfg_cls(**{**extra, **kw}, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                   max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)


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
    """Legacy -> transformers-5 key: language_model.model.X -> model.language_model.X, etc.; a
    legacy layout with a bare LLM (Qwen2-VL's model.X beside visual.*) -> model.language_model.X."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key.startswith("language_model."):  # language_model.lm_head.weight
        return key[len("language_model."):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
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


def _build_source(kind, base, d, *, text_family, seed, tie, dtype, delta_scale, num_layers, hidden_size,
                  shard_size):
    t = tiny_sources()[kind][1]
    k, cls_name = t.seed, t.model_class
    tok = _tokenizer(t.added_tokens, t.pad_token, t.named_tokens)
    vocab = math.ceil(len(tok) / t.vocab_multiple) * t.vocab_multiple  # LLaVA-1.5 pads 32002 -> 32064
    extra = {"pad_token_id": tok.pad_token_id} if t.pad_token else {}
    text = _text_config(text_family, vocab, hidden_size, num_layers, tie, **extra)
    ids = {field: tok.convert_tokens_to_ids(tk) for field, tk in t.placeholder_fields.items()}
    try:
        cfg = getattr(transformers, t.config_class)(text_config=text.to_dict(), **{t.encoder_key: t.encoder_config(hidden_size)},
                                         **ids, tie_word_embeddings=tie, **t.extra_config)
        torch.manual_seed(seed * 1000 + 500 + k)  # encoder/connector/new rows: the class's own init
        model = getattr(transformers, cls_name)(cfg)
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
    # a processor that holds the tokenizer (Gemma 3's) takes it
    (t.processor(tok) if inspect.signature(t.processor).parameters else t.processor()).save_pretrained(d)


def build_tiny_family(root, kinds=EXAMPLE_KINDS, *,
                      text_family=None, seed=0, layout="legacy", tie_word_embeddings=False,
                      dtype=torch.float32, delta_scale=0.05, num_layers=2, hidden_size=16,
                      shard_size=None) -> TinyFamily:
    """Save a tiny base LM under root/base and one perturbed MLLM per kind under root/<kind>.

    Source k (its tiny stand-in's `seed` stream) uses seeds derived from (seed, k) only, so its tensors do
    not depend on which other kinds are requested. layout="hf5" rewrites the saved keys to the
    transformers-5 layout (model.language_model.*, lm_head.*, model.vision_tower.* ...).
    ValueError for what transformers can't build, e.g. tied embeddings for the audio classes
    (they have no _tied_weights_keys, so the lm_head would be saved anyway).
    """
    unknown = [k for k in kinds if k not in SOURCE_KINDS]
    if unknown:
        raise ValueError(f"unknown source kinds {unknown}; choose from {SOURCE_KINDS}")
    text_family = _resolve_text_family(kinds, text_family)
    _text_classes(text_family)
    if layout not in ("legacy", "hf5"):
        raise ValueError(f"layout must be 'legacy' or 'hf5', got {layout!r}")
    root = Path(root)
    torch.manual_seed(seed)
    base_cfg = _text_config(text_family, BASE_VOCAB, hidden_size, num_layers, tie_word_embeddings)
    base = _text_classes(text_family)[1](base_cfg).to(dtype)
    base.save_pretrained(root / "base", **_save_kwargs(shard_size))
    _tokenizer().save_pretrained(root / "base")
    sources = {}
    for kind in kinds:
        d = sources[kind] = root / kind
        _build_source(kind, base, d, text_family=text_family, seed=seed,
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
