"""The Python API: build a composite from a config, or run any YAML the way our CLI does."""

from __future__ import annotations

from typing import Optional, Union

import yaml
from pydantic import ValidationError
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_multimodal.compose.config import CompositeMergeConfig, is_composite_config, load_config
from mergekit_multimodal.compose.engine import execute_plan
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.compose.plan import build_plan


def compose(config: Union[CompositeMergeConfig, dict], out_path: str, options: Optional[MergeOptions] = None,
            *, config_source: Optional[str] = None, overwrite: bool = False) -> str:
    """Build a composite at `out_path` (complete, or not there at all) and return its path.

    >>> compose({"merge_method": "mmer", "base_model": "base",
    ...          "models": [{"model": "image-mllm", "modality": "image"}]}, "out")  # doctest: +SKIP
    """
    if isinstance(config, dict):
        config = load_config(config)
    options = options or MergeOptions()
    plan = build_plan(config, options)
    return execute_plan(plan, out_path, config_source=config_source, overwrite=overwrite)


def run_yaml(config_source: str, out_path: str, options: Optional[MergeOptions] = None, *,
             source_name: str = "config", overwrite: bool = False) -> str:
    """Run a YAML text: a composite config through `compose`, anything else through mergekit unchanged."""
    options = options or MergeOptions()
    try:
        data = yaml.safe_load(config_source)
    except yaml.YAMLError as exc:
        raise CompositionError(f"{source_name}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise CompositionError(f"{source_name}: expected a mapping at the top level")
    if is_composite_config(data):
        return compose(load_config(data, source_name), out_path, options, config_source=config_source,
                       overwrite=overwrite)
    run_merge(_plain_config(data, source_name), out_path, options=options, config_source=config_source)
    return out_path


def _plain_config(data: dict, source_name: str) -> MergeConfiguration:
    """A plain mergekit config, validated by mergekit; what mergekit would only find mid-merge (an
    unknown method) or report as a raw pydantic error becomes a CompositionError naming the key."""
    from mergekit import merge_methods

    method = data.get("merge_method")
    known = {m.spec.name for m in merge_methods.registered_methods()}
    if method is not None and method not in known:
        raise CompositionError(f"{source_name}: unknown merge_method {method!r}; known: {', '.join(sorted(known))}")
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise CompositionError(f"{source_name}: invalid mergekit config\n" + "\n".join(lines)) from None
