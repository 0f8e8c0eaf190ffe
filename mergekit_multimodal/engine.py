"""Runs a plan: streams the LLM tensor by tensor, writes the composite aside, then moves it into place.

Reading goes through mergekit's LazyTensorLoader (memory-mapped, one tensor at a time) and
writing through mergekit's TensorWriter (sharded safetensors + index). Peak memory is the
writers' shard buffers plus the base and source tensors of the one LLM tensor being merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Optional

import torch
import tqdm
import transformers
from mergekit.io import TensorWriter

from mergekit_multimodal import layout as L
from mergekit_multimodal.card import write_card
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.masks import pack_mask
from mergekit_multimodal.plan import CompositePlan, TensorJob

LOG = logging.getLogger(__name__)


def execute_plan(plan: CompositePlan, out_path: str, config_source: Optional[str] = None, overwrite: bool = False) -> str:
    """Write the composite to `out_path`; on any failure nothing is left there."""
    out_path = os.path.abspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise CompositionError(f"{out_path}: output already exists; remove it or pass --overwrite")
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_path)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _write_composite(plan, tmp, config_source)
        if os.path.exists(out_path):
            trash = tmp + ".old"
            os.replace(out_path, trash)
            os.replace(tmp, out_path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def _write_composite(plan: CompositePlan, out: str, config_source: Optional[str]) -> None:
    opts = plan.options
    os.makedirs(out)
    for i, src in enumerate(plan.sources):
        _write_modality(plan, i, os.path.join(out, L.MODALITIES_DIR, plan.modalities[i]))

    llm = TensorWriter(out, max_shard_size=opts.out_shard_size, safe_serialization=True)
    routes_dir = os.path.join(out, L.ROUTES_DIR)
    tv = masks = None
    if plan.routed:
        tv = TensorWriter(routes_dir, max_shard_size=opts.out_shard_size, override_basename=L.TASK_VECTOR_BASENAME)
        masks = TensorWriter(routes_dir, max_shard_size=opts.out_shard_size, override_basename=L.MASKS_BASENAME)
    bar = tqdm.tqdm(plan.jobs, desc=f"Composing ({plan.method.name})", unit="tensor", disable=opts.quiet)
    for job in bar:
        _merge_tensor(plan, job, llm, tv, masks)
    for w in (llm, tv, masks):
        if w is not None:
            w.finalize()

    _write_llm_config(plan, out)
    _write_tokenizer(plan, out)
    for name in L.BASE_FILES:
        if os.path.exists(os.path.join(plan.base.path, name)):
            shutil.copy(os.path.join(plan.base.path, name), os.path.join(out, name))
    _write_composite_config(plan, out)
    yaml_text = config_source if config_source is not None else plan.config.to_yaml()
    with open(os.path.join(out, "mergekit_config.yml"), "w", encoding="utf-8") as f:
        f.write(yaml_text)
    if opts.write_model_card:
        write_card(plan, out, yaml_text)


def _merge_tensor(plan: CompositePlan, job: TensorJob, llm: TensorWriter, tv, masks) -> None:
    device = plan.options.device or "cpu"
    v0 = plan.vocab.base_rows
    full = [s.get(job.name) for s in plan.sources]

    def prep(t: torch.Tensor) -> torch.Tensor:
        return (t[:v0] if job.vocab_rows else t).to(device=device, dtype=plan.compute_dtype)

    base_t = plan.base.get(job.name) if plan.method.uses_base else None
    out_dtype = plan.out_dtype or (base_t.dtype if base_t is not None else full[0].dtype)
    params = plan.method.resolve(job.name, job.t, plan.global_params, plan.source_params)
    try:
        result = plan.method.merge(prep(base_t) if base_t is not None else None, [prep(t) for t in full], params)
    except CompositionError:
        raise
    except Exception as exc:
        raise CompositionError(f"merging LLM tensor {job.name!r} with {plan.method.name} failed: {exc}") from exc

    merged = _with_carried_rows(plan, job, result.merged, full)
    llm.save_tensor(job.name, merged.to("cpu", out_dtype), clone=plan.options.clone_tensors)
    if result.routes is not None:
        tau = _pad_rows(job, result.routes.task_vector, 0)
        tv.save_tensor(job.name, tau.to("cpu", out_dtype))
        tv.save_tensor(L.alpha_key(job.name), torch.tensor(float(params.shared["alpha"]), dtype=torch.float32))
        for modality, mask, scale in zip(plan.modalities, result.routes.masks, result.routes.scales):
            masks.save_tensor(L.mask_key(modality, job.name), pack_mask(_pad_rows(job, mask, False)))
            masks.save_tensor(L.scale_key(modality, job.name), torch.tensor(scale, dtype=torch.float32))


def _pad_rows(job: TensorJob, t: torch.Tensor, fill) -> torch.Tensor:
    if t.shape[0] == job.shape[0]:
        return t
    pad = torch.full((job.shape[0] - t.shape[0],) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _with_carried_rows(plan: CompositePlan, job: TensorJob, merged: torch.Tensor, full) -> torch.Tensor:
    """Rows a source added to the vocabulary are copied from that source; padding rows are zero."""
    if not job.vocab_rows:
        return merged
    out = _pad_rows(job, merged, 0)
    for c in plan.vocab.carried:
        out[c.row] = full[c.source][c.source_row].to(out.device, out.dtype)
    return out


def _write_modality(plan: CompositePlan, i: int, out: str) -> None:
    src = plan.sources[i]
    writer = TensorWriter(out, max_shard_size=plan.options.out_shard_size)
    for part, names in sorted(src.parts.items()):
        for name in names:
            writer.save_tensor(name, src.get(name, llm=False))
    writer.finalize()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(src.config, f, indent=2)
    for name in L.PROCESSOR_FILES:
        if os.path.exists(os.path.join(src.path, name)):
            shutil.copy(os.path.join(src.path, name), os.path.join(out, name))


def _write_llm_config(plan: CompositePlan, out: str) -> None:
    """The merged LLM's config.json, built by transformers so `AutoModelForCausalLM` loads it."""
    text = plan.base.text_config()
    model_type = text.pop("model_type", None)
    for key in ("architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **text)
    except Exception as exc:
        raise CompositionError(f"{plan.base.path}: cannot build a causal-LM config for model_type {model_type!r} ({exc})")
    arch = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cfg.architectures = [arch] if arch else None
    cfg.vocab_size = plan.vocab.rows
    cfg.tie_word_embeddings = plan.tied_output
    if plan.out_dtype is not None:
        cfg.dtype = plan.out_dtype
    cfg.save_pretrained(out)


def _write_tokenizer(plan: CompositePlan, out: str) -> None:
    tok = plan.base_tokenizer
    if tok is None:
        if plan.vocab.carried:
            LOG.warning("base ships no tokenizer: added tokens %s are listed only in %s", plan.vocab.new_tokens, L.COMPOSITE_CONFIG)
        return
    tok.add_tokens(plan.vocab.new_tokens, special_tokens=True)
    for c in plan.vocab.carried:
        got = tok.convert_tokens_to_ids(c.token)
        if got != c.row:
            raise CompositionError(f"tokenizer gave {c.token!r} id {got}, the plan expected {c.row}")
    tok.save_pretrained(out)


def _write_composite_config(plan: CompositePlan, out: str) -> None:
    from mergekit_multimodal.families import CONNECTOR, ENCODER, OTHER

    modalities = {}
    for i, (src, m) in enumerate(zip(plan.sources, plan.modalities)):
        ph = plan.vocab.placeholders.get(m)
        modalities[m] = {
            "source": str(plan.config.models[i].model),
            "architecture": (src.config.get("architectures") or [None])[0],
            "family": src.layout.family.name,
            "path": f"{L.MODALITIES_DIR}/{m}",
            "placeholder": ph.token if ph else None,
            "placeholder_id": ph.id if ph else None,
            "parts": {p: len(src.parts.get(p, [])) for p in (ENCODER, CONNECTOR, OTHER)},
            "route": "mmer" if plan.routed else "merged",
            "parameters": plan.config.model_dump(mode="json")["models"][i].get("parameters") or {},
        }
    doc = {
        "format_version": L.FORMAT_VERSION,
        "merge_method": plan.method.name,
        # the method's defaults, overridden by what the YAML set (filters/gradients kept as written)
        "parameters": {**{p.name: p.default for p in plan.method.param_defs if p.default is not None},
                       **(plan.config.model_dump(mode="json").get("parameters") or {})},
        "base_model": str(plan.config.base_model),
        "llm": {"path": ".", "vocab_size": plan.vocab.rows, "base_vocab_size": plan.vocab.base_rows,
                "tie_word_embeddings": plan.tied_output},
        "added_tokens": [{"token": c.token, "id": c.row, "from": plan.modalities[c.source]} for c in plan.vocab.carried],
        "modalities": modalities,
        "text_route": "merged",
        "routes": None,
    }
    if plan.routed:
        doc["routes"] = {
            "kind": "mmer",
            "dir": L.ROUTES_DIR,
            "task_vector": L.TASK_VECTOR_BASENAME,
            "masks": L.MASKS_BASENAME,
            "formula": "route_m[t] = merged[t] + (scale_m[t] * unpack(mask_m[t]) - alpha[t]) * task_vector[t]",
            "mask_bit_order": "little",
        }
    with open(os.path.join(out, L.COMPOSITE_CONFIG), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
