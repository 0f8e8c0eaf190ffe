"""The checkpoint families we read: one file each (`families/<name>.py` with a `FAMILY = Family(...)`).

Every other module asks this registry: `layout_for` (which family a config.json is),
`get_family(name)` (everything about one family), `FAMILIES`, `tiny_sources()`. The family files
are found by listing this package, so adding a family is adding one file (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Optional, Tuple

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families.base import (
    CONNECTOR,
    ENCODER,
    LLM,
    OTHER,
    OVERRIDE,
    Encoder,
    Family,
    SplitLayout,
    TinySource,
    override_layout,
)

#: modules of this package that are not families
_NOT_FAMILIES = {"base", "tiny"}


def _discover() -> Tuple[Family, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            raise TypeError(f"{module.__name__}: a family file must define FAMILY = Family(...)")
        found.append(family)
    return tuple(found)


_ALL = _discover()
_BY_NAME: Dict[str, Family] = {f.name: f for f in _ALL}
#: the multimodal families (every family but the plain causal LM and the refused ones)
FAMILIES = tuple(f for f in _ALL if not f.text_only and not f.refused)
_BY_ARCHITECTURE = {arch: fam for fam in FAMILIES for arch in fam.architectures}
_REFUSED = {arch: fam for fam in _ALL if fam.refused for arch in fam.architectures}
_CAUSAL_LM = next(f for f in _ALL if f.text_only)


def get_family(name: str, where: str = "", modality: Optional[str] = None) -> Family:
    """A family by name (as it runs under `modality`, if given); an unknown name is a clear error
    (e.g. a composite made by a newer version)."""
    if name == OVERRIDE:  # read through a `layout:` block: no family file, so no family behaviour at run time
        return Family(name=OVERRIDE, architectures=())
    try:
        return _BY_NAME[name].for_modality(modality)
    except KeyError:
        known = ", ".join(f.name for f in FAMILIES)
        raise CompositionError(f"{where + ': ' if where else ''}unknown family {name!r}; this version knows "
                               f"{known}") from None


def kind_of(family: str, modality: Optional[str] = None) -> Optional[str]:
    """The kind of media a family's modality takes (image, video, audio, point_cloud), or None."""
    fam = _BY_NAME.get(family)
    return fam.for_modality(modality).kind if fam else None


def kinds() -> Tuple[str, ...]:
    """Every kind of media some family takes (image, video, audio, point_cloud ...)."""
    return tuple(dict.fromkeys(f.kind for f in FAMILIES if f.kind))


def marker_kinds() -> Dict[str, str]:
    """Generic prompt marker name -> the kind it stands for: each kind's own name, and the other
    names families declare for it (`Family.markers`)."""
    return {**{k: k for k in kinds()}, **{m: f.kind for f in FAMILIES if f.kind for m in f.markers}}


def tiny_sources() -> Dict[str, Tuple[Family, TinySource]]:
    """Every family's tiny stand-ins by name, in seed order (tests and the example build them), each
    with its family as it runs under the stand-in's modality (LLaVA-Video: the video variant)."""
    items = [(name, (fam.for_modality(t.modality), t)) for fam in FAMILIES for name, t in fam.tiny.items()]
    return dict(sorted(items, key=lambda kv: kv[1][1].seed))


def causal_lm_class(config):
    """The causal-LM class of a merged LLM's transformers config: AutoModelForCausalLM's, else the one
    a family builds for that text model (`Family.causal_lms`: Qwen2-VL's); None if neither knows it."""
    import transformers

    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    if type(config) in mapping:
        return mapping[type(config)]
    make = next((f.causal_lms[config.model_type] for f in FAMILIES if config.model_type in f.causal_lms), None)
    return make() if make is not None else None


def layout_for(config: dict, where: str, override=None) -> SplitLayout:
    """The layout of a checkpoint, from its config.json `architectures` or a YAML override."""
    archs = config.get("architectures") or []
    arch: Optional[str] = archs[0] if archs else None
    if arch in _REFUSED:  # a `layout:` override would not make its layers line up either
        raise CompositionError(f"{where}: {arch} cannot be composed: {_REFUSED[arch].refused}.")
    if override is not None:
        return override_layout(
            override.llm_prefix, override.lm_head, override.modality_prefixes, override.placeholder_config_key
        )
    if arch in _BY_ARCHITECTURE:
        return SplitLayout(_BY_ARCHITECTURE[arch])
    if arch and (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        return SplitLayout(_CAUSAL_LM)
    known = ", ".join(sorted(_BY_ARCHITECTURE)) + ", any *ForCausalLM"
    raise CompositionError(
        f"{where}: unknown architecture {arch!r}. Known: {known}. For another architecture add a "
        "`layout:` block to this model in the YAML (llm_prefix, lm_head, modality_prefixes, "
        "placeholder_config_key); see docs/config.md."
    )


__all__ = ["FAMILIES", "Family", "Encoder", "TinySource", "SplitLayout", "get_family", "causal_lm_class", "kind_of", "kinds", "marker_kinds", "tiny_sources",
           "layout_for", "LLM", "ENCODER", "CONNECTOR", "OTHER"]
