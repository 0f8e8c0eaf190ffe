"""What DAMC writes beside the merged LLM, and how it is read back (docs/format.md).

routes/damc*.safetensors    "text/<tensor>:A|B" (lambda-scaled text factors), "<modality>/<tensor>:A|B"
                            (modality factors), or with densify "<modality>/<tensor>" (dense route delta)
modalities/<m>/prefix_suffix.safetensors   "prefix", "suffix" [n, hidden]: the learned embeddings placed
                            around the modality's item features

route_m[t] = merged[t] - text[t]:B @ text[t]:A + m[t]:B @ m[t]:A   (low rank)
route_m[t] = merged[t] + delta_m[t]                                 (densify)
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from mergekit_multimodal.compose.writer import Entry
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.format.files import MODALITIES_DIR, PREFIX_SUFFIX_FILE, ROUTES_DIR
from mergekit_multimodal.format.manifest import Manifest, RoutesEntry
from mergekit_multimodal.format.tensors import check_finite, header_shapes, open_stream, weights_file
from mergekit_multimodal.methods.base import RouteFile, TensorMerger
from mergekit_multimodal.methods.damc.kernel import lambdas_of, text_route
from mergekit_multimodal.methods.damc.runtime import DenseDelta, LowRankDelta

DAMC = "damc"
TEXT_ROUTE = "text"
LOW_RANK_FORMULA = "route_m[t] = merged[t] - text[t]:B @ text[t]:A + m[t]:B @ m[t]:A"
DENSE_FORMULA = "route_m[t] = merged[t] + delta_m[t]"


class DAMCRoutes(RoutesEntry):
    """composite_config.json's `routes` for DAMC."""

    damc: str = DAMC
    low_rank: bool
    formula: str


def damc_key(route: str, tensor: str, factor: str = "") -> str:
    """DAMC route tensors: `<route>/<tensor>:A`, `:B` (low-rank) or `<route>/<tensor>` (dense)."""
    return f"{route}/{tensor}:{factor}" if factor else f"{route}/{tensor}"


def _routed(plan, name: str) -> bool:
    return any(name in d.text or name in d.modality for d in plan.method_state)


def _dense(plan, name: str) -> bool:
    """Dense route deltas for this tensor: asked for (`densify`), or some source's delta is dense."""
    if plan.global_params.get("densify", False):
        return True
    return any(getattr(d.get(name), "rank", 0) is None for dec in plan.method_state for d in (dec.text, dec.modality))


def route_files(plan) -> List[RouteFile]:
    """Every DAMC route tensor with its shape, planned before any is written."""
    entries = []
    for j in plan.jobs:
        if not _routed(plan, j.name):
            continue
        out_f, in_f = j.shape
        if _dense(plan, j.name):
            entries += [Entry(damc_key(m, j.name), j.shape, j.out_dtype) for m in plan.modalities]
            continue
        rank = sum(d.text[j.name].rank for d in plan.method_state if j.name in d.text)
        if rank:
            entries += [Entry(damc_key(TEXT_ROUTE, j.name, "A"), (rank, in_f), j.out_dtype),
                        Entry(damc_key(TEXT_ROUTE, j.name, "B"), (out_f, rank), j.out_dtype)]
        for m, d in zip(plan.modalities, plan.method_state):
            if j.name in d.modality:
                r = d.modality[j.name].rank
                entries += [Entry(damc_key(m, j.name, "A"), (r, in_f), j.out_dtype),
                            Entry(damc_key(m, j.name, "B"), (out_f, r), j.out_dtype)]
    return [RouteFile(DAMC, entries)]


class DAMCTensorMerger(TensorMerger):
    """Text route W0 + sum_i lambda_i dT_i, the text deltas densified row chunk by row chunk; then
    the tensor's route factors (or dense deltas)."""

    def __init__(self, method, plan, job, params, state):
        super().__init__(method, plan, job, params, state)
        self.lambdas = lambdas_of(params, len(plan.sources))

    def merge_chunk(self, rows, base, sources):
        name, dtype = self.job.name, self.plan.compute_dtype
        deltas = [d.text[name].dense(rows, dtype).to(base.device) if name in d.text else None
                  for d in self.plan.method_state]
        return text_route(base, deltas, self.lambdas)

    def finish(self, writers) -> None:
        """Route m = merged - sum_i lambda_i dT_i + dM_m: its factors, or (dense) the dense delta."""
        plan, job, writer = self.plan, self.job, writers[DAMC]
        if not _routed(plan, job.name):
            return
        dt = job.out_dtype
        texts = [(lam, d.text[job.name]) for lam, d in zip(self.lambdas, plan.method_state) if job.name in d.text]
        if _dense(plan, job.name):
            text = sum((lam * lr.dense() for lam, lr in texts), torch.zeros(job.shape))
            for m, d in zip(plan.modalities, plan.method_state):
                mod = d.modality[job.name].dense() if job.name in d.modality else 0.0
                writer.write(damc_key(m, job.name), (mod - text).to(dt))
            return
        if texts:
            writer.write(damc_key(TEXT_ROUTE, job.name, "A"), torch.cat([lr.A.float() for _, lr in texts]).to(dt))
            writer.write(damc_key(TEXT_ROUTE, job.name, "B"),
                         torch.cat([lr.B.float() * (lam * lr.scale) for lam, lr in texts], dim=1).to(dt))
        for m, d in zip(plan.modalities, plan.method_state):
            if job.name in d.modality:
                lr = d.modality[job.name]
                writer.write(damc_key(m, job.name, "A"), lr.A.to(dt))
                writer.write(damc_key(m, job.name, "B"), (lr.B.float() * lr.scale).to(dt))


