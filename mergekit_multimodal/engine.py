"""Runs a plan: streams the LLM tensor by tensor, writes the composite aside, then moves it into place.

Reading goes through mergekit's LazyTensorLoader (memory-mapped, one tensor at a time, maps
dropped after each tensor); merging runs in row chunks of CHUNK_ELEMENTS per input; writing goes
straight to pre-planned shard files (shard_writer.py). Peak memory is therefore one output tensor
(merged, tau_*, masks) plus one chunk's float32 working set, whatever the model or shard size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from typing import Optional

import torch
import tqdm
import transformers

from mergekit_multimodal import layout as L
from mergekit_multimodal.card import write_card
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.masks import pack_mask
from mergekit_multimodal.methods.base import scales_from_sums
from mergekit_multimodal.methods.damc import lambdas_of, text_route
from mergekit_multimodal.plan import CompositePlan, TensorJob
from mergekit_multimodal.shard_writer import Entry, PlannedShardWriter

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


#: elements per row chunk of one input: bounds the float32 working set of a merge step
CHUNK_ELEMENTS = 1 << 22


def _write_composite(plan: CompositePlan, out: str, config_source: Optional[str]) -> None:
    opts = plan.options
    os.makedirs(out)
    for i in range(len(plan.sources)):
        _write_modality(plan, i, os.path.join(out, L.MODALITIES_DIR, plan.modalities[i]))

    writers = {"llm": PlannedShardWriter(out, [Entry(j.name, j.shape, j.out_dtype) for j in plan.jobs],
                                         opts.out_shard_size)}
    if plan.routed:
        routes_dir = os.path.join(out, L.ROUTES_DIR)
        tv, masks = [], []
        for j in plan.jobs:
            tv += [Entry(j.name, j.shape, j.out_dtype), Entry(L.alpha_key(j.name), (), torch.float32)]
            packed = ((math.prod(j.shape) + 7) // 8,)
            for m in plan.modalities:
                masks += [Entry(L.mask_key(m, j.name), packed, torch.uint8), Entry(L.scale_key(m, j.name), (), torch.float32)]
        writers["tv"] = PlannedShardWriter(routes_dir, tv, opts.out_shard_size, L.TASK_VECTOR_BASENAME)
        writers["masks"] = PlannedShardWriter(routes_dir, masks, opts.out_shard_size, L.MASKS_BASENAME)
    if plan.damc:
        writers["damc"] = PlannedShardWriter(os.path.join(out, L.ROUTES_DIR), _damc_entries(plan),
                                             opts.out_shard_size, L.DAMC_BASENAME)
    try:
        for job in tqdm.tqdm(plan.jobs, desc=f"Composing ({plan.method.name})", unit="tensor", disable=opts.quiet):
            _merge_tensor(plan, job, writers)
            for ckpt in [plan.base] + plan.sources:
                ckpt.loader.flush()  # drop the shard's memory map: its pages would otherwise count in RSS
    except BaseException:
        for w in writers.values():
            w.close(check=False)
        raise
    for w in writers.values():
        w.close()

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


def _row_chunks(job: TensorJob, rows: int, chunkable: bool):
    """Row slices of the merged part of a tensor: one slice when the method needs the whole tensor."""
    if len(job.shape) == 0:
        return [...]
    if not chunkable:
        return [slice(0, rows)]
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(job.shape[1:])))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _merge_tensor(plan: CompositePlan, job: TensorJob, writers) -> None:
    """Merge one LLM tensor in row chunks; write the merged tensor and, for MMER, its routes."""
    method, device, dtype = plan.method, plan.options.device or "cpu", plan.compute_dtype
    rows = plan.vocab.base_rows if job.vocab_rows else (job.shape[0] if job.shape else 0)
    inputs = ([plan.base] if method.uses_base else []) + plan.sources
    loaded = [c.get(job.name, check_finite=False) for c in inputs]
    full_sources = loaded[1:] if method.uses_base else loaded  # whole tensors: carried rows come from here
    raw = [t[:rows] if job.vocab_rows else t for t in loaded]
    params = method.resolve(job.name, job.t, plan.global_params, plan.source_params)
    base_raw = raw[0] if method.uses_base else None
    src_raw = raw[1:] if method.uses_base else raw
    try:
        state = method.prepare(base_raw, src_raw, params, dtype)
    except Exception as exc:
        raise CompositionError(f"merging LLM tensor {job.name!r} with {method.name} failed: {exc}") from exc

    merged = torch.zeros(job.shape, dtype=job.out_dtype)
    tau = torch.zeros(job.shape, dtype=job.out_dtype) if plan.routed else None
    masks = [torch.zeros(job.shape, dtype=torch.bool) for _ in plan.sources] if plan.routed else []
    tau_l1 = [0.0] * len(plan.sources)
    masked_l1 = [0.0] * len(plan.sources)
    rescale = False
    lambdas = lambdas_of(params, len(plan.sources)) if plan.damc else None
    for sl in _row_chunks(job, rows, method.chunkable):
        if plan.damc:  # W0 + sum_i lambda_i dT_i, the text deltas densified row chunk by row chunk
            x = raw[0][sl].to(device=device, dtype=dtype)
            plan.base.check_finite(x, plan.base.key(job.name))
            deltas = [d.text[job.name].dense(sl, dtype).to(device) if job.name in d.text else None
                      for d in plan.decoupled]
            merged[sl] = text_route(x, deltas, lambdas).to("cpu", job.out_dtype)
            continue
        chunk = []
        for ckpt, t in zip(inputs, raw):
            x = t[sl].to(device=device, dtype=dtype)
            ckpt.check_finite(x, ckpt.key(job.name))
            chunk.append(x)
        try:
            res = method.merge(chunk[0] if method.uses_base else None, chunk[1:] if method.uses_base else chunk,
                               params, state)
        except CompositionError:
            raise
        except Exception as exc:
            raise CompositionError(f"merging LLM tensor {job.name!r} with {method.name} failed: {exc}") from exc
        merged[sl] = res.merged.to("cpu", job.out_dtype)
        if res.routes is not None:
            tau[sl] = res.routes.task_vector.to("cpu", job.out_dtype)
            for i, m in enumerate(res.routes.masks):
                masks[i][sl] = m.to("cpu")
            tau_l1 = [a + b for a, b in zip(tau_l1, res.routes.tau_l1)]
            masked_l1 = [a + b for a, b in zip(masked_l1, res.routes.masked_l1)]
            rescale = res.routes.rescale
        del chunk, res

    if job.vocab_rows:  # rows a source added are copied from it; padding rows stay zero
        for c in plan.vocab.carried:
            row = full_sources[c.source][c.source_row]
            plan.sources[c.source].check_finite(row, plan.sources[c.source].key(job.name))
            merged[c.row] = row.to(job.out_dtype)
    writers["llm"].write(job.name, merged)
    if plan.damc and _damc_routed(plan, job.name):
        _write_damc_routes(plan, job, lambdas, writers["damc"])
    if plan.routed:
        writers["tv"].write(job.name, tau)
        writers["tv"].write(L.alpha_key(job.name), torch.tensor(float(params.shared["alpha"]), dtype=torch.float32))
        for modality, mask, scale in zip(plan.modalities, masks, scales_from_sums(tau_l1, masked_l1, rescale)):
            writers["masks"].write(L.mask_key(modality, job.name), pack_mask(mask))
            writers["masks"].write(L.scale_key(modality, job.name), torch.tensor(scale, dtype=torch.float32))


def _damc_routed(plan: CompositePlan, name: str) -> bool:
    return any(name in d.text or name in d.modality for d in plan.decoupled)


def _damc_dense(plan: CompositePlan, name: str) -> bool:
    """Dense route deltas for this tensor: asked for (`densify`), or some source's delta is dense."""
    if plan.global_params.get("densify", False):
        return True
    return any(getattr(d.get(name), "rank", 0) is None for dec in plan.decoupled for d in (dec.text, dec.modality))


