"""What a composite merge method is: the protocol the engine, the plan, the loader and push
validation call, so none of them names a method.

A method lives in one folder (`methods/<name>/`) and binds every part of its life in one
`CompositeMethod` value (see `methods/mmer/__init__.py`):

- **parameters, declared once**: its mergekit kernel's signature is the parameter list (as in
  mergekit's `merge_methods/linear.py`); `composite_kernel` builds mergekit's `MergeMethodSpec`
  from it, and that same kernel is what mergekit's `run_merge` runs on plain configs (the text route);
- **merge a chunk**: `merge(base, sources, params, state)` for one row chunk of one LLM tensor;
- **write extras**: `route_files(plan)` plans the tensors it writes beside the merged LLM
  (under `routes/`), `tensor_merger` accumulates a tensor's chunks and writes them, and
  `manifest_routes` / `manifest_modality` describe them in composite_config.json;
- **read routes and build the runtime delta**: `read_deltas(path, manifest, modalities, dtype)`
  gives one delta module per routed LLM tensor, which the loader installs (runtime/routing.py)
  and `methods.routes.iter_route` streams.

A method that only merges the LLM (NaiveMC, any mergekit method) implements `merge` alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from mergekit.config import ParameterSetting, evaluate_setting
from mergekit.merge_methods.base import MergeMethod, ParameterScope, ParameterSpec
from mergekit.merge_methods.easy_define import merge_method
from pydantic import TypeAdapter

from mergekit_multimodal.errors import CompositionError

if TYPE_CHECKING:
    from mergekit_multimodal.compose.plan import CompositePlan, TensorJob
    from mergekit_multimodal.compose.writer import Entry, PlannedShardWriter
    from mergekit_multimodal.format.manifest import Manifest

_SETTING = TypeAdapter(ParameterSetting)


def composite_kernel(**spec_options) -> Callable[[Callable], MergeMethod]:
    """mergekit's `merge_method` decorator (the signature is the parameter list), plus one rule: a
    parameter spelled `name_` in Python is the YAML key `name` (for keywords such as `lambda`).
    mergekit's decorator cannot take a Python keyword as a parameter name, hence this wrapper."""

    def wrap(func: Callable) -> MergeMethod:
        method = merge_method(func, **spec_options)
        renamed = {p.name: p.name[:-1] for p in method.spec.parameters if p.name.endswith("_")}
        if renamed:
            params = tuple(dataclasses.replace(p, name=renamed.get(p.name, p.name)) for p in method.spec.parameters)
            method.spec = dataclasses.replace(method.spec, parameters=params)
            python_name = {yaml: py for py, yaml in renamed.items()}
            method.implementation = lambda group, **kw: func(group, **{python_name.get(k, k): v for k, v in kw.items()})
        return method

    return wrap


def default_of(p: ParameterSpec) -> Any:
    """A parameter's default; None for a required one (the YAML must then set it)."""
    return None if p.required else p.default


@dataclass
class TensorParams:
    """Parameters resolved for one tensor (filters and layer gradients already applied)."""

    shared: Dict[str, Any] = field(default_factory=dict)
    per_source: Dict[str, List[Any]] = field(default_factory=dict)


@dataclass
class MergeOutput:
    merged: torch.Tensor
    #: per-modality extras of this chunk, for methods that write routes (MMER: its `Routes`)
    routes: Any = None


@dataclass
class RouteFile:
    """One safetensors stream a method writes under routes/, with every tensor planned up front."""

    basename: str
    entries: List["Entry"]


