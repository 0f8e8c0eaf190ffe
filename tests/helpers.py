"""Helpers shared by the tests: the tiny families' kinds and modalities, a composite config for
them, and independent readers of what a merge wrote (fixtures are in conftest.py)."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_multimodal.families import tiny_sources
from mergekit_multimodal.testing import EXAMPLE_KINDS, TinyFamily, _rewrite_checkpoint

KINDS = EXAMPLE_KINDS
#: tiny stand-in -> the modality name tests give it, and a placeholder where its own is taken
MODALITY = {k: t.modality for k, (_, t) in tiny_sources().items()}
PLACEHOLDER_OVERRIDE = {k: t.placeholder for k, (_, t) in tiny_sources().items() if t.placeholder}


#: where the loader's equivalence tests run the composite: CPU float32 here and in CI;
#: benchmarks/device_check.py runs them again with cuda and float32 / bfloat16
DEVICE = torch.device(os.environ.get("MERGEKIT_MM_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("MERGEKIT_MM_TEST_DTYPE", "float32"))
if DEVICE.type == "cuda":  # no TF32 in fp32 checks (cuDNN convolutions use it by default)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def assert_like_source(got: torch.Tensor, source, vocab: int) -> None:
    """`got` (the composite's logits, run on DEVICE in DTYPE) against the source class: `source(device,
    dtype)` gives its logits there. In float32: within 1e-4 of the source's own logits. In a lower
    precision: no further from the source's float32 logits than twice the source class itself run
    in that precision on DEVICE (plus 1e-3), so the bound is the precision's own noise, not a guess."""
    want = source(torch.device("cpu"), torch.float32)[..., :vocab]
    got = got.float().cpu()[..., :vocab]
    assert got.shape == want.shape, (got.shape, want.shape)
    if DTYPE == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    own = source(DEVICE, DTYPE).float().cpu()[..., :vocab]
    err, own_err = (got - want).abs().max().item(), (own - want).abs().max().item()
    assert err <= 2 * own_err + 1e-3, f"{DTYPE} on {DEVICE}: composite off by {err:.4g}, the source class by {own_err:.4g}"


def composite_config(fam, method="mmer", kinds=None, parameters=None, **extra):
    kinds = kinds or list(fam.sources)
    models = []
    for k in kinds:
        entry = {"model": str(fam.sources[k]), "modality": MODALITY[k]}
        if k in PLACEHOLDER_OVERRIDE:
            entry["placeholder"] = PLACEHOLDER_OVERRIDE[k]
        models.append(entry)
    cfg = {"merge_method": method, "base_model": str(fam.base), "models": models, **extra}
    if parameters:
        cfg["parameters"] = parameters
    return cfg


def read_dir(path) -> dict:
    """Every tensor of a directory's safetensors files (index or single file), read independently."""
    path = Path(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def read_json(path):
    return json.loads(Path(path).read_text())


def llm_of(tensors: dict) -> dict:
    """A checkpoint's LLM tensors under causal-LM names, by the documented prefix rules."""
    out = {}
    for k, v in tensors.items():
        for src, dst in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                         ("model.language_model.", "model."), ("lm_head.", "lm_head.")):
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
    return out


def f64(t: torch.Tensor):
    return t.double().numpy()


def released(fam, kinds, rename, root) -> TinyFamily:
    """Copies of the stand-ins with keys starting rename[0] renamed to start rename[1]: the layout the
    released checkpoints have where transformers writes another (Gemma 3's `vision_tower.vision_model.`)."""
    sources = {}
    for k in kinds:
        sources[k] = Path(root) / k
        shutil.copytree(fam.sources[k], sources[k])
        _rewrite_checkpoint(sources[k], lambda key, t: (rename[1] + key[len(rename[0]):]
                                                        if key.startswith(rename[0]) else key, t))
    return TinyFamily(base=fam.base, sources=sources, vocab_size=fam.vocab_size)


def load_route_weights(src, composite, route, *, head=True):
    """Put route `route`'s LLM weights (iter_route) into a source model, on the rows both share;
    head=False leaves a tied head to follow the embedding."""
    from mergekit_multimodal.methods.routes import iter_route

    with torch.no_grad():
        for name, w in iter_route(composite, route):
            if name == "lm_head.weight" and not head:
                continue
            p = src.get_output_embeddings().weight if name == "lm_head.weight" else \
                src.get_decoder().get_parameter(name[len("model."):])
            p[:min(p.shape[0], w.shape[0])].copy_(w[:p.shape[0]])
