"""`mergekit-mm-eval`: multiple-choice accuracy of a composite (or of one source MLLM) on a benchmark.

Benchmark format (docs/evaluate.md): JSONL, one question a line (or a JSON list, or
`{"questions": [...]}`), media paths relative to the benchmark file::

    {"id": "q1", "subset": "common-2", "question": "<image> <audio> What do these have in common?",
     "choices": ["a dog", "a cat", "rain", "a car"], "answer": "B",
     "media": {"image": ["img/1.png"], "audio": ["wav/1.wav"]}}

Scoring is MCUB's first-letter rule for greedy decoding restricted to the choice labels: the
prompt is `template` filled with the question and the labelled choices; the prediction is the
label whose token (with or without a leading space, whichever the tokenizer makes after the
prompt) has the highest next-token logit. `generate=True` decodes greedily instead and reads the
first label of the answer (no label: wrong).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import click
import torch

from mergekit_multimodal.errors import CompositionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TEMPLATE = "{question}\n{choices}\nAnswer:"
ANSWER_WITH = ("label", "choice")
LETTERS: Tuple[str, ...] = tuple(string.ascii_uppercase)
KNOWN_MARKERS = ("image", "video", "audio", "point_cloud")
_MARKER = re.compile(r"<([A-Za-z_][\w-]*)>")


# -- benchmark ------------------------------------------------------------------------------------
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


def load_benchmark(path: Union[str, os.PathLike], *, check_files: bool = True) -> List[Question]:
    """Read and validate a benchmark; every error names the file and line (or item)."""
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
        entries = [(f"{name}: question {i + 1}", q) for i, q in enumerate(data)]
    questions, seen = [], {}
    for where, raw in entries:
        q = _question(raw, where, root, check_files)
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
    markers = [n for n in _MARKER.findall(text) if n in media or n in KNOWN_MARKERS]
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


# -- prompts and label tokens ---------------------------------------------------------------------
def build_prompt(q: Question, placeholders: Dict[str, str], template: str = DEFAULT_TEMPLATE,
                 labels: Sequence[str] = LETTERS, resolve: Optional[Dict[str, str]] = None) -> str:
    """The question with `<m>` markers replaced by the composite's placeholders (or, with no marker,
    one placeholder per item put in front), then `template` with {question} and {choices} filled."""
    resolve = resolve or {m: m for m in q.media}
    text = q.question
    if any(n in q.media for n in _MARKER.findall(text)):
        text = _MARKER.sub(lambda mo: placeholders[resolve[mo.group(1)]] if mo.group(1) in q.media else mo.group(0),
                           text)
    elif q.media:
        text = " ".join(placeholders[resolve[m]] for m, items in q.media.items() for _ in items) + " " + text
    choices = "\n".join(f"{labels[i]}. {c}" for i, c in enumerate(q.choices))
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


# -- results --------------------------------------------------------------------------------------
@dataclass
class SubsetScore:
    correct: int
    total: int
    accuracy: float
    chance: float  # mean of 1 / number of choices


@dataclass
class EvalResult:
    model: str  # the directory evaluated (a source's path when a single source was given)
    benchmark: str
    name: str  # short label for tables and plots
    subsets: Dict[str, SubsetScore]
    overall: float  # correct / total over every scored question
    correct: int
    total: int
    macro: float  # mean of the subsets' accuracies
    predictions: List[Dict[str, Any]]
    seconds: float
    route: Optional[str] = None
    mode: str = "logits"  # or "generate"
    skipped: Dict[str, int] = field(default_factory=dict)  # subset -> questions the model has no modality for
    composite: Optional[str] = None  # the composite actually run (a cache dir for a single source)

    def to_dict(self, predictions: bool = False) -> Dict[str, Any]:
        d = asdict(self)
        if not predictions:
            d.pop("predictions")
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EvalResult":
        d = dict(d)
        d["subsets"] = {s: SubsetScore(**v) for s, v in d["subsets"].items()}
        d.setdefault("predictions", [])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _score(questions: List[Question], preds: List[Dict[str, Any]]) -> Tuple[Dict[str, SubsetScore], int, int]:
    per: Dict[str, List[int]] = {}
    chance: Dict[str, List[float]] = {}
    by_id = {q.id: q for q in questions}
    for p in preds:
        q = by_id[p["id"]]
        c = per.setdefault(q.subset, [0, 0])
        c[0] += int(p["correct"])
        c[1] += 1
        chance.setdefault(q.subset, []).append(1.0 / len(q.choices))
    subsets = {s: SubsetScore(c, t, c / t, sum(chance[s]) / len(chance[s])) for s, (c, t) in per.items()}
    return subsets, sum(c for c, _ in per.values()), sum(t for _, t in per.values())


# -- models ---------------------------------------------------------------------------------------
def is_composite(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "composite_config.json"))


def source_modality(path: str) -> str:
    """The modality name a single source checkpoint gets: the kind of media its family takes."""
    from mergekit_multimodal.families import layout_for
    from mergekit_multimodal.families import FAMILIES

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CompositionError(f"{path}: neither a composite (composite_config.json) nor a checkpoint (config.json)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    family = layout_for(cfg, path).family
    if family.kind is None:
        raise CompositionError(f"{path}: a {family.name} checkpoint has no modality to evaluate; "
                               f"evaluate a multimodal source ({', '.join(f.name for f in FAMILIES)})")
    return family.kind


def composite_for(model: str, *, modality: Optional[str] = None, cache_dir: Optional[str] = None) -> Tuple[str, bool]:
    """(composite dir, is_temporary): the model itself, or a one-source NaiveMC composite of it
    (identical to the source) under `cache_dir` (reused when already built) or a temporary dir."""
    if is_composite(model):
        return model, False
    modality = modality or source_modality(model)
    from mergekit_multimodal.api import compose

    src = os.path.abspath(model)
    cfg = {"merge_method": "naive_mc", "base_model": src, "models": [{"model": src, "modality": modality}]}
    if cache_dir:
        key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        out = os.path.join(cache_dir, f"{os.path.basename(src.rstrip(os.sep))}-{key}")
        if not is_composite(out):
            os.makedirs(cache_dir, exist_ok=True)
            compose(cfg, out, overwrite=True)
        return out, False
    out = os.path.join(tempfile.mkdtemp(prefix="mm-eval-"), "composite")
    compose(cfg, out)
    return out, True


def _resolve_modalities(q: Question, proc) -> Optional[Dict[str, str]]:
    """Benchmark modality -> composite modality (same name, else the one composite modality of that
    kind: `video` -> `video_next`); None when the composite lacks one."""
    out = {}
    for m in q.media:
        if m in proc.modalities:
            out[m] = m
            continue
        same_kind = [c for c in proc.modalities if proc.kind(c) == m]
        if len(same_kind) != 1:
            return None
        out[m] = same_kind[0]
    return out


# -- evaluation -----------------------------------------------------------------------------------
def evaluate(model_dir: str, benchmark: Union[str, os.PathLike, Sequence[Question]], *, device: str = "cpu",
             dtype: Optional[str] = None, route: Optional[str] = None, limit: Optional[int] = None,
             batch_size: int = 8, progress: bool = True, subsets: Optional[Sequence[str]] = None,
             template: str = DEFAULT_TEMPLATE, labels: Sequence[str] = LETTERS, generate: bool = False,
             max_new_tokens: int = 8, modality: Optional[str] = None, cache_dir: Optional[str] = None,
             num_frames: Optional[int] = None, name: Optional[str] = None,
             answer_with: str = "label") -> EvalResult:
    """Accuracy of a composite (or of one source MLLM, composed alone with NaiveMC) on a benchmark.

    route: None (or "per-token") = per-token routing; a modality = the whole input on that modality's
    route (MMER retention); "auto" = on an MMER composite, questions with one modality on its
    whole-input route, the others per token (runtime.auto_route).
    Questions needing a modality the model lacks are skipped (counted in `skipped`).
    answer_with: "label" (MCUB: the model answers with the choice's label, A/B/...) or "choice" (it
    answers with the choice's own text, scored by the text's first token; e.g. the zoo's tiny models).
    """
    from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor, resolve_route

    start = time.time()
    bench_name = benchmark if isinstance(benchmark, (str, os.PathLike)) else "<questions>"
    questions = load_benchmark(benchmark) if isinstance(benchmark, (str, os.PathLike)) else list(benchmark)
    if subsets:
        have = {q.subset for q in questions}
        unknown = [s for s in subsets if s not in have]
        if unknown:
            raise CompositionError(f"no subset {', '.join(map(repr, unknown))} in the benchmark; "
                                   f"it has {', '.join(sorted(have))}")
        questions = [q for q in questions if q.subset in subsets]
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise CompositionError("no questions to ask (after --subset / --limit)")
    for q in questions:
        if len(q.labels or labels) < len(q.choices):
            raise CompositionError(f"{q.where}: {len(q.choices)} choices but {len(q.labels or labels)} choice labels")
    if batch_size < 1:
        raise CompositionError("batch_size must be at least 1")
    if answer_with not in ANSWER_WITH:
        raise CompositionError(f"answer_with must be one of {', '.join(ANSWER_WITH)}, got {answer_with!r}")
    labels = _Answers(labels, answer_with)
    if dtype and dtype not in DTYPES:
        raise CompositionError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")

    composite, temporary = composite_for(model_dir, modality=modality, cache_dir=cache_dir)
    try:
        proc = CompositeProcessor.from_pretrained(composite, num_frames=num_frames)
        routes = list(proc.modalities) if proc.manifest.routes else []  # as CompositeModel.route_of
        if route == "per-token":
            route = None
        if route not in (None, "auto") and route not in routes:
            raise CompositionError(f"no route {route!r}; routes: {', '.join(routes) or 'none (not MMER)'}")

        jobs: Dict[Optional[str], List[Tuple[Question, str, Dict[str, str]]]] = {}
        skipped: Dict[str, int] = {}
        for q in questions:
            res = _resolve_modalities(q, proc)
            if res is None:
                skipped[q.subset] = skipped.get(q.subset, 0) + 1
                continue
            r = resolve_route(route, proc.manifest, res.values())
            jobs.setdefault(r, []).append((q, build_prompt(q, proc.placeholders, template, q.labels or labels.shown, res),
                                           res))
        if not jobs:
            raise CompositionError(f"no question of the benchmark can be asked: the model has modalities "
                                   f"{', '.join(proc.modalities)}; skipped {sum(skipped.values())}")

        label_cache: Dict[Tuple[str, Tuple[str, ...]], List[List[int]]] = {}
        if not generate:  # label tokens checked before the model loads
            for items in jobs.values():
                for q, prompt, _ in items:
                    _label_ids(proc, q, prompt, labels, label_cache)
        torch_dtype = DTYPES[dtype] if dtype else None
        with transformers_output(bars=progress):
            model = CompositeModel.from_pretrained(composite, torch_dtype=torch_dtype, device=device)
        preds: Dict[str, Dict[str, Any]] = {}
        total = sum(len(v) for v in jobs.values())
        bar = _progress(total, progress)
        for r, items in jobs.items():
            with model.route(r):
                for i in range(0, len(items), batch_size):
                    batch = items[i:i + batch_size]
                    for q, out in zip((b[0] for b in batch),
                                      _run_batch(model, proc, batch, labels, label_cache, generate, max_new_tokens)):
                        out.update(id=q.id, subset=q.subset, answer=labels.of(q)[q.answer], route=r,
                                   correct=out["index"] == q.answer)
                        preds[q.id] = out
                    bar.update(len(batch))
        bar.close()
    finally:
        if temporary:
            import shutil

            shutil.rmtree(os.path.dirname(composite), ignore_errors=True)

    ordered = [preds[q.id] for q in questions if q.id in preds]
    per, correct, n = _score(questions, ordered)
    label = name or os.path.basename(os.path.abspath(model_dir).rstrip(os.sep))
    return EvalResult(model=str(model_dir), benchmark=str(bench_name), name=label, subsets=per,
                      overall=correct / n, correct=correct, total=n,
                      macro=sum(s.accuracy for s in per.values()) / len(per), predictions=ordered,
                      seconds=round(time.time() - start, 3), route=route, mode="generate" if generate else "logits",
                      skipped=skipped, composite=None if temporary else composite)


def evaluate_accuracy(model_dir: str, benchmark: str, *, device: str = "cpu", limit: Optional[int] = None,
                      **options) -> float:
    """Overall accuracy in [0, 1] (correct / total); `options` as `evaluate`'s (template, route...)."""
    return evaluate(model_dir, benchmark, device=device, limit=limit, progress=False, **options).overall


class _Answers:
    """What the prompt shows as each choice's label, and what the model is scored on writing."""

    def __init__(self, shown: Sequence[str], answer_with: str):
        self.shown, self.answer_with = tuple(shown), answer_with

    def of(self, q: Question) -> Tuple[str, ...]:
        if self.answer_with == "choice":
            return tuple(q.choices)
        return tuple((q.labels or self.shown)[:len(q.choices)])


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="q", disable=not enabled, leave=False)


