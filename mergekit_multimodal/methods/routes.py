"""Rebuild a modality's LLM weights (its route) from a composite on disk, one tensor at a time.

The merged LLM plus the method's delta for that modality (the method's own reader,
`read_deltas`: MMER merged + (scale_m * mask_m - alpha) * tau_*; DAMC merged - text + modality
factors, or a dense delta); for methods without routes every modality's route is the merged LLM.
The example and the tests check routes with it; the loader builds on the same readers.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from mergekit_multimodal.format.manifest import Manifest
from mergekit_multimodal.format.tensors import open_stream


def iter_route(path: str, modality: str, dtype: torch.dtype = torch.float32) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (causal-LM tensor name, weight) of `modality`'s route, streaming."""
    from mergekit_multimodal.methods import get_method

    manifest = Manifest.read(path)
    manifest.modality(modality, path)
    merged = open_stream(path, "model")
    method = get_method(manifest.merge_method) if manifest.routes else None
    route = manifest.route_ids().get(modality)
    for name in merged.index.tensor_paths:
        w = merged.get_tensor(name).to(dtype)
        if method is not None:
            delta = method.read_deltas(path, manifest, list(manifest.modalities), dtype, only=(name,)).get(name)
            if delta is not None:
                w = delta.apply(w, route)
        yield name, w