def write_modality(plan, i: int, directory: str) -> None:
    """The source's learned prefix/suffix embeddings, next to its encoder."""
    dec = plan.method_state[i]
    if dec.prefix is not None or dec.suffix is not None:
        from safetensors.torch import save_file

        tokens = {k: t.contiguous() for k, t in (("prefix", dec.prefix), ("suffix", dec.suffix)) if t is not None}
        save_file(tokens, os.path.join(directory, PREFIX_SUFFIX_FILE))


def manifest_modality(plan, i: int) -> dict:
    dec, m = plan.method_state[i], plan.modalities[i]
    out = {"adapters": {"source": plan.config.models[i].adapters, "form": dec.form, "name": dec.adapter}}
    if dec.encoders:  # what a ModelCompose release says it was trained with
        out["adapters"]["encoders"] = dec.encoders
    if dec.prefix is not None or dec.suffix is not None:
        out["prefix_suffix"] = f"{MODALITIES_DIR}/{m}/{PREFIX_SUFFIX_FILE}"
    return out


def manifest_routes(plan) -> dict:
    dense = bool(plan.global_params.get("densify", False))
    return DAMCRoutes(kind="damc", dir=ROUTES_DIR, low_rank=not dense,
                      formula=DENSE_FORMULA if dense else LOW_RANK_FORMULA).model_dump()


def routes_of(manifest: Manifest) -> DAMCRoutes:
    return DAMCRoutes.model_validate(manifest.routes.model_dump())


def check_routes(path: str, manifest: Manifest, llm_shapes) -> None:
    """Every route tensor names the text route or a modality and a 2-D merged LLM tensor [out, in]
    and has its dtype; a dense delta is [out, in]; factors come in pairs A [r, in], B [out, r]."""
    routes = routes_of(manifest)
    rdir = os.path.join(path, routes.dir)
    found = header_shapes(rdir, routes.damc)
    file = weights_file(rdir, routes.damc)
    ranks: Dict[tuple, Dict[str, tuple]] = {}
    for key, (shape, dt) in sorted(found.items()):
        route, _, rest = key.partition("/")
        tensor, _, factor = rest.partition(":")
        if route != TEXT_ROUTE and route not in manifest.modalities:
            raise CompositionError(f"{file}: route tensor {key!r} names no modality of the composite")
        if tensor not in llm_shapes:
            raise CompositionError(f"{file}: route tensor {key!r} names no tensor of the merged LLM")
        want, want_dt = llm_shapes[tensor]
        if dt != want_dt or factor not in ("", "A", "B") or (not factor and tuple(shape) != tuple(want)) \
                or (factor and (len(shape) != 2 or len(want) != 2)):
            raise CompositionError(f"{file}: route tensor {key!r} is {dt} {list(shape)}, which does not fit "
                                   f"{tensor!r} ({want_dt} {list(want)})")
        if factor:
            ranks.setdefault((route, tensor), {})[factor] = tuple(shape)
    for (route, tensor), f in ranks.items():
        out_f, in_f = llm_shapes[tensor][0]
        a, b = f.get("A"), f.get("B")
        if a is None or b is None:
            missing = damc_key(route, tensor, "A" if a is None else "B")
            raise CompositionError(f"{file}: tensor {missing!r} is missing (its pair is there)")
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise CompositionError(f"{file}: factors of {route}/{tensor} are A {list(a)}, B {list(b)}; "
                                   f"expected A [r, {in_f}], B [{out_f}, r]")


def read_deltas(path: str, manifest: Manifest, modalities: Sequence[str], dtype: torch.dtype,
                skip: Iterable[str] = (), only: Optional[Iterable[str]] = None):
    """LoRA factors per route (`LowRankDelta`) or dense deltas (`DenseDelta`), route ids from the manifest."""
    routes = routes_of(manifest)
    rdir = os.path.join(path, routes.dir)
    ld = open_stream(rdir, routes.damc)
    route_of = manifest.route_ids()
    skip, only = set(skip), None if only is None else set(only)
    grouped: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}  # tensor -> route -> factor -> tensor
    for key in ld.index.tensor_paths:
        route, _, rest = key.partition("/")
        tensor, _, factor = rest.partition(":")
        if tensor in skip or (only is not None and tensor not in only):
            continue
        if route != TEXT_ROUTE and route not in route_of:
            raise CompositionError(f"{rdir}: route tensor {key!r} names no modality of the composite")
        if route != TEXT_ROUTE and route not in modalities:
            continue
        value = ld.get_tensor(key)
        check_finite(value, weights_file(rdir, routes.damc), key)
        grouped.setdefault(tensor, {}).setdefault(route, {})[factor or "dense"] = value.to(dtype)
    deltas = {}
    for tensor, routes_ in grouped.items():
        try:
            if any("dense" in d for d in routes_.values()):  # densify, or a dense source delta
                deltas[tensor] = DenseDelta({route_of[m]: d["dense"] for m, d in routes_.items()})
                continue
            text = routes_.pop(TEXT_ROUTE, None)
            deltas[tensor] = LowRankDelta(None if text is None else (text["A"], text["B"]),
                                          {route_of[m]: (d["A"], d["B"]) for m, d in routes_.items()})
        except KeyError as exc:
            raise CompositionError(f"{rdir}: route data for {tensor!r} is incomplete (missing {exc})") from None
    return deltas