def _inputs(proc, batch) -> Dict[str, Any]:
    texts, media = [], {}
    for q, prompt, res in batch:
        texts.append(prompt)
        for m, items in q.media.items():
            media.setdefault(res[m], []).extend(items)
    return proc(texts, media=media)


def _run_batch(model, proc, batch, labels, label_cache, generate, max_new_tokens) -> List[Dict[str, Any]]:
    try:
        inputs = _inputs(proc, batch)
    except CompositionError:
        if len(batch) == 1:
            q = batch[0][0]
            raise CompositionError(f"{q.where} (id {q.id}): {_last_error(proc, batch)}") from None
        # e.g. videos of different frame counts cannot share a call: one question at a time
        return [o for b in batch for o in _run_batch(model, proc, [b], labels, label_cache, generate, max_new_tokens)]
    if generate:
        with torch.inference_mode():
            new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = proc.batch_decode(new, skip_special_tokens=True)
        out = []
        for (q, _, _), t in zip(batch, texts):
            labs = labels.of(q)
            idx = parse_label(t, labs)
            out.append({"index": -1 if idx is None else idx, "predicted": None if idx is None else labs[idx],
                        "output": t})
        return out
    logits = next_token_logits(model, inputs)
    out = []
    for b, (q, prompt, _) in enumerate(batch):
        labs = labels.of(q)
        scores = [max(float(logits[b, t]) for t in group) for group in _label_ids(proc, q, prompt, labels, label_cache)]
        idx = max(range(len(scores)), key=lambda i: scores[i])
        out.append({"index": idx, "predicted": labs[idx], "scores": [round(s, 5) for s in scores]})
    return out


