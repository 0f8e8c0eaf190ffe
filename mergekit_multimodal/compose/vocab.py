"""The composite's vocabulary: shared rows are merged, rows a source added are carried.

Sources often extend the base vocabulary (LLaVA-1.5: vicuna's 32000 rows + `<image>`, `<pad>`,
padded to 32064) and several reuse one id for different placeholders. The composite keeps the
base ids, then appends each named token a source added (first source wins a shared name), so
every modality's placeholder gets its own, consistent id. Unnamed padding rows are dropped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from mergekit_multimodal.compose.checkpoint import Checkpoint
from mergekit_multimodal.errors import CompositionError

LOG = logging.getLogger(__name__)

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


#: files whose presence says the checkpoint ships a tokenizer (transformers' fast and slow forms)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None if it ships none (weights-only checkpoints exist).

    A tokenizer that is there but cannot be read is an error naming the file: the composite is never
    written without the tokenizer its base ships."""
    import transformers

    present = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(path, n))]
    if not present:
        LOG.info("no tokenizer files at %s", path)
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        _name_damaged_file(path, present)  # transformers' own error rarely names the file
        raise CompositionError(f"{path}: its tokenizer files ({', '.join(present)}) do not load "
                               f"({type(exc).__name__}: {exc})") from None


def _name_damaged_file(path: str, present) -> None:
    """After a failed load: the first tokenizer file that does not parse, as an error naming it."""
    for name in present:
        f = os.path.join(path, name)
        try:
            if name == "tokenizer.json":
                from tokenizers import Tokenizer

                Tokenizer.from_file(f)
            elif name.endswith(".json"):
                with open(f, encoding="utf-8") as fh:
                    json.load(fh)
            else:
                with open(f, "rb") as fh:
                    fh.read(1)
        except Exception as exc:
            raise CompositionError(f"{f}: unreadable tokenizer file ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class CarriedRow:
    token: str
    source: int  # index into the sources
    source_row: int
    row: int  # row in the composite


@dataclass(frozen=True)
class Placeholder:
    modality: str
    token: str
    id: int


@dataclass
class VocabPlan:
    base_rows: int
    rows: int
    carried: List[CarriedRow] = field(default_factory=list)
    placeholders: Dict[str, Placeholder] = field(default_factory=dict)

    @property
    def new_tokens(self) -> List[str]:
        return [c.token for c in self.carried]


def plan_vocabulary(base: Checkpoint, sources: Sequence[Checkpoint], modalities: Sequence[str],
                    overrides: Sequence[Optional[str]], base_tokenizer, source_tokenizers,
                    pad_to_multiple_of: Optional[int] = None) -> VocabPlan:
    if EMBED not in base.llm:
        raise CompositionError(f"base ({base.path}): no {EMBED} tensor")
    v0 = base.llm_shape(EMBED)[0]
    base_vocab = base_tokenizer.get_vocab() if base_tokenizer is not None else {}
    plan = VocabPlan(base_rows=v0, rows=v0)
    by_token: Dict[str, int] = {}

    def add(token: str, src: int, src_row: int) -> int:
        if token in base_vocab and base_vocab[token] < v0:
            return base_vocab[token]
        if token not in by_token:
            row = v0 + len(plan.carried)
            plan.carried.append(CarriedRow(token, src, src_row, row))
            by_token[token] = row
        return by_token[token]

    for i, (src, tok) in enumerate(zip(sources, source_tokenizers)):
        rows = src.llm_shape(EMBED)[0] if EMBED in src.llm else 0
        if rows < v0:
            raise CompositionError(
                f"{src.label} ({src.path}): {EMBED} has {rows} rows, fewer than the base's {v0}; "
                "sources must share (and may only extend) the base vocabulary"
            )
        if rows > v0 and tok is None:
            raise CompositionError(
                f"{src.label} ({src.path}): its vocabulary extends the base ({rows} > {v0} rows) but it ships "
                "no tokenizer, so the added rows cannot be named"
            )
        placeholder_id = _placeholder_id(src, modalities[i])
        for row in range(v0, rows):
            if tok is not None and row < len(tok):
                token = tok.convert_ids_to_tokens(row)
                if token is not None and not (row == placeholder_id and overrides[i]):
                    add(token, i, row)
        if placeholder_id is None:
            if overrides[i]:
                raise CompositionError(
                    f"{src.label}: `placeholder: {overrides[i]}` given but {src.path}/config.json names no "
                    "placeholder id to take its embedding row from"
                )
            continue
        token = overrides[i] or (tok.convert_ids_to_tokens(placeholder_id) if tok is not None else None)
        if token is None:
            token = f"<{modalities[i]}>"
        if overrides[i] or placeholder_id >= v0:
            composite_id = add(token, i, placeholder_id)
        else:
            composite_id = placeholder_id
        for other in plan.placeholders.values():
            if other.token == token or other.id == composite_id:
                raise CompositionError(
                    f"modalities {other.modality!r} and {modalities[i]!r} both use placeholder {token!r} "
                    f"(id {composite_id}); set `placeholder:` on one of them in the YAML to give it its own token"
                )
        plan.placeholders[modalities[i]] = Placeholder(modalities[i], token, composite_id)

    plan.rows = v0 + len(plan.carried)
    if pad_to_multiple_of and plan.rows % pad_to_multiple_of:
        plan.rows += pad_to_multiple_of - plan.rows % pad_to_multiple_of
    return plan


def _placeholder_id(src: Checkpoint, modality: str) -> Optional[int]:
    key = src.layout.placeholder_key(src.config, modality)
    return int(src.config[key]) if key else None
