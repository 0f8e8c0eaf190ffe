"""`composite_config.json`, the composite's manifest: one typed model, written once by the engine
and read and validated through it everywhere else (loader, processor, evaluator, push, example).

docs/format.md documents every field. `format_version` is checked on every read: a composite
written by another format version is refused with a clear error, never half-understood.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.format.files import COMPOSITE_CONFIG, FORMAT_VERSION


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LLMEntry(_Entry):
    path: str = "."
    vocab_size: int
    base_vocab_size: int
    tie_word_embeddings: bool


class AddedToken(_Entry):
    """A vocabulary row a source added (carried from it), with its id in the composite."""

    token: str
    id: int
    from_: str = Field(alias="from")  # the modality that brought it


class ModalityEntry(_Entry):
    source: str  # the model reference as written in the YAML
    architecture: Optional[str]
    family: str
    path: str  # modalities/<m>: its encoder, connector, config and processor files
    placeholder: Optional[str]
    placeholder_id: Optional[int]
    parts: Dict[str, int]  # tensors per part (encoder, connector, other)
    route: str  # what its LLM weights are: "merged", or the method whose routes rebuild them
    parameters: Dict[str, Any]
    adapters: Optional[Dict[str, Any]] = None  # DAMC: the decoupled source it was composed from
    prefix_suffix: Optional[str] = None  # learned embeddings placed around its items' features


class RoutesEntry(BaseModel):
    """Where a method's routes are (`kind` names the method); the method reads the rest (methods/<kind>/)."""

    model_config = ConfigDict(extra="allow")

    kind: str
    dir: str


class Manifest(_Entry):
    format_version: int
    merge_method: str
    parameters: Dict[str, Any]
    base_model: str
    llm: LLMEntry
    added_tokens: List[AddedToken]
    modalities: Dict[str, ModalityEntry] = Field(min_length=1)
    text_route: str = "merged"
    routes: Optional[RoutesEntry]

    def route_ids(self) -> Dict[str, int]:
        """Route id of each modality: 1..N in the manifest's order (0 is the text route); none without routes."""
        return {m: i + 1 for i, m in enumerate(self.modalities)} if self.routes else {}

    def modality(self, name: str, where: str) -> ModalityEntry:
        """Modality `name`'s entry; an unknown name is an error listing the composite's modalities."""
        if name not in self.modalities:
            raise CompositionError(f"{where}: no modality {name!r}; it has {', '.join(self.modalities)}")
        return self.modalities[name]

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, COMPOSITE_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self.model_dump(mode="json", by_alias=True, exclude_unset=True), f, indent=2)

    @classmethod
    def read(cls, directory: str) -> "Manifest":
        """The manifest of the composite at `directory`; any problem is an error naming the file."""
        path = os.path.join(directory, COMPOSITE_CONFIG)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CompositionError(f"{directory}: not a composite (no {COMPOSITE_CONFIG})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompositionError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CompositionError(f"{path}: expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CompositionError(f"{path}: format_version {version!r}; this version of mergekit-multimodal reads "
                                   f"format {FORMAT_VERSION} (compose it again with this version, or upgrade)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
            raise CompositionError(f"{path}: invalid composite manifest: " + "; ".join(problems)) from None
