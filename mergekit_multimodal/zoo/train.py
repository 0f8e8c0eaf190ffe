"""Training the zoo on CPU: the base LM on text only, then each source on its own modality only.

Loss is on the answer tokens only. A source is trained in two phases, as LLaVA-style MLLMs are:
(1) encoder + connector with the LLM frozen, so the connector learns to speak the base LM's
"language"; (2) a light tuning of the LLM too (smaller learning rate, fewer steps), so each source
carries a real, moderate LLM delta that composition methods must reconcile.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import transformers
from torch import nn

from mergekit_multimodal.families import get_family
from mergekit_multimodal.families import point_cloud
from mergekit_multimodal.zoo import data
from mergekit_multimodal.zoo.tokenizer import build_tokenizer


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the zoo; its hash names the cache directory."""

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    enc_hidden: int = 32
    base_steps: int = 500
    base_lr: float = 3e-3
    connector_steps: int = 150
    llm_steps: int = 60
    source_lr: float = 3e-3
    llm_lr: float = 5e-4
    batch: int = 32
    train_items: int = 1024  # media items rendered per source
    test_seed: int = 12345
    test_per_subset: int = 100
    damc_steps: int = 400  # decoupled LoRA training per DAMC source (one sequence a step)
    damc_rank: int = 8
    damc_lr: float = 1e-3
    forget_steps: int = 150  # the forgetting fine-tune (data.NEW): every weight, the `more` task only
    forget_lr: float = 1e-3


# modality -> (transformers class or ours, config class, encoder config key, placeholder, config field)
SOURCES = {
    "image": ("LlavaForConditionalGeneration", "LlavaConfig", "vision_config", "<image>", "image_token_index"),
    "audio": ("Qwen2AudioForConditionalGeneration", "Qwen2AudioConfig", "audio_config", "<|AUDIO|>", "audio_token_index"),
    "video": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoConfig", "vision_config", "<video>",
              "video_token_index"),
    "point_cloud": (point_cloud.ARCHITECTURE, None, None, "<point>", "point_token_index"),
}
FAMILY = {"image": "llava", "audio": "qwen2_audio", "video": "llava_next_video", "point_cloud": "point_cloud"}


def text_config(spec: ZooSpec, vocab: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=2 * spec.hidden,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, head_dim=spec.hidden // spec.heads,
                         max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    return peak * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def _step(opt, params, loss, lr):
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _pad(rows: List[torch.Tensor], labels: List[torch.Tensor]):
    """Right-pad embedded rows; labels -100 on prompt and padding."""
    width = max(r.shape[0] for r in rows)
    emb = torch.zeros(len(rows), width, rows[0].shape[-1])
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, lb) in enumerate(zip(rows, labels)):
        emb[b, : r.shape[0]], lab[b, : r.shape[0]], mask[b, : r.shape[0]] = r, lb, 1
    return emb, mask, lab


def _lm_loss(decoder, head, emb, mask, lab):
    hidden = decoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    logits = head(hidden[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)


def train_base(spec: ZooSpec, out_dir: str, progress: Optional[Callable[[int], None]] = None) -> None:
    """Pretrain the base Llama on text: descriptions, single-input and 2-4-input commonality questions."""
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tok = build_tokenizer()
    model = transformers.LlamaForCausalLM(text_config(spec, len(tok)))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=spec.base_lr, weight_decay=0.01)
    emb_fn = model.get_input_embeddings()
    for step in range(spec.base_steps):
        rows, labels = [], []
        for _ in range(spec.batch):
            p, a = data.text_example(rng)
            pi, ai = tok(p)["input_ids"], answer_ids(tok, a)
            ids = torch.tensor(pi + ai)
            rows.append(emb_fn(ids))
            labels.append(torch.tensor([-100] * len(pi) + ai))
        loss = _lm_loss(model.model, model.lm_head, *_pad(rows, labels))
        _step(opt, params, loss, _lr(step, spec.base_steps, spec.base_lr))
        if progress:
            progress(1)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _processor(modality: str):
    if modality == "image" or modality == "video":
        s = data.IMAGE_SIZE
        return transformers.CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    if modality == "audio":
        return transformers.WhisperFeatureExtractor(feature_size=32, sampling_rate=data.SAMPLE_RATE, hop_length=500,
                                         chunk_length=1, n_fft=400)
    return None


