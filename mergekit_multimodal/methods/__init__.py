"""The composite merge methods (one folder each) and their registration in mergekit's registry.

`naive_mc`, `mmer` and `damc` are registered in mergekit on import, so `mergekit.merge.run_merge`
accepts them for plain (text-only) configs too: there their kernels produce the merged LLM, i.e.
the text route. The per-modality parts (encoders, routes) only exist in a composite
(`mergekit_multimodal.compose`, `mergekit-mm-yaml`). Any other mergekit method composes through
`MergekitMethod`.
"""

from __future__ import annotations

from typing import Dict

from mergekit import merge_methods

from mergekit_multimodal.methods import damc, mmer, naive_mc
from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, TensorParams
from mergekit_multimodal.methods.mergekit_method import MergekitMethod

#: our methods by name: adding one is a folder with a `METHOD` and a line here
OWN: Dict[str, CompositeMethod] = {m.METHOD.name: m.METHOD for m in (naive_mc, mmer, damc)}


def get_method(name: str) -> CompositeMethod:
    """Our own method by name, or any other mergekit method through the adapter."""
    return OWN[name] if name in OWN else MergekitMethod(name)


def register_with_mergekit() -> None:
    """Idempotent: make naive_mc, mmer and damc known to mergekit.merge_methods.get()."""
    known = {m.spec.name for m in merge_methods.registered_methods()}
    for method in OWN.values():
        if method.name not in known:
            merge_methods.register(method.kernel)


__all__ = ["get_method", "register_with_mergekit", "CompositeMethod", "MergeOutput", "TensorParams", "OWN"]