class TensorMerger:
    """Merges one LLM tensor chunk by chunk, then writes what the method keeps beside it.

    The default merges each chunk with `method.merge` and writes nothing else. `merge_chunk`'s `rows`
    are the chunk's rows in the output tensor: a slice, or an index tensor of rows where carried rows
    lie inside the base's (compose/vocab.py: `VocabPlan.merged_ranges`); rows no chunk covers are
    no merge input, and what a merger keeps for them stays zero.
    """

    def __init__(self, method: "CompositeMethod", plan: "CompositePlan", job: "TensorJob", params: TensorParams,
                 state: Any):
        self.method, self.plan, self.job, self.params, self.state = method, plan, job, params, state

    def merge_chunk(self, rows: Union[slice, torch.Tensor], base: Optional[torch.Tensor], sources: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.method.merge(base, sources, self.params, self.state).merged

    def finish(self, writers: Mapping[str, "PlannedShardWriter"]) -> None:
        """Write this tensor's route tensors (writers by basename)."""


class CompositeMethod:
    """An LLM merge for composites: one folder per method under methods/ (see the module docstring)."""

    #: mergekit's constructed method: its spec is the parameter list; registered under `name`
    kernel: MergeMethod
    uses_base: bool = True
    #: the sources' LLM tensors are merge inputs (DAMC reads its deltas from adapters instead)
    reads_sources: bool = True
    #: every output element depends only on the same element of the inputs (given `prepare`'s
    #: state), so the engine may merge a tensor in row chunks and keep memory bounded
    chunkable: bool = False
    #: what a modality's LLM weights are, in composite_config.json: "merged" (the merged LLM), or
    #: this method's name when it writes per-modality routes
    route_kind: str = "merged"
    #: a one-modality input may run wholly on that modality's route (`--route auto`): true where a
    #: route rebuilds its source's own parameters (MMER); per-token routing otherwise
    whole_input_routes: bool = False

    @property
    def name(self) -> str:
        return self.kernel.spec.name

    @property
    def parameters(self) -> Sequence[ParameterSpec]:
        return self.kernel.spec.parameters

    # -- parameters ------------------------------------------------------------------------------
    def check_parameters(self, global_params: Mapping[str, Any], source_params: Sequence[Mapping[str, Any]], where: str):
        """Unknown names are errors here, before any tensor is read (mergekit would ignore them)."""
        shared = {p.name for p in self.parameters}
        per_source = {p.name for p in self.parameters if p.scope != ParameterScope.SHARED}
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
        for p in self.parameters:
            default = default_of(p)

            def value(setting, p=p, default=default):
                if setting is None:
                    return default
                try:
                    v = evaluate_setting(tensor_name, _SETTING.validate_python(setting), t, validate=p.validate)
                except Exception as exc:  # pydantic / ValueError from the validator
                    raise CompositionError(f"parameter {p.name}: invalid value {setting!r} ({exc})") from None
                return default if v is None else v

            out.shared[p.name] = value(global_params.get(p.name))
            if p.scope != ParameterScope.SHARED:
                out.per_source[p.name] = [value(sp.get(p.name, global_params.get(p.name))) for sp in source_params]
        return out

    def manifest_parameters(self, written: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """The method's defaults, overridden by what the YAML set (filters/gradients kept as written)."""
        return {**{p.name: default_of(p) for p in self.parameters if default_of(p) is not None}, **(written or {})}

    # -- planning --------------------------------------------------------------------------------
    def check_config(self, config) -> None:
        """Checks on the YAML that need no checkpoint opened."""

    def plan_sources(self, plan: "CompositePlan") -> None:
        """Read what the method needs beyond the checkpoints (DAMC: adapters) into `plan.method_state`
        and `plan.connector_overrides`, checking it against the plan."""

    # -- composing -------------------------------------------------------------------------------
    def prepare(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
                dtype: Optional[torch.dtype] = None) -> Any:
        """Whole-tensor statistics a chunked merge needs (e.g. TIES thresholds), computed in `dtype`."""
        return None

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state: Any = None) -> MergeOutput:
        raise NotImplementedError

    def tensor_merger(self, plan: "CompositePlan", job: "TensorJob", params: TensorParams, state: Any) -> TensorMerger:
        return TensorMerger(self, plan, job, params, state)

    def route_files(self, plan: "CompositePlan") -> List[RouteFile]:
        """The streams written under routes/ (none for a method without routes)."""
        return []

    def write_modality(self, plan: "CompositePlan", i: int, directory: str) -> None:
        """Extra files of source i's modality directory (DAMC: prefix/suffix embeddings)."""

    def manifest_modality(self, plan: "CompositePlan", i: int) -> Dict[str, Any]:
        """Extra fields of source i's entry in composite_config.json."""
        return {}

    def manifest_routes(self, plan: "CompositePlan") -> Optional[Dict[str, Any]]:
        """composite_config.json's `routes` entry (kind, dir, the streams' basenames, formula)."""
        return None

    # -- reading ---------------------------------------------------------------------------------
    def route_basenames(self, manifest: "Manifest") -> List[str]:
        """The route streams a composite of this method must hold (push validation)."""
        return []

    def check_routes(self, path: str, manifest: "Manifest", llm_shapes: Mapping[str, Any]) -> None:
        """Refuse a composite whose route files do not match its merged LLM (`llm_shapes`: tensor ->
        (shape, safetensors dtype), from the headers): every tensor the method routes is there, with
        its shape and dtype, and nothing else; read from the safetensors headers only (the loader
        calls it before `read_deltas`, push validation before sending anything)."""

    def read_deltas(self, path: str, manifest: "Manifest", modalities: Sequence[str], dtype: torch.dtype,
                    skip: Iterable[str] = (), only: Optional[Iterable[str]] = None) -> Dict[str, Any]:
        """One delta module per routed LLM tensor (but those in `skip`; only those in `only` if
        given), for the routes of `modalities`, route ids as in `manifest.route_ids()`: each has
        `delta(route)` and `apply(weight, route)` (runtime/routing.py)."""
        return {}
