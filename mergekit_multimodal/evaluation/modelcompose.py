"""ModelCompose's benchmark files (MCUB, AVQA) read as they are, into `Question`s.

ModelCompose (the DAMC paper's reference code) keeps its test sets under `data/test/` of its
checkout: `MCUB-4.json`, `MCUB-3-<modalities>.json`, `avqa-test_mm_<modalities>.json`. Each is a
JSON list of::

    {"id": ..., "conversations": [{"from": "human", "value": "<image>\\n<audio>\\n...\\nQuestion\\nA. ...\\nB. ..."},
                                  {"from": "gpt", "value": null}],
     "modal_inputs": {"vision": [path], "audio": [path], "video": [path], "point": [path]}}

with the answers in a sibling file (`MCUB-answer.json`, `avqa-test_mm_answer.json`: the same ids,
the letter in `conversations[-1].value`) and media paths relative to the checkout's root (its
scripts run from there). Here: the options are parsed from the question's lines (`A. ...`,
`A) ...`, `(A) ...`), the text after them is kept (`Question.instruction`), `vision` -> `image` and
`point` -> point clouds (the `<point>` marker with it), paths are resolved against the directory
holding `data/` (walking up from the benchmark file), and each item becomes our own format's
fields and goes through the same checks (`benchmark._question`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from mergekit_multimodal.errors import CompositionError



def _modal_keys() -> dict:
    """ModelCompose's `modal_inputs` keys -> our kinds (and the marker each key's items take): its
    `vision` is images; the rest are our kinds' markers (`point` -> point clouds: families.marker_kinds)."""
    from mergekit_multimodal.families import marker_kinds

    return {"vision": "image", **marker_kinds()}

_MARKER_NAME = re.compile(r"<([A-Za-z_]\w*)>")
_OPTION = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.)])\s*(.*?)\s*$")
_ANSWER = re.compile(r"^\(?([A-Z])(?:$|[.):\s])")


def is_modelcompose(data: Any) -> bool:
    """A JSON list whose first item has `conversations` and no `question`: ModelCompose's layout."""
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and "conversations" in data[0] and "question" not in data[0])


def checkout_root(benchmark: str) -> Optional[str]:
    """The directory holding `data/`, walking up from the benchmark file's directory (None: none)."""
    d = os.path.dirname(os.path.abspath(benchmark))
    while True:
        if os.path.isdir(os.path.join(d, "data")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def answers_file(benchmark: str) -> Optional[str]:
    """`<prefix>answer.json` beside the benchmark, where its name starts with `<prefix>` (longest
    wins): `MCUB-4.json` -> `MCUB-answer.json`, `avqa-test_mm_video.json` -> `avqa-test_mm_answer.json`."""
    d, name = os.path.split(os.path.abspath(benchmark))
    best = None
    for f in os.listdir(d):
        if f == name or not f.endswith("answer.json"):
            continue
        prefix = f[: -len("answer.json")]
        if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, f)
    return os.path.join(d, best[1]) if best else None


