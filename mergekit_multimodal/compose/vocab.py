"""The composite's vocabulary: shared rows are merged, rows a source added are carried.

Sources often extend the base vocabulary (LLaVA-1.5: vicuna's 32000 rows + `<image>`, `<pad>`,
padded to 32064) and several reuse one id for different placeholders. The composite keeps the
base ids, then adds each named token a source added (first source wins a shared name), so
every modality's placeholder gets its own, consistent id. Unnamed padding rows are dropped.

The ids are the ones the composite's tokenizer gives: the next id after the last it names. Where the
base's embedding is padded past its tokenizer (Gemma 3: 262145 ids named, 262208 rows), the added
tokens therefore take the base's unnamed rows first, then rows appended past them; a carried row
inside the base's rows is taken out of the merge (`VocabPlan.merged_ranges`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
    #: names for the base rows its tokenizer leaves unnamed (a padded embedding), from the first one on,
    #: where a source's placeholder lies among them: the composite's tokenizer adds them first
    named: List[str] = field(default_factory=list)

    @property
    def new_tokens(self) -> List[str]:
        return [c.token for c in self.carried]

    @property
    def merged_ranges(self) -> List[Tuple[int, int]]:
        """The base's rows the method merges, as [start, end) ranges: all of them but those a carried
        token takes (inside them where the base's embedding is padded past its tokenizer)."""
        ranges, start = [], 0
        for row in sorted(c.row for c in self.carried if c.row < self.base_rows):
            if row > start:
                ranges.append((start, row))
            start = row + 1
        if start < self.base_rows:
            ranges.append((start, self.base_rows))
        return ranges


def plan_vocabulary(base: Checkpoint, sources: Sequence[Checkpoint], modalities: Sequence[str],
                    overrides: Sequence[Optional[str]], base_tokenizer, source_tokenizers,
                    pad_to_multiple_of: Optional[int] = None) -> VocabPlan:
    if EMBED not in base.llm:
        raise CompositionError(f"base ({base.path}): no {EMBED} tensor")
    v0 = base.llm_shape(EMBED)[0]
    _check_fits(f"base ({base.path})", base.path, base_tokenizer, v0)
    base_vocab = base_tokenizer.get_vocab() if base_tokenizer is not None else {}
    plan = VocabPlan(base_rows=v0, rows=v0)
    by_token: Dict[str, int] = {}

    #: the first id the base's tokenizer leaves unnamed (its length), where its embedding has more rows
    unnamed = len(base_tokenizer) if base_tokenizer is not None else v0

    def add(token: str, src: int, src_row: int) -> int:
        """The token's composite id; a carried token's is provisional (v0 + its index) until every
        name is known (`_place_carried`)."""
        if token in base_vocab and base_vocab[token] < v0:
            return base_vocab[token]
        if token in plan.named:
            return unnamed + plan.named.index(token)
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
        _check_fits(f"{src.label} ({src.path})", src.path, tok, rows)
        key = src.layout.placeholder_key(src.config, modalities[i])
        placeholder_id = int(src.config[key]) if key else None
        if placeholder_id is not None and not 0 <= placeholder_id < rows:
            raise CompositionError(
                f"{src.label}: {os.path.join(src.path, 'config.json')} gives {key} = {placeholder_id}, outside its "
                f"{EMBED}'s {rows} rows"
            )
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
        if token is None:  # an unnamed (padding) row: the modality's marker names it, if no token has that name
            token = f"<{modalities[i]}>"
            taken = by_token.get(token, base_vocab.get(token, (tok.get_vocab() if tok is not None else {}).get(token)))
            if taken is not None:
                raise CompositionError(
                    f"{src.label}: its placeholder id {placeholder_id} ({key} in {os.path.join(src.path, 'config.json')}) "
                    f"is an unnamed padding row of its vocabulary, and the default name {token!r} already names id "
                    f"{taken}; set `placeholder:` on this model in the YAML to name it"
                )
            LOG.info("%s: placeholder id %d is unnamed in its tokenizer; the composite names it %s",
                     src.label, placeholder_id, token)
        if not overrides[i] and unnamed <= placeholder_id < v0:
            # a base row its tokenizer does not name (Qwen2's padded embedding: LLaVA-OneVision's <image>
            # at 151646): the composite's tokenizer names it, and the unnamed rows before it, as this source does
            token = _name_base_rows(plan, src, tok, unnamed, placeholder_id, token, base_vocab, by_token)
            composite_id = placeholder_id
        elif overrides[i] or placeholder_id >= v0:
            composite_id = add(token, i, placeholder_id)
        else:
            composite_id = placeholder_id
        for other in plan.placeholders.values():
            if other.token == token or other.id == composite_id:
                raise CompositionError(
                    f"modalities {other.modality!r} and {modalities[i]!r} both use placeholder {token!r} "
                    f"({f'id {composite_id}' if composite_id < v0 else 'a token they add'}); set `placeholder:` on one of them in the YAML to give it its own token"
                )
        plan.placeholders[modalities[i]] = Placeholder(modalities[i], token, composite_id)

    _place_carried(plan, unnamed + len(plan.named))
    plan.rows = max([v0] + [c.row + 1 for c in plan.carried])
    if pad_to_multiple_of and plan.rows % pad_to_multiple_of:
        plan.rows += pad_to_multiple_of - plan.rows % pad_to_multiple_of
    return plan


def _place_carried(plan: VocabPlan, first: int) -> None:
    """Give the carried tokens the ids the composite's tokenizer will: it adds `plan.named` and then
    them after the last id the base's tokenizer names, so the k-th takes id `first + k`. Those ids
    are the base's unnamed rows while they last (a padded embedding: Gemma 3 names 262145 of its
    262208 rows), then rows appended past the base's."""
    v0 = plan.base_rows
    free = max(0, v0 - first)
    final = {v0 + k: first + k if k < free else v0 + k - free for k in range(len(plan.carried))}
    plan.carried = [dataclasses.replace(c, row=final[c.row]) for c in plan.carried]
    for m, ph in plan.placeholders.items():
        if ph.id in final:
            plan.placeholders[m] = dataclasses.replace(ph, id=final[ph.id])
    if free and plan.carried:
        LOG.info("the base's embedding has %d rows its tokenizer does not name (from %d): the added tokens %s take "
                 "ids from %d", free, first, plan.new_tokens, first)


def _name_base_rows(plan: VocabPlan, src: Checkpoint, tok, unnamed: int, placeholder_id: int, token: str,
                    base_vocab: Dict[str, int], carried: Dict[str, int]) -> str:
    """Name the base's unnamed rows up to a source's placeholder id (`plan.named`, in id order, so the
    composite's tokenizer gives each its id); the placeholder's name in the composite."""
    for row in range(unnamed + len(plan.named), placeholder_id + 1):
        name = token if row == placeholder_id else (tok.convert_ids_to_tokens(row) if tok is not None else None)
        if name is None or name in base_vocab or name in carried or name in plan.named:
            why = "its tokenizer does not name it" if name is None else f"its name {name!r} is taken"
            raise CompositionError(
                f"{src.label} ({src.path}): its placeholder id {placeholder_id} lies in the base's embedding rows its "
                f"tokenizer leaves unnamed (from {unnamed}); the composite's tokenizer would have to name row {row} "
                f"first, and {why}. Set `placeholder:` on this model in the YAML to give it its own token"
            )
        plan.named.append(name)
    return plan.named[placeholder_id - unnamed]


def _check_fits(label: str, path: str, tok, rows: int) -> None:
    """A checkpoint's tokenizer gives only ids its embedding has rows for."""
    if tok is None:
        return
    over = sorted(i for i in tok.get_vocab().values() if i >= rows)
    if over:
        files = ", ".join(n for n in TOKENIZER_FILES if os.path.exists(os.path.join(path, n)))
        raise CompositionError(
            f"{label}: its tokenizer ({files}) holds {len(over)} id(s) >= {rows} (up to {over[-1]}), but its {EMBED} "
            f"has {rows} rows; the tokenizer does not fit this checkpoint's embedding (is it another model's?)"
        )
