"""What MMER writes beside the merged LLM, and how it is read back (docs/format.md).

routes/task_vector*.safetensors   tau_* per LLM tensor (composite names) and "<tensor>:alpha" -> float32 scalar
routes/masks*.safetensors         "<modality>/<tensor>" -> uint8, 1 bit per parameter (LSB first)
                                  and "<modality>/<tensor>:scale" -> float32 scalar

route_m[t] = merged[t] + (scale_m[t] * unpack(mask_m[t]) - alpha[t]) * task_vector[t]
           = theta_base + scale_m * mask_m * tau_*   (docs/methods.md)
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from mergekit_multimodal.compose.writer import Entry
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.format.files import COMPOSITE_CONFIG as COMPOSITE, ROUTES_DIR
from mergekit_multimodal.format.manifest import Manifest, RoutesEntry
from mergekit_multimodal.format.tensors import check_finite, header_shapes, open_stream, weights_file
from mergekit_multimodal.methods.base import RouteFile, TensorMerger
from mergekit_multimodal.methods.mmer.kernel import scales_from_sums
from mergekit_multimodal.methods.mmer.masks import pack_mask
from mergekit_multimodal.methods.mmer.runtime import RouteDelta

TASK_VECTOR = "task_vector"
MASKS = "masks"
FORMULA = "route_m[t] = merged[t] + (scale_m[t] * unpack(mask_m[t]) - alpha[t]) * task_vector[t]"


class MMERRoutes(RoutesEntry):
    """composite_config.json's `routes` for MMER."""

    task_vector: str = TASK_VECTOR
    masks: str = MASKS
    formula: str = FORMULA
    mask_bit_order: str = "little"


def mask_key(modality: str, tensor: str) -> str:
    return f"{modality}/{tensor}"


def scale_key(modality: str, tensor: str) -> str:
    return f"{modality}/{tensor}:scale"


def alpha_key(tensor: str) -> str:
    return f"{tensor}:alpha"


