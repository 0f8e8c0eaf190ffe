"""LLM merge methods of a composite, and their registration in mergekit's registry.

`naive_mc`, `mmer` and `damc` are registered in mergekit on import, so `mergekit.merge.run_merge`
accepts them for plain (text-only) configs too: there they produce the merged LLM, i.e. the
text route. The per-modality parts (encoders, masks) only exist in a composite
(`mergekit_multimodal.compose`, `mergekit-mm-yaml`).
"""

from __future__ import annotations

from typing import Optional

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, ParameterScope, ParameterSpec

from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, Routes, TensorParams
from mergekit_multimodal.methods.damc import DAMC
from mergekit_multimodal.methods.mergekit_method import MergekitMethod
from mergekit_multimodal.methods.mmer import MMER
from mergekit_multimodal.methods.naive_mc import NaiveMC

_OWN = {m.name: m for m in (NaiveMC(), MMER(), DAMC())}


def get_method(name: str) -> CompositeMethod:
    """Our own method by name, or any other mergekit method through the adapter."""
    return _OWN[name] if name in _OWN else MergekitMethod(name)


def _value_type(p):
    """mergekit validates values with this type; a None default (damc's lambda: 1/N) must pass."""
    vt = p.validate if p.validate in (bool, float, int, str) else str
    return Optional[vt] if p.default is None else vt


class _RegisteredComposite(GroupMergeMethod):
    """One of our methods as a mergekit method: for a plain LLM merge it computes the text route."""

    def __init__(self, method: CompositeMethod, pretty: str, url: str):
        self.composite = method
        self.spec = MergeMethodSpec(
            name=method.name,
            pretty_name=pretty,
            reference_url=url,
            contract=InputContract(base=BasePolicy.REQUIRED if method.uses_base else BasePolicy.OPTIONAL),
            parameters=tuple(
                ParameterSpec(
                    p.name,
                    _value_type(p),
                    ParameterScope.NON_BASE if p.per_source else ParameterScope.SHARED,
                    default=p.default,
                )
                for p in method.param_defs
            ),
        )

    def merge_group(self, group: TensorGroup, /, **parameters) -> torch.Tensor:
        base: Optional[torch.Tensor] = group.base.tensor.float() if group.base else None
        sources = [e.tensor.float() for e in group.non_base]
        params = TensorParams()
        for p in self.composite.param_defs:
            value = parameters[p.name]
            if p.per_source:
                params.per_source[p.name] = value.values_for(group.non_base)
            params.shared[p.name] = p.validate(value) if not p.per_source else p.default
        return self.composite.merge(base, sources, params).merged.to(group.entries[0].tensor.dtype)


def register_with_mergekit() -> None:
    """Idempotent: make naive_mc, mmer and damc known to mergekit.merge_methods.get()."""
    known = {m.spec.name for m in merge_methods.registered_methods()}
    for method, pretty, url in (
        (_OWN["naive_mc"], "NaiveMC", "https://arxiv.org/abs/2402.12750"),
        (_OWN["mmer"], "MMER", "https://arxiv.org/abs/2505.17110"),
        (_OWN["damc"], "DAMC", "https://arxiv.org/abs/2402.12750"),
    ):
        if method.name not in known:
            merge_methods.register(_RegisteredComposite(method, pretty, url))


__all__ = ["get_method", "register_with_mergekit", "CompositeMethod", "MergeOutput", "Routes", "TensorParams"]
