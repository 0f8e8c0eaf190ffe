"""Any merge method registered in mergekit (linear, ties, dare_ties, slerp, ...) as a composite's LLM merge.

This is NaiveMC generalised: encoders and connectors are reused, and the LLM is merged by a
mergekit method through its own public API (`mergekit.merge_methods.merge_tensors`), so every
mergekit method, present and future, works without code here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, ParameterScope

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, TensorParams


class MergekitMethod(CompositeMethod):
    """Adapter: binds the YAML parameters to a mergekit method's spec and merges one tensor group.

    Not chunkable: mergekit methods may use whole-tensor statistics (TIES' top-k, SLERP's norms).
    """

    def __init__(self, name: str):
        self.kernel = merge_methods.get(name)
        self.uses_base = self.kernel.spec.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)

    def check_parameters(self, global_params, source_params, where):
        super().check_parameters(global_params, source_params, where)
        for p in self.parameters:
            if p.required and p.name not in global_params and not all(p.name in sp for sp in source_params):
                raise CompositionError(f"{where}: merge_method {self.name} needs parameter {p.name!r}")

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state=None) -> MergeOutput:
        ids = [f"source{i}" for i in range(len(sources))]
        tensors = list(sources)
        base_index = None
        if self.uses_base and base is not None:
            tensors = [base] + tensors
            ids = ["base"] + ids
            base_index = 0
        bound: dict[str, Any] = {}
        for p in self.parameters:
            if p.scope == ParameterScope.SHARED:
                if params.shared.get(p.name) is not None:
                    bound[p.name] = params.shared[p.name]
                continue
            values: Mapping[str, Any] = dict(zip(ids[-len(sources):], params.per_source[p.name]))
            if any(v is None for v in values.values()):
                continue  # mergekit applies its default
            if p.scope == ParameterScope.INPUT and base_index is not None:
                values = {"base": params.shared.get(p.name) if params.shared.get(p.name) is not None else p.default,
                          **values}
            bound[p.name] = values
        merged = merge_methods.merge_tensors(tensors, self.kernel, parameters=bound, ids=ids, base_index=base_index)
        return MergeOutput(merged.to(sources[0].dtype))