def route_files(plan) -> List[RouteFile]:
    tv, masks = [], []
    for j in plan.jobs:
        tv += [Entry(j.name, j.shape, j.out_dtype), Entry(alpha_key(j.name), (), torch.float32)]
        packed = ((math.prod(j.shape) + 7) // 8,)
        for m in plan.modalities:
            masks += [Entry(mask_key(m, j.name), packed, torch.uint8), Entry(scale_key(m, j.name), (), torch.float32)]
    return [RouteFile(TASK_VECTOR, tv), RouteFile(MASKS, masks)]


class MMERTensorMerger(TensorMerger):
    """Collects tau_*, the masks and the rescale sums over a tensor's row chunks, then writes them."""

    def __init__(self, method, plan, job, params, state):
        super().__init__(method, plan, job, params, state)
        n = len(plan.sources)
        self.tau = torch.zeros(job.shape, dtype=job.out_dtype)
        self.masks = [torch.zeros(job.shape, dtype=torch.bool) for _ in range(n)]
        self.tau_l1, self.masked_l1, self.rescale = [0.0] * n, [0.0] * n, False

    def merge_chunk(self, rows, base, sources):
        res = self.method.merge(base, sources, self.params, self.state)
        routes = res.routes
        self.tau[rows] = routes.task_vector.to("cpu", self.job.out_dtype)
        for i, m in enumerate(routes.masks):
            self.masks[i][rows] = m.to("cpu")
        self.tau_l1 = [a + b for a, b in zip(self.tau_l1, routes.tau_l1)]
        self.masked_l1 = [a + b for a, b in zip(self.masked_l1, routes.masked_l1)]
        self.rescale = routes.rescale
        return res.merged

    def finish(self, writers) -> None:
        name = self.job.name
        writers[TASK_VECTOR].write(name, self.tau)
        writers[TASK_VECTOR].write(alpha_key(name), torch.tensor(float(self.params.shared["alpha"]), dtype=torch.float32))
        scales = scales_from_sums(self.tau_l1, self.masked_l1, self.rescale)
        for modality, mask, scale in zip(self.plan.modalities, self.masks, scales):
            writers[MASKS].write(mask_key(modality, name), pack_mask(mask))
            writers[MASKS].write(scale_key(modality, name), torch.tensor(scale, dtype=torch.float32))


def manifest_routes() -> dict:
    return MMERRoutes(kind="mmer", dir=ROUTES_DIR).model_dump()


def routes_of(manifest: Manifest) -> MMERRoutes:
    return MMERRoutes.model_validate(manifest.routes.model_dump())


def route_basenames(manifest: Manifest) -> List[str]:
    routes = routes_of(manifest)
    return [routes.task_vector, routes.masks]


def check_routes(path: str, manifest: Manifest, llm_shapes) -> None:
    """Every merged LLM tensor has its tau_* (same shape and dtype) and alpha scalar; every modality
    a mask of ceil(numel / 8) uint8 bytes and a float32 scale per tensor; no tensor else."""
    routes = routes_of(manifest)
    rdir = os.path.join(path, routes.dir)
    tv, masks = header_shapes(rdir, routes.task_vector), header_shapes(rdir, routes.masks)
    tv_file, mask_file = weights_file(rdir, routes.task_vector), weights_file(rdir, routes.masks)

    def need(found, file, key, shape, dtype):
        if key not in found:
            raise CompositionError(f"{file}: tensor {key!r} is missing (the route of {key.split(':')[0]!r})")
        got_shape, got_dtype = found[key]
        if tuple(got_shape) != tuple(shape) or (dtype is not None and got_dtype != dtype):
            raise CompositionError(f"{file}: tensor {key!r} is {got_dtype} {list(got_shape)}; "
                                   f"expected {dtype or got_dtype} {list(shape)}")

    want_tv, want_masks = set(), set()
    for name, (shape, dtype) in llm_shapes.items():
        need(tv, tv_file, name, shape, dtype)
        need(tv, tv_file, alpha_key(name), (), "F32")
        want_tv |= {name, alpha_key(name)}
        packed = ((math.prod(shape) + 7) // 8,)
        for m in manifest.modalities:
            need(masks, mask_file, mask_key(m, name), packed, "U8")
            need(masks, mask_file, scale_key(m, name), (), "F32")
            want_masks |= {mask_key(m, name), scale_key(m, name)}
    for found, want, file in ((tv, want_tv, tv_file), (masks, want_masks, mask_file)):
        extra = sorted(set(found) - want)
        if extra:
            raise CompositionError(f"{file}: unexpected tensor(s) {extra[:5]}: no such tensor or modality in "
                                   f"the merged LLM / {COMPOSITE}")


def _scalar(t: torch.Tensor, file: str, key: str) -> float:
    if t.numel() != 1 or not bool(torch.isfinite(t).all()):
        raise CompositionError(f"{file}: tensor {key!r} must be one finite number, got {t.flatten()[:4].tolist()}")
    return t.item()


def read_deltas(path: str, manifest: Manifest, modalities: Sequence[str], dtype: torch.dtype,
                skip: Iterable[str] = (), only: Optional[Iterable[str]] = None) -> Dict[str, RouteDelta]:
    """One RouteDelta per routed LLM tensor: tau_* in `dtype`, masks kept packed."""
    routes = routes_of(manifest)
    rdir = os.path.join(path, routes.dir)
    tv, masks = open_stream(rdir, routes.task_vector), open_stream(rdir, routes.masks)
    tv_file, mask_file = weights_file(rdir, routes.task_vector), weights_file(rdir, routes.masks)
    skip = set(skip)
    names = tv.index.tensor_paths if only is None else [n for n in only if n in tv.index.tensor_paths]
    deltas = {}
    for name in names:  # with `only`, just those (iter_route asks one tensor at a time)
        if name.endswith(":alpha") or name in skip:
            continue
        try:
            tau = tv.get_tensor(name)
            check_finite(tau, tv_file, name)
            packed = [masks.get_tensor(mask_key(m, name)) for m in modalities]
            want = (tau.numel() + 7) // 8
            for m, p in zip(modalities, packed):
                if p.dtype != torch.uint8 or p.numel() != want:
                    raise CompositionError(f"{mask_file}: mask {mask_key(m, name)!r} is {p.dtype} with {p.numel()} "
                                           f"byte(s); expected uint8 with ceil({tau.numel()} / 8) = {want}")
            deltas[name] = RouteDelta(
                tau.to(dtype), packed,
                [_scalar(masks.get_tensor(scale_key(m, name)), mask_file, scale_key(m, name)) for m in modalities],
                _scalar(tv.get_tensor(alpha_key(name)), tv_file, alpha_key(name)),
            )
        except KeyError as exc:
            raise CompositionError(f"{rdir}: route data for {name!r} is incomplete (missing {exc})") from None
    return deltas
