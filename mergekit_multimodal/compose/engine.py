"""Runs a plan: streams the LLM tensor by tensor, writes the composite aside, then moves it into place.

Reading goes through mergekit's LazyTensorLoader (memory-mapped, one tensor at a time, maps
dropped after each tensor); merging runs in row chunks of CHUNK_ELEMENTS per input; writing goes
straight to pre-planned shard files (shard_writer.py). Peak memory is therefore one output tensor
(merged, tau_*, masks) plus one chunk's float32 working set, whatever the model or shard size;
where a carried token takes one of a padded base's rows, each input's embedding / head rows the
method merges are gathered into a copy first (compose/vocab.py: `VocabPlan.merged_ranges`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Optional

import torch
import tqdm
import transformers

from mergekit_multimodal.compose import output
from mergekit_multimodal.compose.card import write_card
from mergekit_multimodal.compose.plan import CompositePlan, TensorJob
from mergekit_multimodal.compose.vocab import TOKENIZER_FILES
from mergekit_multimodal.compose.writer import Entry, PlannedShardWriter
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import CONNECTOR, ENCODER, OTHER
from mergekit_multimodal.format import files as F
from mergekit_multimodal.format.manifest import Manifest

LOG = logging.getLogger(__name__)


def execute_plan(plan: CompositePlan, out_path: str, config_source: Optional[str] = None, overwrite: bool = False) -> str:
    """Write the composite to `out_path`; on any failure nothing is left there (compose/output.py)."""
    return output.write_aside(out_path, lambda tmp: _write_composite(plan, tmp, config_source),
                              inputs=_input_dirs(plan), overwrite=overwrite)


def _input_dirs(plan: CompositePlan):
    """Every directory the compose reads: base, sources (as written and as resolved), adapters."""
    refs = [plan.config.base_model] + [m.model for m in plan.config.models]
    yield from (c.path for c in [plan.base] + plan.sources)
    for ref in refs:
        yield ref.model.path
        if ref.lora is not None:
            yield ref.lora.path
    yield from (m.adapters for m in plan.config.models if m.adapters)


#: elements per row chunk of one input: bounds the float32 working set of a merge step
CHUNK_ELEMENTS = 1 << 22


def _write_composite(plan: CompositePlan, out: str, config_source: Optional[str]) -> None:
    opts = plan.options
    os.makedirs(out)
    for i in range(len(plan.sources)):
        _write_modality(plan, i, os.path.join(out, F.MODALITIES_DIR, plan.modalities[i]))

    writers = {"llm": PlannedShardWriter(out, [Entry(j.name, j.shape, j.out_dtype) for j in plan.jobs],
                                         opts.out_shard_size)}
    for rf in plan.method.route_files(plan):  # the method's routes, every tensor planned up front
        writers[rf.basename] = PlannedShardWriter(os.path.join(out, F.ROUTES_DIR), rf.entries, opts.out_shard_size,
                                                  rf.basename)
    try:
        for job in tqdm.tqdm(plan.jobs, desc=f"Composing ({plan.method.name})", unit="tensor", disable=opts.quiet):
            output.check_signals()
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
    for name in F.BASE_FILES:
        if os.path.exists(os.path.join(plan.base.path, name)):
            shutil.copy(os.path.join(plan.base.path, name), os.path.join(out, name))
    _write_manifest(plan, out)
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
    """Merge one LLM tensor in row chunks; write the merged tensor and whatever the method keeps beside it."""
    method, device, dtype = plan.method, plan.options.device or "cpu", plan.compute_dtype
    rows = plan.vocab.base_rows if job.vocab_rows else (job.shape[0] if job.shape else 0)
    inputs = ([plan.base] if method.uses_base else []) + plan.sources
    loaded = [c.get(job.name, check_finite=False) for c in inputs]
    full_sources = loaded[1:] if method.uses_base else loaded  # whole tensors: carried rows come from here
    # carried rows inside the base's rows (its embedding padded past its tokenizer) are no merge input:
    # the method sees the other rows, gathered (`index`: their rows in the output)
    ranges = plan.vocab.merged_ranges if job.vocab_rows else [(0, rows)]
    index = None if ranges == [(0, rows)] else torch.cat([torch.arange(a, b) for a, b in ranges])
    raw = [t[index] for t in loaded] if index is not None else [t[:rows] if job.vocab_rows else t for t in loaded]
    rows = rows if index is None else len(index)
    params = method.resolve(job.name, job.t, plan.global_params, plan.source_params)
    base_raw = raw[0] if method.uses_base else None
    src_raw = raw[1:] if method.uses_base else raw
    try:
        state = method.prepare(base_raw, src_raw, params, dtype)
    except Exception as exc:
        raise CompositionError(f"merging LLM tensor {job.name!r} with {method.name} failed: {exc}") from exc

    merger = method.tensor_merger(plan, job, params, state)
    merged = torch.zeros(job.shape, dtype=job.out_dtype)
    read = list(zip(inputs, raw)) if method.reads_sources else list(zip(inputs, raw))[:1]
    for sl in _row_chunks(job, rows, method.chunkable):
        chunk = []
        for ckpt, t in read:
            x = t[sl].to(device=device, dtype=dtype)
            ckpt.check_finite(x, ckpt.key(job.name))
            chunk.append(x)
        base = chunk[0] if method.uses_base else None
        sources = chunk[1:] if method.uses_base else chunk
        out_rows = sl if index is None else index[sl]
        try:
            out = merger.merge_chunk(out_rows, base, sources)
        except CompositionError:
            raise
        except Exception as exc:
            raise CompositionError(f"merging LLM tensor {job.name!r} with {method.name} failed: {exc}") from exc
        merged[out_rows] = out.to("cpu", job.out_dtype)
        del chunk, out

    if job.vocab_rows:  # rows a source added are copied from it; padding rows past the base's stay zero
        for c in plan.vocab.carried:
            row = full_sources[c.source][c.source_row]
            plan.sources[c.source].check_finite(row, plan.sources[c.source].key(job.name))
            merged[c.row] = row.to(job.out_dtype)
    writers["llm"].write(job.name, merged)
    merger.finish(writers)


def _write_modality(plan: CompositePlan, i: int, out: str) -> None:
    src = plan.sources[i]
    names = [n for _, ns in sorted(src.parts.items()) for n in ns]
    override = plan.connector_overrides[i] if plan.connector_overrides else {}
    writer = PlannedShardWriter(out, [Entry(n, src.shapes[n][0], src.shapes[n][1]) for n in names],
                                plan.options.out_shard_size)
    for name in names:
        output.check_signals()
        writer.write(name, override[name].to(src.shapes[name][1]) if name in override else src.get(name, llm=False))
    src.loader.flush()
    writer.close()
    plan.method.write_modality(plan, i, out)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(src.config, f, indent=2)
    for name in F.PROCESSOR_FILES + TOKENIZER_FILES:  # its tokenizer: what an export of its route writes
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
            LOG.warning("base ships no tokenizer: added tokens %s are listed only in %s", plan.vocab.new_tokens, F.COMPOSITE_CONFIG)
        return
    tok.add_tokens(plan.vocab.named + plan.vocab.new_tokens, special_tokens=True)
    first = len(tok) - len(plan.vocab.named) - len(plan.vocab.new_tokens)
    expected = [(t, first + k) for k, t in enumerate(plan.vocab.named)] + [(c.token, c.row) for c in plan.vocab.carried]
    for token, row in expected:
        got = tok.convert_tokens_to_ids(token)
        if got != row:
            raise CompositionError(f"tokenizer gave {token!r} id {got}, the plan expected {row}")
    tok.save_pretrained(out)


def _write_manifest(plan: CompositePlan, out: str) -> None:
    """composite_config.json (format/manifest.py), with what the method adds to it."""
    method = plan.method
    config = plan.config.model_dump(mode="json")
    modalities = {}
    for i, (src, m) in enumerate(zip(plan.sources, plan.modalities)):
        ph = plan.vocab.placeholders.get(m)
        modalities[m] = {
            "source": str(plan.config.models[i].model),
            "architecture": (src.config.get("architectures") or [None])[0],
            "family": src.layout.family.name,
            "path": f"{F.MODALITIES_DIR}/{m}",
            "placeholder": ph.token if ph else None,
            "placeholder_id": ph.id if ph else None,
            "parts": {p: len(src.parts.get(p, [])) for p in (ENCODER, CONNECTOR, OTHER)},
            "route": method.route_kind,
            "parameters": config["models"][i].get("parameters") or {},
            **method.manifest_modality(plan, i),
        }
    Manifest.model_validate({
        "format_version": F.FORMAT_VERSION,
        "merge_method": method.name,
        "parameters": method.manifest_parameters(config.get("parameters")),
        "base_model": str(plan.config.base_model),
        "llm": {"path": ".", "vocab_size": plan.vocab.rows, "base_vocab_size": plan.vocab.base_rows,
                "tie_word_embeddings": plan.tied_output},
        "added_tokens": [{"token": c.token, "id": c.row, "from": plan.modalities[c.source]} for c in plan.vocab.carried],
        "modalities": modalities,
        "text_route": "merged",
        "routes": method.manifest_routes(plan),
    }).write(out)
