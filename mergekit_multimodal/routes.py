"""Rebuild a modality's LLM weights (its route) from a composite on disk, one tensor at a time.

For DAMC: route_m[t] = merged[t] - sum_i lambda_i dT_i[t] + dM_m[t] (low-rank factors or dense).
For MMER: route_m[t] = merged[t] + (scale_m[t] * mask_m[t] - alpha[t]) * task_vector[t],
which is theta_base + scale_m * mask_m * tau_* (docs/methods.md). For other methods every
modality's route is the merged LLM. The companion loader builds on this.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Tuple

import torch
from mergekit.io import LazyTensorLoader, ShardedTensorIndex
from mergekit.io.lazy_tensor_loader import ShardInfo

from mergekit_multimodal import layout as L
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.masks import unpack_mask


def _loader(directory: str, basename: str) -> LazyTensorLoader:
    """mergekit's loader over `<basename>.safetensors` or its sharded index (it only knows `model`)."""
    index_path = os.path.join(directory, f"{basename}.safetensors.index.json")
    single = os.path.join(directory, f"{basename}.safetensors")
    try:
        return _open_loader(directory, basename, index_path, single)
    except CompositionError:
        raise
    except Exception as exc:  # safetensors/json/OS errors on a damaged composite
        where = index_path if os.path.exists(index_path) else single
        raise CompositionError(f"{where}: unreadable ({type(exc).__name__}: {exc}); the composite is damaged, "
                               f"compose it again or re-download it") from None


def _open_loader(directory: str, basename: str, index_path: str, single: str) -> LazyTensorLoader:
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: Dict[str, str] = json.load(f)["weight_map"]
        shards = [ShardInfo(s, [k for k, v in weight_map.items() if v == s]) for s in sorted(set(weight_map.values()))]
        return LazyTensorLoader(ShardedTensorIndex(directory, True, weight_map, shards), lazy_unpickle=False)
    if os.path.exists(single):
        return LazyTensorLoader(ShardedTensorIndex.from_file(single), lazy_unpickle=False)
    raise CompositionError(f"{directory}: no {basename}.safetensors (or index) in the composite")


def read_composite_config(path: str) -> dict:
    try:
        with open(os.path.join(path, L.COMPOSITE_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CompositionError(f"{path}: not a composite (no {L.COMPOSITE_CONFIG})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompositionError(f"{os.path.join(path, L.COMPOSITE_CONFIG)}: not valid JSON ({exc})") from None


def iter_route(path: str, modality: str, dtype: torch.dtype = torch.float32) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (causal-LM tensor name, weight) of `modality`'s route, streaming."""
    cfg = read_composite_config(path)
    if modality not in cfg["modalities"]:
        raise CompositionError(f"{path}: no modality {modality!r}; it has {', '.join(cfg['modalities'])}")
    merged = _loader(path, "model")
    routes = cfg.get("routes")
    if routes and routes.get("kind") == "damc":
        yield from _iter_damc_route(path, routes, modality, merged, dtype)
        return
    if routes:
        rdir = os.path.join(path, routes["dir"])
        tv, masks = _loader(rdir, routes["task_vector"]), _loader(rdir, routes["masks"])
    for name in merged.index.tensor_paths:
        w = merged.get_tensor(name).to(dtype)
        if routes:
            tau = tv.get_tensor(name).to(dtype)
            alpha = tv.get_tensor(L.alpha_key(name)).item()
            mask = unpack_mask(masks.get_tensor(L.mask_key(modality, name)), w.shape)
            scale = masks.get_tensor(L.scale_key(modality, name)).item()
            w = w + (scale * mask.to(dtype) - alpha) * tau
        yield name, w


def _iter_damc_route(path, routes, modality, merged, dtype):
    """DAMC: merged + delta_m (densified), or merged - text:B @ text:A + m:B @ m:A (low-rank)."""
    rdir = os.path.join(path, routes["dir"])
    ld = _loader(rdir, routes["damc"])
    have = set(ld.index.tensor_paths)
    for name in merged.index.tensor_paths:
        w = merged.get_tensor(name).to(dtype)
        if L.damc_key(modality, name) in have:
            w = w + ld.get_tensor(L.damc_key(modality, name)).to(dtype)
        for route, sign in ((L.TEXT_ROUTE, -1.0), (modality, 1.0)):
            if L.damc_key(route, name, "A") in have:
                a = ld.get_tensor(L.damc_key(route, name, "A")).to(dtype)
                b = ld.get_tensor(L.damc_key(route, name, "B")).to(dtype)
                w = w + sign * (b @ a)
        yield name, w