def _build_mllm(modality: str, spec: ZooSpec, base: transformers.LlamaForCausalLM, tok) -> nn.Module:
    cls_name, cfg_name, enc_key, placeholder, field = SOURCES[modality]
    text = text_config(spec, len(tok)).to_dict()
    pid = tok.convert_tokens_to_ids(placeholder)
    h = spec.enc_hidden
    if modality == "point_cloud":
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}))
        model = point_cloud.PointLlavaForConditionalGeneration(point_cloud.make_config(text, pid, hidden_size=h, num_points=data.POINTS), lm)
    else:
        enc = (dict(model_type="qwen2_audio_encoder", d_model=h, encoder_layers=2, encoder_attention_heads=2,
                    encoder_ffn_dim=2 * h, num_mel_bins=32, max_source_positions=16) if modality == "audio" else
               transformers.CLIPVisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=data.IMAGE_SIZE, patch_size=14, projection_dim=h).to_dict())
        cfg = getattr(transformers, cfg_name)(text_config=text, **{enc_key: enc}, **{field: pid}, tie_word_embeddings=False)
        model = getattr(transformers, cls_name)(cfg)
    with torch.no_grad():  # the LLM starts as the base; the placeholder's row keeps its init (never read)
        dec, bdec = model.get_decoder().state_dict(), base.model.state_dict()
        for n, t in bdec.items():
            dec[n][tuple(slice(0, s) for s in t.shape)].copy_(t)
        model.get_output_embeddings().weight[: base.lm_head.weight.shape[0]].copy_(base.lm_head.weight)
    return model


def _features(modality: str, model, media) -> List[torch.Tensor]:
    if modality == "point_cloud":
        return point_cloud.features(model, None, media)
    return get_family(FAMILY[modality]).encoder.features(model, model.config, media)


def _media_tensors(modality: str, items: Sequence[np.ndarray]):
    """The exact preprocessing the evaluator applies (CompositeProcessor's per-family preprocessors)."""
    if modality == "point_cloud":
        return {"point_clouds": torch.from_numpy(np.stack(items))}
    proc = _processor(modality)
    if modality == "image":
        return {"pixel_values": proc(images=list(items), return_tensors="pt")["pixel_values"]}
    if modality == "video":
        return {"pixel_values_videos": torch.stack([proc(images=list(v), return_tensors="pt")["pixel_values"]
                                                    for v in items])}
    out = proc(list(items), sampling_rate=data.SAMPLE_RATE, return_attention_mask=True, padding="max_length",
               return_tensors="pt")
    return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}


def _index(media: dict, idx: Sequence[int]) -> dict:
    return {k: v[list(idx)] for k, v in media.items()}


def train_source(modality: str, spec: ZooSpec, base_dir: str, out_dir: str, offset: int,
                 progress: Optional[Callable[[int], None]] = None) -> None:
    """Fine-tune one MLLM from the base on its own modality only; save it in its family's layout."""
    seed = spec.seed * 100 + offset
    torch.manual_seed(seed)
    rng = random.Random(seed)
    placeholder = SOURCES[modality][3]
    tok = build_tokenizer([placeholder])
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = _build_mllm(modality, spec, base, tok)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    llm_params = list(decoder.parameters()) + list(head.parameters())
    llm_ids = {id(p) for p in llm_params}
    mod_params = [p for p in model.parameters() if id(p) not in llm_ids]
    _train_phases(model, modality, spec, tok, placeholder, rng, seed,
                  [(spec.connector_steps, spec.source_lr, mod_params, llm_params),
                   (spec.llm_steps, spec.llm_lr, mod_params + llm_params, [])], progress)
    _save(model, tok, modality, out_dir)


def train_finetune(spec: ZooSpec, source_dir: str, out_dir: str, progress: Optional[Callable[[int], None]] = None,
                   modality: str = data.FORGET_SOURCE) -> None:
    """The forgetting experiment's source (data.NEW): `modality`'s trained source fine-tuned, every
    weight, on the `more` task only (`forget_steps` at `forget_lr`), long enough to forget its own."""
    seed = spec.seed * 100 + 90
    torch.manual_seed(seed)
    rng = random.Random(seed)
    placeholder = SOURCES[modality][3]
    tok = build_tokenizer([placeholder])
    model = getattr(transformers, SOURCES[modality][0]).from_pretrained(source_dir)
    _train_phases(model, modality, spec, tok, placeholder, rng, seed,
                  [(spec.forget_steps, spec.forget_lr, list(model.parameters()), [])], progress, kinds=data.KINDS[data.NEW])
    _save(model, tok, modality, out_dir)


def _save(model, tok, modality: str, out_dir: str) -> None:
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    proc = _processor(modality)
    if proc is not None:
        proc.save_pretrained(out_dir)


