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
from mergekit_multimodal.format.files import ROUTES_DIR
from mergekit_multimodal.format.manifest import Manifest, RoutesEntry
from mergekit_multimodal.format.tensors import open_stream
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


def read_deltas(path: str, manifest: Manifest, modalities: Sequence[str], dtype: torch.dtype,
                skip: Iterable[str] = (), only: Optional[Iterable[str]] = None) -> Dict[str, RouteDelta]:
    """One RouteDelta per routed LLM tensor: tau_* in `dtype`, masks kept packed."""
    routes = routes_of(manifest)
    rdir = os.path.join(path, routes.dir)
    tv, masks = open_stream(rdir, routes.task_vector), open_stream(rdir, routes.masks)
    skip, only = set(skip), None if only is None else set(only)
    deltas = {}
    for name in tv.index.tensor_paths:
        if name.endswith(":alpha") or name in skip or (only is not None and name not in only):
            continue
        try:
            deltas[name] = RouteDelta(
                tv.get_tensor(name).to(dtype),
                [masks.get_tensor(mask_key(m, name)) for m in modalities],
                [masks.get_tensor(scale_key(m, name)).item() for m in modalities],
                tv.get_tensor(alpha_key(name)).item(),
            )
        except KeyError as exc:
            raise CompositionError(f"{rdir}: route data for {name!r} is incomplete (missing {exc})") from None
    return deltas
