"""What a reader needs to know about one checkpoint family: where its LLM and modality parts live.

A family is pure data. `SplitLayout` turns it (or a YAML override) into a function from a
checkpoint tensor name to (part, composite name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

#: Where the language model sits in multimodal checkpoints. transformers 5 still *writes* the
#: legacy layout; conversions since 4.52 may carry the new one. Both map onto plain causal-LM names.
MLLM_LLM_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
CAUSAL_LM_PREFIXES: Tuple[Tuple[str, str], ...] = (("model.", "model."), ("lm_head.", "lm_head."))

LLM = "llm"
ENCODER = "encoder"
CONNECTOR = "connector"
OTHER = "other"


@dataclass(frozen=True)
class Family:
    """One checkpoint family (one transformers class), described by its tensor-name prefixes."""

    name: str
    architectures: Tuple[str, ...]
    #: config.json keys that hold a placeholder token id, in order of preference
    placeholder_keys: Tuple[str, ...] = ()
    #: prefixes in the legacy layout; the transformers-5 layout (`model.` + prefix) is matched too
    encoder_prefixes: Tuple[str, ...] = ()
    connector_prefixes: Tuple[str, ...] = ()
    llm_prefixes: Tuple[Tuple[str, str], ...] = MLLM_LLM_PREFIXES
    #: True for a plain causal LM: there is no modality part, and a placeholder is never needed
    text_only: bool = False


@dataclass(frozen=True)
class SplitLayout:
    """Classifies checkpoint tensor names into LLM / encoder / connector / other parts."""

    family: Family
    exact_llm: Dict[str, str] = field(default_factory=dict)

    def classify(self, name: str) -> Tuple[str, str]:
        """Return (part, name): for the LLM part the causal-LM name, else the name unchanged."""
        if name in self.exact_llm:
            return LLM, self.exact_llm[name]
        for src, dst in self.family.llm_prefixes:
            if name.startswith(src):
                return LLM, dst + name[len(src):]
        stripped = name[len("model."):] if name.startswith("model.") else name
        if any(stripped.startswith(p) for p in self.family.encoder_prefixes):
            return ENCODER, name
        if any(stripped.startswith(p) for p in self.family.connector_prefixes):
            return CONNECTOR, name
        return OTHER, name

    def placeholder_key(self, config: dict, modality: str) -> Optional[str]:
        """The config key of this source's placeholder id, preferring one named after the modality."""
        present = [k for k in self.family.placeholder_keys if config.get(k) is not None]
        for key in present:
            if key.startswith(modality + "_"):
                return key
        return present[0] if present else None


def override_layout(llm_prefix: str, lm_head: Optional[str], modality_prefixes: Sequence[str],
                    placeholder_key: Optional[str]) -> SplitLayout:
    """A layout from the YAML's `layout:` block, for architectures without a family file."""
    family = Family(
        name="override",
        architectures=(),
        placeholder_keys=(placeholder_key,) if placeholder_key else (),
        encoder_prefixes=tuple(modality_prefixes),
        llm_prefixes=((llm_prefix, "model."),),
    )
    return SplitLayout(family, exact_llm={lm_head: "lm_head.weight"} if lm_head else {})