def _damc_entries(plan: CompositePlan):
    """Every DAMC route tensor with its shape, planned before any is written (docs/format.md)."""
    entries = []
    for j in plan.jobs:
        if not _damc_routed(plan, j.name):
            continue
        out_f, in_f = j.shape
        if _damc_dense(plan, j.name):
            entries += [Entry(L.damc_key(m, j.name), j.shape, j.out_dtype) for m in plan.modalities]
            continue
        rank = sum(d.text[j.name].rank for d in plan.decoupled if j.name in d.text)
        if rank:
            entries += [Entry(L.damc_key(L.TEXT_ROUTE, j.name, "A"), (rank, in_f), j.out_dtype),
                        Entry(L.damc_key(L.TEXT_ROUTE, j.name, "B"), (out_f, rank), j.out_dtype)]
        for m, d in zip(plan.modalities, plan.decoupled):
            if j.name in d.modality:
                r = d.modality[j.name].rank
                entries += [Entry(L.damc_key(m, j.name, "A"), (r, in_f), j.out_dtype),
                            Entry(L.damc_key(m, j.name, "B"), (out_f, r), j.out_dtype)]
    return entries


def _write_damc_routes(plan: CompositePlan, job: TensorJob, lambdas, writer) -> None:
    """Route m = merged - sum_i lambda_i dT_i + dM_m: its factors, or (dense) the dense delta."""
    dt = job.out_dtype
    texts = [(lam, d.text[job.name]) for lam, d in zip(lambdas, plan.decoupled) if job.name in d.text]
    if _damc_dense(plan, job.name):
        text = sum((lam * lr.dense() for lam, lr in texts), torch.zeros(job.shape))
        for m, d in zip(plan.modalities, plan.decoupled):
            mod = d.modality[job.name].dense() if job.name in d.modality else 0.0
            writer.write(L.damc_key(m, job.name), (mod - text).to(dt))
        return
    if texts:
        writer.write(L.damc_key(L.TEXT_ROUTE, job.name, "A"), torch.cat([lr.A.float() for _, lr in texts]).to(dt))
        writer.write(L.damc_key(L.TEXT_ROUTE, job.name, "B"),
                     torch.cat([lr.B.float() * (lam * lr.scale) for lam, lr in texts], dim=1).to(dt))
    for m, d in zip(plan.modalities, plan.decoupled):
        if job.name in d.modality:
            lr = d.modality[job.name]
            writer.write(L.damc_key(m, job.name, "A"), lr.A.to(dt))
            writer.write(L.damc_key(m, job.name, "B"), (lr.B.float() * lr.scale).to(dt))


