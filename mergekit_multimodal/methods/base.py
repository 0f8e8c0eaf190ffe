"""What every LLM merge method of a composite returns, and how its YAML parameters are resolved.

A method sees, for one LLM tensor, the base tensor and one tensor per source (all float32,
same shape) and returns the merged tensor (the text route) plus, for methods that decouple
modalities, whatever the loader needs to rebuild each modality's route.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from mergekit.config import ParameterSetting, evaluate_setting
from pydantic import TypeAdapter

from mergekit_multimodal.errors import CompositionError

_SETTING = TypeAdapter(ParameterSetting)


@dataclass
class Routes:
    """MMER's per-modality routes for one tensor (or row chunk): route_i = base + s_i * masks[i] * task_vector.

    s_i = tau_l1[i] / masked_l1[i] when rescaling (EMR), else 1; the sums are kept so the
    engine can add them up over the row chunks of a tensor before dividing.
    """

    task_vector: torch.Tensor
    masks: List[torch.Tensor]
    tau_l1: List[float]
    masked_l1: List[float]
    rescale: bool = False

    @property
    def scales(self) -> List[float]:
        return scales_from_sums(self.tau_l1, self.masked_l1, self.rescale)


def scales_from_sums(tau_l1: Sequence[float], masked_l1: Sequence[float], rescale: bool) -> List[float]:
    if not rescale:
        return [1.0] * len(tau_l1)
    return [n / d if d > 0 else 1.0 for n, d in zip(tau_l1, masked_l1)]


@dataclass
class MergeOutput:
    merged: torch.Tensor
    routes: Optional[Routes] = None


@dataclass(frozen=True)
class ParamDef:
    """A YAML parameter a method takes: `per_source` ones may be set under each model."""

    name: str
    default: Any
    per_source: bool = False
    validate: Any = float
    help: str = ""


@dataclass
class TensorParams:
    """Parameters resolved for one tensor (filters and layer gradients already applied)."""

    shared: Dict[str, Any] = field(default_factory=dict)
    per_source: Dict[str, List[Any]] = field(default_factory=dict)


class CompositeMethod(ABC):
    """An LLM merge for composites. Subclasses: one file each under methods/."""

    name: str
    uses_base: bool = True
    param_defs: Sequence[ParamDef] = ()
    #: every output element depends only on the same element of the inputs (given `prepare`'s
    #: state), so the engine may merge a tensor in row chunks and keep memory bounded
    chunkable: bool = False

    def prepare(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
                dtype: Optional[torch.dtype] = None) -> Any:
        """Whole-tensor statistics a chunked merge needs (e.g. TIES thresholds), computed in `dtype`."""
        return None

    @abstractmethod
    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state: Any = None) -> MergeOutput:
        ...

    def check_parameters(self, global_params: Mapping[str, Any], source_params: Sequence[Mapping[str, Any]], where: str):
        """Unknown names are errors here, before any tensor is read (mergekit would ignore them)."""
        shared = {p.name for p in self.param_defs}
        per_source = {p.name for p in self.param_defs if p.per_source}
        for key in global_params:
            if key not in shared:
                raise CompositionError(
                    f"{where}: unknown parameter {key!r} for merge_method {self.name}; "
                    f"it takes {', '.join(sorted(shared)) or 'none'}"
                )
        for i, params in enumerate(source_params):
            for key in params:
                if key not in per_source:
                    raise CompositionError(
                        f"{where}: models[{i}].parameters.{key} is not a per-model parameter of "
                        f"{self.name}; per-model parameters: {', '.join(sorted(per_source)) or 'none'}"
                    )
        # Resolve once for a dummy tensor so a bad value fails now, not mid-merge.
        self.resolve("model.layers.0.mlp.down_proj.weight", 0.0, global_params, source_params)

    def resolve(self, tensor_name: str, t: float, global_params: Mapping[str, Any],
                source_params: Sequence[Mapping[str, Any]]) -> TensorParams:
        """Apply mergekit's filter/gradient semantics (`evaluate_setting`) for one tensor."""
        out = TensorParams()
        for p in self.param_defs:
            def value(setting):
                if setting is None:
                    return p.default
                try:
                    v = evaluate_setting(tensor_name, _SETTING.validate_python(setting), t, validate=p.validate)
                except Exception as exc:  # pydantic / ValueError from the validator
                    raise CompositionError(f"parameter {p.name}: invalid value {setting!r} ({exc})") from None
                return p.default if v is None else v

            out.shared[p.name] = value(global_params.get(p.name))
            if p.per_source:
                out.per_source[p.name] = [
                    value(sp.get(p.name, global_params.get(p.name))) for sp in source_params
                ]
        return out
