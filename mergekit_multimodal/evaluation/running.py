"""The evaluation loop: questions filtered, prompts grouped by route, batches, next-token logits
(or greedy generation), predictions scored into an `EvalResult`."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mergekit.common import dtype_from_name

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.evaluation.benchmark import LETTERS, Question, load_benchmark
from mergekit_multimodal.evaluation.models import _resolve_modalities, composite_for
from mergekit_multimodal.evaluation.prompts import (
    ANSWER_WITH,
    DEFAULT_TEMPLATE,
    SCORINGS,
    _Answers,
    _label_ids,
    build_prompt,
    first_char_label,
    parse_label,
)
from mergekit_multimodal.evaluation.scoring import EvalResult, _score

#: the `dtype` names (and --dtype choices) a model is evaluated in; mergekit's dtype_from_name makes the torch dtype
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def evaluate(model_dir: str, benchmark: Union[str, os.PathLike, Sequence[Question]], *, device: str = "cpu",
             dtype: Optional[str] = None, route: Optional[str] = None, limit: Optional[int] = None,
             batch_size: int = 8, progress: bool = True, subsets: Optional[Sequence[str]] = None,
             template: str = DEFAULT_TEMPLATE, labels: Sequence[str] = LETTERS, generate: bool = False,
             max_new_tokens: int = 8, modality: Optional[str] = None, cache_dir: Optional[str] = None,
             num_frames: Optional[int] = None, name: Optional[str] = None,
             answer_with: str = "label", scoring: Optional[str] = None,
             answers: Optional[Union[str, os.PathLike]] = None,
             media_root: Optional[Union[str, os.PathLike]] = None) -> EvalResult:
    """Accuracy of a composite (or of one source MLLM, composed alone with NaiveMC) on a benchmark.

    route: None (or "per-token") = per-token routing; a modality = the whole input on that modality's
    route (MMER retention); "auto" = on an MMER composite, questions with one modality on its
    whole-input route, the others per token (runtime.auto_route).
    Questions needing a modality the model lacks are skipped (counted in `skipped`).
    answer_with: "label" (MCUB: the model answers with the choice's label, A/B/...) or "choice" (it
    answers with the choice's own text, scored by the text's first token; e.g. the zoo's tiny models).
    scoring: "logits" (default), "first-label" (greedy generation, its first label; `generate=True`
    is the same) or "first-char" (greedy generation, right when the stripped output begins with the
    answer's label: ModelCompose's MCUB/AVQA scoring, `text.strip()[:1] == letter`).
    answers, media_root: for ModelCompose's files (`load_benchmark`).
    """
    from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor, resolve_route

    start = time.time()
    bench_name = benchmark if isinstance(benchmark, (str, os.PathLike)) else "<questions>"
    if scoring is None:
        scoring = "first-label" if generate else "logits"
    if scoring not in SCORINGS or (generate and scoring == "logits"):
        raise CompositionError(f"scoring must be one of {', '.join(SCORINGS[1:] if generate else SCORINGS)} "
                               f"(generate=True generates), got {scoring!r}")
    if scoring == "first-char" and answer_with == "choice":
        raise CompositionError("scoring='first-char' compares the output with the answer's label; "
                               "it does not go with answer_with='choice'")
    generate = scoring != "logits"
    if isinstance(benchmark, (str, os.PathLike)):
        questions = load_benchmark(benchmark, answers=answers, media_root=media_root)
    else:
        questions = list(benchmark)
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
    if dtype and dtype not in DTYPE_NAMES:
        raise CompositionError(f"dtype {dtype!r}: choose from {', '.join(DTYPE_NAMES)}")

    composite, temporary = composite_for(model_dir, modality=modality, cache_dir=cache_dir)
    try:
        proc = CompositeProcessor.from_pretrained(composite, num_frames=num_frames)
        routes = list(proc.modalities) if proc.manifest.routes else []  # as CompositeModel.route_of
        if route == "per-token":
            route = None
        if route not in (None, "auto") and route not in routes:
            raise CompositionError(f"no route {route!r}; routes: {', '.join(routes) or 'none (not MMER)'}")

        jobs: Dict[Optional[str], List[Tuple[Question, str, Dict[str, str]]]] = {}
        markers: Dict[str, str] = {}  # what a prompt writes for an item: the processor lays it out as the source's does
        skipped: Dict[str, int] = {}
        lacking = set()
        for q in questions:
            res = _resolve_modalities(q, proc)
            if res is None:
                skipped[q.subset] = skipped.get(q.subset, 0) + 1
                lacking.update(m for m in q.media if m not in proc.modalities
                               and sum(proc.kind(c) == m for c in proc.modalities) != 1)
                continue
            r = resolve_route(route, proc.manifest, res.values())
            for m in res.values():
                if m not in markers:
                    markers[m] = proc.item_marker(m)
            jobs.setdefault(r, []).append((q, build_prompt(q, markers, template, q.labels or labels.shown, res), res))
        if not jobs:
            raise CompositionError(f"no question of the benchmark can be asked: the model has modalities "
                                   f"{', '.join(proc.modalities)}; skipped {sum(skipped.values())}, which need "
                                   f"{', '.join(sorted(lacking))}")

        label_cache: Dict[Tuple[str, Tuple[str, ...]], List[List[int]]] = {}
        if not generate:  # label tokens checked before the model loads
            for items in jobs.values():
                for q, prompt, _ in items:
                    _label_ids(proc, q, prompt, labels, label_cache)
        torch_dtype = dtype_from_name(dtype)
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
                                      _run_batch(model, proc, batch, labels, label_cache, scoring,
                                                 max_new_tokens)):
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
                      seconds=round(time.time() - start, 3), route=route, mode=_MODES[scoring],
                      skipped=skipped, composite=None if temporary else composite)


def evaluate_accuracy(model_dir: str, benchmark: str, *, device: str = "cpu", limit: Optional[int] = None,
                      **options) -> float:
    """Overall accuracy in [0, 1] (correct / total); `options` as `evaluate`'s (template, route...)."""
    return evaluate(model_dir, benchmark, device=device, limit=limit, progress=False, **options).overall


#: EvalResult.mode per scoring ("generate" as before for the first label)
_MODES = {"logits": "logits", "first-label": "generate", "first-char": "first-char"}


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


def _run_batch(model, proc, batch, labels, label_cache, scoring, max_new_tokens) -> List[Dict[str, Any]]:
    try:
        inputs = _inputs(proc, batch)
    except CompositionError:
        if len(batch) == 1:
            q = batch[0][0]
            raise CompositionError(f"{q.where} (id {q.id}): {_last_error(proc, batch)}") from None
        # e.g. videos of different frame counts cannot share a call: one question at a time
        return [o for b in batch for o in _run_batch(model, proc, [b], labels, label_cache, scoring, max_new_tokens)]
    if scoring != "logits":
        read = first_char_label if scoring == "first-char" else parse_label
        with torch.inference_mode():
            new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = proc.batch_decode(new, skip_special_tokens=True)
        out = []
        for (q, _, _), t in zip(batch, texts):
            labs = labels.of(q)
            idx = read(t, labs)
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