def _write_modality(plan: CompositePlan, i: int, out: str) -> None:
    src = plan.sources[i]
    names = [n for _, ns in sorted(src.parts.items()) for n in ns]
    override = plan.connector_overrides[i] if plan.connector_overrides else {}
    writer = PlannedShardWriter(out, [Entry(n, src.shapes[n][0], src.shapes[n][1]) for n in names],
                                plan.options.out_shard_size)
    for name in names:
        writer.write(name, override[name].to(src.shapes[name][1]) if name in override else src.get(name, llm=False))
    src.loader.flush()
    writer.close()
    dec = plan.decoupled[i] if plan.damc else None
    if dec is not None and (dec.prefix is not None or dec.suffix is not None):
        from safetensors.torch import save_file

        tokens = {k: t.contiguous() for k, t in (("prefix", dec.prefix), ("suffix", dec.suffix)) if t is not None}
        save_file(tokens, os.path.join(out, L.PREFIX_SUFFIX_FILE))
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
    cfg.dtype = plan.jobs[0].out_dtype if plan.jobs else cfg.dtype
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
            "route": "mmer" if plan.routed else "damc" if plan.damc else "merged",
            "parameters": plan.config.model_dump(mode="json")["models"][i].get("parameters") or {},
        }
        if plan.damc:
            dec = plan.decoupled[i]
            modalities[m]["adapters"] = {"source": plan.config.models[i].adapters, "form": dec.form,
                                         "name": dec.adapter}
            if dec.encoders:  # what a ModelCompose release says it was trained with
                modalities[m]["adapters"]["encoders"] = dec.encoders
            if dec.prefix is not None or dec.suffix is not None:
                modalities[m]["prefix_suffix"] = f"{L.MODALITIES_DIR}/{m}/{L.PREFIX_SUFFIX_FILE}"
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
    if plan.damc:
        dense = bool(plan.global_params.get("densify", False))
        doc["routes"] = {
            "kind": "damc",
            "dir": L.ROUTES_DIR,
            "damc": L.DAMC_BASENAME,
            "low_rank": not dense,
            "formula": ("route_m[t] = merged[t] + delta_m[t]" if dense else
                        "route_m[t] = merged[t] - text[t]:B @ text[t]:A + m[t]:B @ m[t]:A"),
        }
    with open(os.path.join(out, L.COMPOSITE_CONFIG), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