def _label_ids(proc, q: Question, prompt: str, labels, cache) -> List[List[int]]:
    labs = labels.of(q)
    key = (prompt.rsplit("\n", 1)[-1], labs)  # the prompt's last line is the context the label follows
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


@contextlib.contextmanager
def transformers_output(bars: bool = True, errors_only: bool = False):
    """transformers' own progress bars ("Loading weights") on or off, and its log at error level
    only if asked, for the duration; both put back as they were after."""
    from transformers.utils import logging as tlog

    was_bars, verbosity = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    if not bars:
        tlog.disable_progress_bar()
    if errors_only:
        tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if was_bars and not bars:
            tlog.enable_progress_bar()


def _last_error(proc, batch) -> str:
    try:
        _inputs(proc, batch)
    except CompositionError as exc:
        return str(exc)
    return "cannot build the inputs"


def next_token_logits(model, inputs: Dict[str, Any]) -> torch.Tensor:
    """Next-token logits [batch, vocab] after each (left-padded) row, under the model's current route.

    Position ids follow the attention mask, so a padded row scores as it would alone.
    """
    with torch.inference_mode():
        out = model(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("media"), logits_to_keep=1)
    return out.logits[:, -1, :].float()


# -- outputs --------------------------------------------------------------------------------------
def _order(subsets: Iterable[str]) -> List[str]:
    """Single-modality subsets first (as listed), then common-2, common-3...; others as found."""
    subs = list(dict.fromkeys(subsets))
    common = sorted((s for s in subs if re.fullmatch(r"common-\d+", s)), key=lambda s: int(s.split("-")[1]))
    return [s for s in subs if s not in common] + common


