"""Benchmarks: the question format (docs/evaluate.md) and its loading, every error naming the file
and line (or item).

JSONL, one question a line (or a JSON list, or `{"questions": [...]}`), media paths relative to the
benchmark file::

    {"id": "q1", "subset": "common-2", "question": "<image> <audio> What do these have in common?",
     "choices": ["a dog", "a cat", "rain", "a car"], "answer": "B",
     "media": {"image": ["img/1.png"], "audio": ["wav/1.wav"]}}

ModelCompose's own files (MCUB, AVQA: a JSON list of `{"id", "conversations", "modal_inputs"}`) are
recognised by their shape and read by `evaluation.modelcompose`.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from mergekit_multimodal.errors import CompositionError

LETTERS: Tuple[str, ...] = tuple(string.ascii_uppercase)
_MARKER = re.compile(r"<([A-Za-z_][\w-]*)>")


@dataclass
class Question:
    id: str
    subset: str
    question: str  # may hold `<modality>` markers, one per media item of that modality
    choices: List[str]
    answer: int  # index into choices
    media: Dict[str, List[str]] = field(default_factory=dict)  # modality -> absolute paths, in order
    where: str = ""  # "benchmark.jsonl:17", for messages
    labels: Optional[List[str]] = None  # this question's own choice labels (default: the evaluator's, A..Z)
    extra: Dict[str, Any] = field(default_factory=dict)  # any other fields of the line, kept as is
    instruction: str = ""  # text shown after the choices (ModelCompose's files: the lines after the options)

    @property
    def modalities(self) -> List[str]:
        return [m for m, items in self.media.items() if items]


def _benchmark_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("benchmark.jsonl", "benchmark.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CompositionError(f"{path}: a benchmark directory must hold benchmark.jsonl (or benchmark.json)")
    if not os.path.isfile(path):
        raise CompositionError(f"benchmark not found: {path}")
    return path


def load_benchmark(path: Union[str, os.PathLike], *, check_files: bool = True,
                   answers: Optional[Union[str, os.PathLike]] = None,
                   media_root: Optional[Union[str, os.PathLike]] = None) -> List[Question]:
    """Read and validate a benchmark; every error names the file and line (or item).

    Our format (docs/evaluate.md), or ModelCompose's MCUB / AVQA files, told apart by their shape.
    For the latter, `answers` is the answers file (default: `<prefix>answer.json` beside it, e.g.
    `MCUB-answer.json`) and `media_root` the directory media paths are relative to (default: the
    directory holding `data/`, walking up from the file); both are refused for our format.
    """
    path = _benchmark_file(os.fspath(path))
    root = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    entries: List[Tuple[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"{name}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise CompositionError(f"{name}:{n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CompositionError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            data = data["questions"]
        if not isinstance(data, list):
            raise CompositionError(f"{name}: expected a list of questions or {{\"questions\": [...]}}")
        from mergekit_multimodal.evaluation import modelcompose

        if modelcompose.is_modelcompose(data):
            items = modelcompose.read_modelcompose(path, data, check_files=check_files,
                                                   answers=answers and os.fspath(answers),
                                                   media_root=media_root and os.fspath(media_root))
            return _checked([_from_modelcompose(where, raw, check_files) for where, raw in items], name)
        entries = [(f"{name}: question {i + 1}", q) for i, q in enumerate(data)]
    if answers is not None or media_root is not None:
        raise CompositionError(f"{name}: answers / media_root apply to ModelCompose's files (MCUB, AVQA) only; "
                               f"this benchmark is in our own format (answers and paths in each question)")
    return _checked([_question(raw, where, root, check_files) for where, raw in entries], name)


def _from_modelcompose(where: str, raw: Dict[str, Any], check_files: bool) -> Question:
    """A converted ModelCompose item through our own checks (paths are absolute by now)."""
    raw = dict(raw)
    instruction, prompt = raw.pop("instruction"), raw.pop("prompt")
    q = _question(raw, where, "", check_files)
    q.instruction, q.extra["prompt"] = instruction, prompt
    return q


def _checked(items: List[Question], name: str) -> List[Question]:
    questions, seen = [], {}
    for q in items:
        where = q.where
        if q.id in seen:
            raise CompositionError(f"{where}: id {q.id!r} already used at {seen[q.id]}")
        seen[q.id] = where
        questions.append(q)
    if not questions:
        raise CompositionError(f"{name}: no questions")
    return questions


def _question(raw: Any, where: str, root: str, check_files: bool) -> Question:
    def bad(msg: str):
        return CompositionError(f"{where}: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"expected an object, got {type(raw).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in raw:
            raise bad(f"missing field {key!r}")
    text = raw["question"]
    if not isinstance(text, str):
        raise bad("'question' must be a string")
    choices = raw["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) for c in choices):
        raise bad("'choices' must be a list of at least 2 strings")
    choices = [str(c) for c in choices]
    if len(choices) > len(LETTERS):
        raise bad(f"{len(choices)} choices; at most {len(LETTERS)}")
    labels = raw.get("labels")
    if labels is not None:
        if (not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels)
                or len(set(labels)) != len(labels)):
            raise bad("'labels' must be a list of distinct, non-empty strings")
        if len(labels) < len(choices):
            raise bad(f"{len(labels)} labels for {len(choices)} choices")
        labels = [x.strip() for x in labels]
    answer = raw["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise bad(f"answer must be a letter or a 0-based index, got {answer!r}")
    if isinstance(answer, str) and labels and answer.strip() in labels[:len(choices)]:
        index = labels.index(answer.strip())
    elif isinstance(answer, str):
        a = answer.strip()
        if len(a) != 1 or a.upper() not in LETTERS:
            raise bad(f"answer {answer!r} is not a letter A-Z (or a 0-based index)")
        index = LETTERS.index(a.upper())
        if index >= len(choices):
            raise bad(f"answer {answer!r} but only {len(choices)} choices")
    else:
        index = answer
        if not 0 <= index < len(choices):
            raise bad(f"answer index {answer} but only {len(choices)} choices (0-based)")
    media_raw = raw.get("media") or {}
    if not isinstance(media_raw, dict):
        raise bad("'media' must be an object {modality: [paths]}")
    media: Dict[str, List[str]] = {}
    for m, items in media_raw.items():
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            raise bad(f"media {m!r} must be a path or a list of paths")
        paths = []
        for p in items:
            full = p if os.path.isabs(p) else os.path.join(root, p)
            if check_files and not os.path.exists(full):
                raise bad(f"{m} file not found: {p}")
            paths.append(full)
        if paths:
            media[m] = paths
    from mergekit_multimodal.families import kinds

    markers = [n for n in _MARKER.findall(text) if n in media or n in kinds()]
    if markers:
        for m in sorted(set(markers) | set(media)):
            found, given = markers.count(m), len(media.get(m, []))
            if found != given:
                raise bad(f"the question has {found} <{m}> marker(s) but {given} {m} file(s); put one marker per "
                          f"file, or none at all (then one per file is put in front)")
    qid = raw.get("id", where.rsplit(":", 1)[-1].strip())
    subset = raw.get("subset") or _default_subset(media)
    if not isinstance(subset, str):
        raise bad("'subset' must be a string")
    extra = {k: v for k, v in raw.items()
             if k not in ("id", "subset", "question", "choices", "answer", "media", "labels")}
    return Question(id=str(qid), subset=subset, question=text, choices=choices, answer=index, media=media,
                    where=where, labels=labels, extra=extra)


def _default_subset(media: Dict[str, List[str]]) -> str:
    mods = [m for m, items in media.items() if items]
    if not mods:
        return "text"
    return mods[0] if len(mods) == 1 else f"common-{len(mods)}"
