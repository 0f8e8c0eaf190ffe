"""Checkpoint families we can read, one small file each; `layout_for` picks one for a config.json.

Adding a family: write `families/<name>.py` with a `FAMILY = Family(...)` and list it below.
"""

from __future__ import annotations

from typing import Optional

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import (
    causal_lm,
    llava,
    llava_next_video,
    mistral3,
    point_cloud,
    qwen2_audio,
    video_llava,
    voxtral,
)
from mergekit_multimodal.families.base import (
    CONNECTOR,
    ENCODER,
    LLM,
    OTHER,
    Family,
    SplitLayout,
    override_layout,
)

FAMILIES = tuple(
    m.FAMILY for m in (llava, video_llava, llava_next_video, qwen2_audio, mistral3, voxtral, point_cloud)
)
_BY_ARCHITECTURE = {arch: fam for fam in FAMILIES for arch in fam.architectures}


def layout_for(config: dict, where: str, override=None) -> SplitLayout:
    """The layout of a checkpoint, from its config.json `architectures` or a YAML override."""
    if override is not None:
        return override_layout(
            override.llm_prefix, override.lm_head, override.modality_prefixes, override.placeholder_config_key
        )
    archs = config.get("architectures") or []
    arch: Optional[str] = archs[0] if archs else None
    if arch in _BY_ARCHITECTURE:
        return SplitLayout(_BY_ARCHITECTURE[arch])
    if arch and (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        return SplitLayout(causal_lm.FAMILY)
    known = ", ".join(sorted(_BY_ARCHITECTURE)) + ", any *ForCausalLM"
    raise CompositionError(
        f"{where}: unknown architecture {arch!r}. Known: {known}. For another architecture add a "
        "`layout:` block to this model in the YAML (llm_prefix, lm_head, modality_prefixes, "
        "placeholder_config_key); see docs/config.md."
    )


__all__ = ["FAMILIES", "Family", "SplitLayout", "layout_for", "LLM", "ENCODER", "CONNECTOR", "OTHER"]