def format_table(results: Sequence[EvalResult]) -> str:
    """Accuracy (%) per subset, one column per model; `n` is each subset's question count."""
    if isinstance(results, EvalResult):
        results = [results]
    subsets = _order(s for r in results for s in r.subsets)
    names = [r.name for r in results]
    rows = [["subset", "n"] + names]
    for s in subsets:
        ns = {r.subsets[s].total for r in results if s in r.subsets}
        cells = []
        for r in results:
            sc = r.subsets.get(s)
            cells.append("-" if sc is None else f"{100 * sc.accuracy:.1f}" + (f" ({sc.total})" if len(ns) > 1 else ""))
        rows.append([s, "/".join(str(n) for n in sorted(ns))] + cells)
    totals = {r.total for r in results}
    rows.append(["overall", "/".join(str(n) for n in sorted(totals))]
                + [f"{100 * r.overall:.1f}" + (f" ({r.total})" if len(totals) > 1 else "") for r in results])
    if len(subsets) > 1:
        rows.append(["macro", ""] + [f"{100 * r.macro:.1f}" for r in results])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_results(results: Sequence[EvalResult], path: str) -> str:
    """A bar chart of accuracy per subset (grouped by model when several), chance as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(results, EvalResult):
        results = [results]
    subsets = _order(s for r in results for s in r.subsets) + ["overall"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(subsets) * max(1, len(results)) ** 0.5), 3.6))
    for k, r in enumerate(results):
        have = [i for i, s in enumerate(subsets) if s == "overall" or s in r.subsets]  # no bar where not evaluated
        xs = [i - 0.4 + width * (k + 0.5) for i in have]
        ys = [100 * (r.overall if subsets[i] == "overall" else r.subsets[subsets[i]].accuracy) for i in have]
        bars = ax.bar(xs, ys, width=width * 0.95, label=r.name)
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    first = results[0]
    chance = {s: sc.chance for r in reversed(results) for s, sc in r.subsets.items()}
    n = sum(sc.total for sc in first.subsets.values())
    chance["overall"] = sum(sc.chance * sc.total for sc in first.subsets.values()) / n if n else 0.0
    for i, s in enumerate(subsets):
        if s in chance:
            ax.hlines(100 * chance[s], i - 0.45, i + 0.45, colors="gray", linestyles="dashed",
                      label="chance" if i == 0 else None)
    ax.set_xticks(range(len(subsets)), subsets, rotation=30 if len(subsets) > 5 else 0)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(os.path.basename(str(first.benchmark).rstrip(os.sep)) or "benchmark", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_results(path: str) -> EvalResult:
    """An `EvalResult` back from `write_results`' directory (or its results.json), predictions included."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            result = EvalResult.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompositionError(f"{file}: not an evaluation result ({type(exc).__name__}: {exc})") from None
    preds = os.path.join(os.path.dirname(file), "predictions.jsonl")
    if os.path.isfile(preds):
        with open(preds) as f:
            result.predictions = [json.loads(line) for line in f if line.strip()]
    return result