def read_answers(path: str) -> Dict[str, Any]:
    """id -> `conversations[-1].value` of an answers file."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CompositionError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise CompositionError(f"answers file {path}: {exc.strerror or exc}") from None
    if not isinstance(data, list):
        raise CompositionError(f"{name}: expected a list of {{\"id\", \"conversations\"}} (ModelCompose's answers)")
    out = {}
    for i, item in enumerate(data):
        convs = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(item, dict) or "id" not in item or not isinstance(convs, list) or not convs \
                or not isinstance(convs[-1], dict) or "value" not in convs[-1]:
            raise CompositionError(f"{name}: item {i + 1}: expected {{\"id\", \"conversations\": [..., "
                                   f"{{\"from\": \"gpt\", \"value\": letter}}]}}")
        out[str(item["id"])] = convs[-1]["value"]
    return out


def parse_options(text: str) -> Tuple[str, List[str], List[str], str]:
    """(stem, labels, options, instruction): the lettered option lines (A, B, C... in order) cut out
    of the question; the lines before them are the stem, those after them the instruction."""
    lines = text.split("\n")
    for start, line in enumerate(lines):
        m = _OPTION.match(line)
        if m and (m.group(1) or m.group(2)) == "A":
            break
    else:
        return text, [], [], ""
    labels, options, end = [], [], start
    while end < len(lines):
        m = _OPTION.match(lines[end])
        letter = m and (m.group(1) or m.group(2))
        if not m or letter != chr(ord("A") + len(labels)):
            break
        labels.append(letter)
        options.append(m.group(3))
        end += 1
    stem = "\n".join(lines[:start]).rstrip()
    return stem, labels, options, "\n".join(lines[end:]).strip()


def read_modelcompose(path: str, data: List[Any], *, check_files: bool = True, answers: Optional[str] = None,
                      media_root: Optional[str] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """(where, our format's fields) per item of a ModelCompose file, answers and paths resolved."""
    name = os.path.basename(path)
    root = os.path.abspath(media_root) if media_root else checkout_root(path)
    where_root = (f"--media-root {root}" if media_root else
                  f"the checkout root {root} (the directory holding data/)" if root else None)
    if root is None:
        root = os.path.dirname(os.path.abspath(path))
        where_root = f"{root} (no directory holding data/ above {name}; pass --media-root / media_root=)"
    ans_path = answers or answers_file(path)
    given = read_answers(ans_path) if ans_path else {}
    ans_name = os.path.basename(ans_path) if ans_path else None
    modal_keys = _modal_keys()
    out = []
    for i, item in enumerate(data):
        where = f"{name}: item {i + 1}"
        if not isinstance(item, dict):
            raise CompositionError(f"{where}: expected an object, got {type(item).__name__}")
        if "id" not in item:
            raise CompositionError(f"{where}: missing field 'id'")
        qid = str(item["id"])
        where = f"{name}: item {i + 1} (id {qid})"
        convs = item.get("conversations")
        if (not isinstance(convs, list) or not convs or not isinstance(convs[0], dict)
                or not isinstance(convs[0].get("value"), str)):
            raise CompositionError(f"{where}: 'conversations' must be a list starting with "
                                   f"{{\"from\": \"human\", \"value\": question text}}")
        text = convs[0]["value"]
        stem, labels, options, instruction = parse_options(text)
        if len(options) < 2:
            raise CompositionError(f"{where}: conversations[0].value has no lettered options (at least two lines "
                                   f"'A. ...' / 'A) ...' / '(A) ...', in order)")
        own = convs[-1].get("value") if len(convs) > 1 and isinstance(convs[-1], dict) else None
        raw_answer = given.get(qid, own)
        if raw_answer is None:
            raise CompositionError(
                f"{where}: no answer: " + (f"id {qid} is not in {ans_name}" if ans_name else
                                           f"no answers file beside {name} (<prefix>answer.json, e.g. "
                                           f"MCUB-answer.json) and conversations[-1].value is null; pass --answers / answers="))
        m = _ANSWER.match(str(raw_answer).strip())
        if not m or m.group(1) not in labels:
            src = f"{ans_name}, id {qid}" if qid in given else f"{where}: conversations[-1].value"
            raise CompositionError(f"{src}: answer {raw_answer!r} is not one of the question's option letters "
                                   f"{', '.join(labels)}")
        modal = item.get("modal_inputs") or {}
        if not isinstance(modal, dict):
            raise CompositionError(f"{where}: 'modal_inputs' must be an object {{key: [paths]}}")
        media: Dict[str, List[str]] = {}
        for key, items in modal.items():
            if key not in modal_keys:
                raise CompositionError(f"{where}: modal_inputs key {key!r} is not one of "
                                       f"{', '.join(sorted(modal_keys))}")
            items = [items] if isinstance(items, str) else items
            if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
                raise CompositionError(f"{where}: modal_inputs.{key} must be a path or a list of paths")
            for p in items:
                full = p if os.path.isabs(p) else os.path.join(root, p)
                if check_files and not os.path.exists(full):
                    raise CompositionError(f"{where}: modal_inputs.{key} file not found: {p} "
                                           f"(relative paths are resolved against {where_root})")
                media.setdefault(modal_keys[key], []).append(full)
        stem = _MARKER_NAME.sub(lambda m: f"<{modal_keys.get(m.group(1), m.group(1))}>", stem)  # <point> -> its kind
        out.append((where, {"id": qid, "question": stem, "choices": options, "answer": m.group(1),
                            "media": media, "instruction": instruction, "prompt": text}))
    return out
