"""Prompts and answers: the question filled into a template with its labelled choices, the token ids
that begin each label after the prompt (scored by their next-token logits), and the reading of a
generated answer (MCUB's first-label rule)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.evaluation.benchmark import _MARKER, LETTERS, Question

DEFAULT_TEMPLATE = "{question}\n{choices}\nAnswer:"
ANSWER_WITH = ("label", "choice")
#: how a prediction is made: the labels' next-token logits, or greedy generation read by its first
#: label (`parse_label`) or by its first character(s), as ModelCompose scores MCUB/AVQA (`first_char_label`)
SCORINGS = ("logits", "first-label", "first-char")


def build_prompt(q: Question, placeholders: Dict[str, str], template: str = DEFAULT_TEMPLATE,
                 labels: Sequence[str] = LETTERS, resolve: Optional[Dict[str, str]] = None) -> str:
    """The question with `<m>` markers replaced by `placeholders[resolve[m]]`, what stands for one item
    of each composite modality (or, with no marker, one per item put in front), then `template` with
    {question} and {choices} filled ({choices} ends with the question's `instruction`, if any).
    `evaluate` passes the processor's item markers (`CompositeProcessor.item_marker`), which the
    processor expands as each source's processor lays an item out (Gemma 3's `<start_of_image>` ...
    `<end_of_image>`, pan-and-scan crops); the composite's bare placeholders would skip that."""
    resolve = resolve or {m: m for m in q.media}
    text = q.question
    if any(n in q.media for n in _MARKER.findall(text)):
        text = _MARKER.sub(lambda mo: placeholders[resolve[mo.group(1)]] if mo.group(1) in q.media else mo.group(0),
                           text)
    elif q.media:
        text = " ".join(placeholders[resolve[m]] for m, items in q.media.items() for _ in items) + " " + text
    choices = "\n".join(f"{labels[i]}. {c}" for i, c in enumerate(q.choices))
    if q.instruction:  # ModelCompose's files: the text after the options stays after them
        choices += "\n" + q.instruction
    return template.replace("{question}", text).replace("{choices}", choices)


def label_token_ids(tokenizer, context: str, labels: Sequence[str]) -> List[List[int]]:
    """For each label, the token ids that would begin it right after `context`.

    `context + " " + label` and `context + label` are tokenized; where the context's own tokens are
    a prefix of the result, the first new token is a way the model can start that label (" A" and
    "A" for most tokenizers). A label scores the best logit among its tokens. Labels whose tokens
    coincide (unknown to a word-level vocabulary, say) are refused: pass other `labels`.
    """
    base = tokenizer(context, add_special_tokens=True)["input_ids"]
    out: List[List[int]] = []
    owner: Dict[int, str] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for lab in labels:
        ids: List[int] = []
        for sep in (" ", ""):
            full = tokenizer(context + sep + lab, add_special_tokens=True)["input_ids"]
            if len(full) > len(base) and full[:len(base)] == base:
                t = full[len(base)]
                if t != unk and t not in ids:
                    ids.append(t)
        if not ids:
            raise CompositionError(f"the tokenizer has no token for the choice label {lab!r} after the prompt "
                                   f"(unknown or merged into the prompt's last token); pass other labels")
        for t in ids:
            if t in owner:
                raise CompositionError(f"choice labels {owner[t]!r} and {lab!r} begin with the same token "
                                       f"({tokenizer.convert_ids_to_tokens(t)!r}); pass other labels")
            owner[t] = lab
        out.append(ids)
    return out


def parse_label(text: str, labels: Sequence[str]) -> Optional[int]:
    """MCUB's reading of a generated answer: its first label ("B", "(B)", " B. rain"); None if none."""
    s = text.strip().lstrip("([*\"' ")
    for i in sorted(range(len(labels)), key=lambda i: -len(labels[i])):
        lab = labels[i]
        if s.startswith(lab) and (len(s) == len(lab) or not s[len(lab)].isalnum()):
            return i
    return None


def first_char_label(text: str, labels: Sequence[str]) -> Optional[int]:
    """ModelCompose's reading of a generated answer (its eval_avqa.py): the stripped text begins with
    the label (the longest such label), nothing else skipped or required after it; None if none.
    For one-character labels (A, B, ...) this is exactly `text.strip()[:1] == letter`: "Apple" reads
    as A, "(B)" as nothing (where `parse_label` reads B)."""
    s = text.strip()
    for i in sorted(range(len(labels)), key=lambda i: -len(labels[i])):
        if s.startswith(labels[i]):
            return i
    return None


class _Answers:
    """What the prompt shows as each choice's label, and what the model is scored on writing."""

    def __init__(self, shown: Sequence[str], answer_with: str):
        self.shown, self.answer_with = tuple(shown), answer_with

    def of(self, q: Question) -> Tuple[str, ...]:
        if self.answer_with == "choice":
            return tuple(q.choices)
        return tuple((q.labels or self.shown)[:len(q.choices)])


def _label_ids(proc, q: Question, prompt: str, labels, cache) -> List[List[int]]:
    labs = labels.of(q)
    # the prompt's last line, as the processor expands its markers, is the context the label follows
    key = (proc.expand_markers(prompt).rsplit("\n", 1)[-1], labs)
    if key not in cache:
        try:
            cache[key] = label_token_ids(proc.tokenizer, key[0], labs)
        except CompositionError as exc:
            if labels.answer_with != "choice":
                raise
            raise CompositionError(f"{q.where} (id {q.id}): with answer_with='choice' each choice is scored by its "
                                   f"first token, so choices must begin with different known tokens: "
                                   f"{str(exc).split(';')[0]}") from None
    return cache[key]