def write_results(result: EvalResult, out_dir: str) -> Dict[str, str]:
    """results.json (scores, no predictions), predictions.jsonl (one line a question), accuracy.png."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"results": os.path.join(out_dir, "results.json"),
             "predictions": os.path.join(out_dir, "predictions.jsonl"),
             "plot": os.path.join(out_dir, "accuracy.png")}
    with open(paths["results"], "w") as f:
        json.dump(result.to_dict(), f, indent=2)
        f.write("\n")
    with open(paths["predictions"], "w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    plot_results([result], paths["plot"])
    return paths


# -- CLI ------------------------------------------------------------------------------------------
@click.command("mergekit-mm-eval")
@click.argument("model", type=click.Path(file_okay=False))
@click.argument("benchmark", type=click.Path())
@click.option("--out", default=None, metavar="DIR", help="Where results go (default: eval-<model name>).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Default: the checkpoint's dtype as transformers loads it.")
@click.option("--route", default=None, metavar="MODALITY|auto|per-token",
              help="Whole input on this modality's route (MMER retention); 'auto': on an MMER composite, "
                   "single-modality questions on their route, others per token. Default: per-token routing.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N questions.")
@click.option("--subset", "subsets", multiple=True, metavar="NAME", help="Only this subset. Repeatable.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--modality", default=None, help="A single source's modality name (default: from its family).")
@click.option("--template", default=None,
              help="Prompt; {question} and {choices} are filled in, \\n is a new line "
                   "(default: '{question}\\n{choices}\\nAnswer:').")
@click.option("--labels", default=None, metavar="A,B,C,...",
              help="Choice labels shown and scored (default: A..Z). Comma-separated.")
@click.option("--answer-with", type=click.Choice(ANSWER_WITH), default="label", show_default=True,
              help="label: the model answers with the choice's label (MCUB); choice: with the choice's text.")
@click.option("--generate", is_flag=True, help="Greedy generation, first label of the answer (MCUB's way).")
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(1))
@click.option("--num-frames", default=None, type=click.IntRange(1), help="Sample each video to this many frames.")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Keep a single source's one-source composite here for reuse (default: a temporary dir).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(model, benchmark, out, device, dtype, route, limit, subsets, batch_size, modality, template, labels,
         answer_with, generate, max_new_tokens, num_frames, cache_dir, quiet):
    """Multiple-choice accuracy of MODEL (a composite, or one source MLLM) on BENCHMARK
    (benchmark.jsonl / .json, or a directory holding one); see docs/evaluate.md.

    \b
    mergekit-mm-eval ./my-composite ./mcub/benchmark.jsonl --out eval-mine
    mergekit-mm-eval ./llava-1.5-7b ./mcub --subset image --route image
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    template = template.replace("\\n", "\n") if template else DEFAULT_TEMPLATE
    label_list = tuple(s.strip() for s in labels.split(",")) if labels else LETTERS
    try:
        if any(not s for s in label_list) or len(set(label_list)) != len(label_list):
            raise CompositionError(f"--labels {labels!r}: give distinct, non-empty labels")
        result = evaluate(model, benchmark, device=device, dtype=dtype, route=route, limit=limit,
                          batch_size=batch_size, progress=not quiet, subsets=subsets or None, template=template,
                          labels=label_list, generate=generate, max_new_tokens=max_new_tokens, modality=modality,
                          cache_dir=cache_dir, num_frames=num_frames, answer_with=answer_with)
        out = out or f"eval-{result.name}"
        paths = write_results(result, out)
    except CompositionError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_table([result]))
    for s, n in result.skipped.items():
        click.echo(f"skipped {n} {s} question(s): the model lacks a modality they need", err=True)
    click.echo(f"results: {paths['results']}, {paths['predictions']}, {paths['plot']}", err=True)


if __name__ == "__main__":
    main()
