"""The YAML a user writes for a composite merge, validated with pydantic.

It follows mergekit's `models:` / `base_model:` / `parameters:` style so an existing
mergekit user reads it at once; each source adds the `modality` it brings.
Unknown keys are errors (mergekit itself ignores them silently).
"""

from __future__ import annotations

import os
from typing import Annotated, Dict, List, Literal, Optional

import yaml
from mergekit.common import ModelPath, ModelReference
from mergekit.config import ParameterSetting
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WrapSerializer,
                      field_validator, model_validator)

from mergekit_multimodal.errors import CompositionError

#: Methods that only make sense as composites (they keep per-modality parts).
COMPOSITE_METHODS = ("naive_mc", "mmer", "damc")

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]


def _local_reference(value):
    """An existing local directory is a path as written: mergekit's parser would split it at `+`
    (model+LoRA) or `@` (revision)."""
    if isinstance(value, str) and os.path.isdir(value):
        return ModelReference(model=ModelPath(path=value))
    return value


def _reference_text(ref: ModelReference, handler):
    """A reference as the user wrote it. mergekit's own serializer returns the object itself for a
    path with a space or a quote, which pydantic then reports as a circular reference."""
    return handler(ref) if ref.override_architecture is not None else str(ref)


#: mergekit's ModelReference, read and written so that any local path round-trips
ModelRef = Annotated[ModelReference, BeforeValidator(_local_reference), WrapSerializer(_reference_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayoutOverride(_Strict):
    """Say where the LLM and the modality parts live, for an architecture we have no reader for."""

    llm_prefix: str = Field(description="prefix of the LLM's decoder tensors, e.g. 'llm.model.'")
    lm_head: Optional[str] = Field(None, description="full name of the output head tensor, if untied")
    modality_prefixes: List[str] = Field(
        default_factory=list, description="prefixes of encoder/connector tensors to keep with the modality"
    )
    placeholder_config_key: Optional[str] = Field(
        None, description="key in config.json holding the placeholder token id"
    )


class SourceModel(_Strict):
    """One MLLM fine-tuned from the shared base, and the modality it brings."""

    model: ModelRef
    modality: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    placeholder: Optional[str] = Field(
        None, description="placeholder token text in the composite; defaults to the source's own"
    )
    layout: Optional[LayoutOverride] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None
    adapters: Optional[str] = Field(
        None, description="damc only: directory of the decoupled text/modality adapters (PEFT two-adapter "
        "form or a ModelCompose release); `model` then supplies the encoder and connector"
    )
    adapter_name: Optional[str] = Field(
        None, description="damc only: the modality adapter's name inside `adapters` (default: the modality)"
    )


class CompositeMergeConfig(_Strict):
    """A composite merge: a base LLM (or MLLM), N sources with a modality each, and a method."""

    merge_method: str
    base_model: ModelRef
    base_layout: Optional[LayoutOverride] = None
    models: List[SourceModel] = Field(min_length=1)
    parameters: Optional[Dict[str, ParameterSetting]] = None
    dtype: Optional[DTypeName] = None
    out_dtype: Optional[DTypeName] = None
    pad_vocab_to_multiple_of: Optional[int] = Field(None, gt=0)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from mergekit import merge_methods

        known = {m.spec.name for m in merge_methods.registered_methods()}
        if name not in known:
            raise ValueError(f"unknown merge_method {name!r}; known: {', '.join(sorted(known))}")
        return name

    @model_validator(mode="after")
    def _distinct_modalities(self) -> "CompositeMergeConfig":
        seen: Dict[str, str] = {}
        for src in self.models:
            if src.modality in seen:
                raise ValueError(
                    f"modality {src.modality!r} is brought by two sources ({seen[src.modality]} and "
                    f"{src.model}); give each source its own modality name"
                )
            seen[src.modality] = str(src.model)
        for i, src in enumerate(self.models):
            if self.merge_method == "damc" and not src.adapters:
                raise ValueError(f"models[{i}] ({src.modality}): merge_method damc needs `adapters:`, the "
                                 "directory of this source's decoupled text/modality adapters (docs/damc.md)")
            if self.merge_method != "damc" and (src.adapters or src.adapter_name):
                raise ValueError(f"models[{i}] ({src.modality}): `adapters:` is only read by merge_method damc")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def is_composite_config(data: dict) -> bool:
    """True when a parsed YAML asks for a composite rather than a plain mergekit merge."""
    if not isinstance(data, dict):
        return False
    if data.get("merge_method") in COMPOSITE_METHODS:
        return True
    models = data.get("models")
    return isinstance(models, list) and any(isinstance(m, dict) and "modality" in m for m in models)


def load_config(data: dict, source: str = "config") -> CompositeMergeConfig:
    """Validate a parsed YAML; errors name the offending key path."""
    try:
        return CompositeMergeConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise CompositionError(f"{source}: invalid composite config\n" + "\n".join(lines)) from None
