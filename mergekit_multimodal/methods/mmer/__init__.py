"""MMER, whole: its merge (kernel.py), what it writes beside the merged LLM and how that is read
back (outputs.py), its 1-bit masks (masks.py) and its runtime delta (runtime.py), bound here."""

from __future__ import annotations

from mergekit_multimodal.methods.mmer import outputs
from mergekit_multimodal.methods.mmer.kernel import (
    MMERKernel,
    Routes,
    elect,
    kth_largest,
    masks_for,
    mmer_merge,
    scales_from_sums,
    trim_threshold,
)
from mergekit_multimodal.methods.mmer.masks import pack_mask, unpack_mask
from mergekit_multimodal.methods.mmer.runtime import RouteDelta


class MMER(MMERKernel):
    route_kind = "mmer"
    whole_input_routes = True

    def tensor_merger(self, plan, job, params, state):
        return outputs.MMERTensorMerger(self, plan, job, params, state)

    def route_files(self, plan):
        return outputs.route_files(plan)

    def manifest_routes(self, plan):
        return outputs.manifest_routes()

    def route_basenames(self, manifest):
        return outputs.route_basenames(manifest)

    def check_routes(self, path, manifest, llm_shapes):
        return outputs.check_routes(path, manifest, llm_shapes)

    def read_deltas(self, path, manifest, modalities, dtype, skip=(), only=None):
        return outputs.read_deltas(path, manifest, modalities, dtype, skip, only)


METHOD = MMER()

__all__ = ["METHOD", "MMER", "Routes", "RouteDelta", "elect", "kth_largest", "masks_for", "mmer_merge",
           "pack_mask", "scales_from_sums", "trim_threshold", "unpack_mask"]