def _train_phases(model, modality: str, spec: ZooSpec, tok, placeholder: str, rng: random.Random, seed: int,
                  phases, progress, kinds: Optional[Sequence[str]] = None) -> None:
    """Train `model` on `spec.train_items` rendered inputs of its modality, questions of `kinds`
    (default: the modality's own, data.KINDS); each
    phase: (steps, peak lr, trained parameters, parameters frozen from this phase on). A parameter is
    thawed only if an earlier phase froze it: those the model keeps frozen (the Whisper-style
    encoder's positions) stay frozen."""
    kinds = kinds or data.KINDS[modality]
    pairs = [data.pair(rng) for _ in range(spec.train_items)]
    counts = [data.dots(rng) if modality == "image" else None for _ in pairs]  # only images have dots
    media = _media_tensors(modality, data.render_many(modality, pairs, seed, counts))
    decoder, head, emb_fn = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    model.train()
    thawable = set()
    for steps, lr, params, frozen in phases:
        for p in params:
            if id(p) in thawable:
                p.requires_grad_(True)
        for p in frozen:
            p.requires_grad_(False)
            thawable.add(id(p))
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(steps):
            idx = [rng.randrange(spec.train_items) for _ in range(spec.batch)]
            feats = _features(modality, model, _index(media, idx))
            rows, labels = [], []
            for i, f in zip(idx, feats):
                p, a = _example_for(pairs[i], counts[i], placeholder, rng, kinds)
                before, after = p.split(placeholder)
                bi, ai, ans = tok(before)["input_ids"], tok(after)["input_ids"], answer_ids(tok, a)
                rows.append(torch.cat([emb_fn(torch.tensor(bi)), f, emb_fn(torch.tensor(ai + ans))]))
                labels.append(torch.tensor([-100] * (len(bi) + f.shape[0] + len(ai)) + ans))
            loss = _lm_loss(decoder, head, *_pad(rows, labels))
            _step(opt, params, loss, _lr(step, steps, lr))
            if progress:
                progress(1)
    model.eval()


def answer_ids(tok, answer: str) -> List[int]:
    """An answer's token ids, then `</s>`: every zoo model learns to stop after its answer."""
    return tok(answer)["input_ids"] + [tok.eos_token_id]


def _example_for(p: Tuple[str, str], d: Tuple[int, int], placeholder: str, rng: random.Random,
                 kinds: Sequence[str]) -> Tuple[str, str]:
    """A training question about a rendered input whose concepts are p and dots d: describe it (not
    in the forgetting fine-tune's `more` task), or a question of one of `kinds`, with choices or free-form."""
    if "more" not in kinds and rng.random() < 0.3:
        return data.describe([placeholder], p)
    return data.example([placeholder], data.single_question(rng, rng.choice(kinds), p, d), rng)


def train_damc_source(modality: str, spec: ZooSpec, base_dir: str, source_dir: str, out_dir: str, offset: int,
                      progress: Optional[Callable[[int], None]] = None) -> None:
    """A DAMC-decoupled source (docs/damc.md, form 1): text and modality LoRA adapters trained on the
    frozen base LM with `damc_train.train_decoupled`, on the same own-modality examples as the plain
    source (data.NEW's: the `more` task only), with that source's trained encoder + connector frozen
    as the feature extractor."""
    from mergekit_multimodal.methods.damc.train import save_decoupled, train_decoupled

    seed = spec.seed * 100 + 50 + offset
    torch.manual_seed(seed)
    rng = random.Random(seed)
    name, modality = modality, data.kind(modality)
    kinds = data.KINDS[name]
    placeholder = SOURCES[modality][3]
    tok = build_tokenizer([placeholder])
    if modality == "point_cloud":
        source = point_cloud.load_encoder(source_dir)[0]  # encoder + connector (its LLM is not needed)
    else:
        source = getattr(transformers, SOURCES[modality][0]).from_pretrained(source_dir)
    source.eval()
    n = min(spec.train_items, spec.damc_steps)
    pairs = [data.pair(rng) for _ in range(n)]
    counts = [data.dots(rng) if modality == "image" else None for _ in pairs]
    media = _media_tensors(modality, data.render_many(modality, pairs, seed, counts))
    with torch.no_grad():
        feats = [f for i in range(0, n, spec.batch)
                 for f in _features(modality, source, _index(media, range(i, min(n, i + spec.batch))))]
    del source
    batches = []
    for p, d, f in zip(pairs, counts, feats):
        prompt, answer = _example_for(p, d, placeholder, rng, kinds)
        before, after = prompt.split(placeholder)
        batches.append({"prompt_ids": torch.tensor(tok(before)["input_ids"]), "features": f.detach(),
                        "after_ids": torch.tensor(tok(after)["input_ids"]),
                        "target_ids": torch.tensor(answer_ids(tok, answer))})
    llm = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    trained = train_decoupled(llm, batches, modality=name, rank=spec.damc_rank, alpha=2.0 * spec.damc_rank,
                              steps=spec.damc_steps, lr=spec.damc_lr, seed=seed, progress=progress or False)
    save_decoupled(trained, out_dir)
