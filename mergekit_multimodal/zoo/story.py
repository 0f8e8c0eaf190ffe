"""`mergekit-mm-zoo [OUT]`: the whole story with no downloads, on a laptop CPU.

Build (or reuse) the zoo -> compose its four sources with each method in COMPOSITES -> evaluate
every source and composite on the held-out commonality benchmark -> one table, a plot, a JSON.
Then three sections (rows named by their prefix): FORGETTING (the image source and its fine-tune
on a new task, composed as two task routes), CURVE (retention as 1..N sources are composed) and
EXPORT (each MMER route exported with `mergekit-mm-export` and scored as its source is).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Dict, List, Optional

import click

from mergekit_multimodal.errors import cli_errors
from mergekit_multimodal.zoo import data
from mergekit_multimodal.zoo.train import ZooSpec

if TYPE_CHECKING:
    from mergekit_multimodal.evaluation import EvalResult

#: (row name, merge method, global parameters, per-source parameters, evaluation route).
#: route "auto": single-modality questions on their own modality's whole-input route (MMER's
#: retention use), multi-modality questions per-token; None: per-token routing throughout.
#: Last field: the suffix of each source's decoupled adapters (DAMC: "<m>-damc", built by
#: SOURCE_BUILDERS in zoo/build.py with damc_train); the DAMC lambda_i default to 1/N (untuned).
COMPOSITES = [
    ("naive_mc", "naive_mc", {}, {}, None, ""),
    ("mmer", "mmer", {}, {}, "auto", ""),
    ("mmer per-token", "mmer", {}, {}, None, ""),
    ("ties", "ties", {}, {"weight": 1.0, "density": 0.5}, None, ""),
    ("damc", "damc", {}, {}, None, "-damc"),
]
#: rows composed from a row's YAML with its coefficients searched on bench-val/ (tuned_config)
TUNED = [("damc tuned", "damc", {}, {}, None, "-damc")]
#: the rows of the FORGETTING and CURVE sections (COMPOSITES' rows of these names)
SECTION_ROWS = ("naive_mc", "mmer", "damc")
FORGETTING, CURVE, EXPORT = "forgetting", "curve", "mmer export"  # the sections' row prefixes
#: the forgetting section's pair: the original source and its fine-tune, two task routes of one kind
FORGET_PAIR = (data.FORGET_SOURCE, data.NEW)
#: retention vs number of sources: the zoo's sources composed 1..N at a time, in this order
CURVE_ORDER = data.MODALITIES + (data.NEW,)
OWN = list(data.MODALITIES)
COMMON = ["common-2", "common-3", "common-4"]
#: the composite asked again with shuffled media (the control row)
CONTROL = "mmer"
QUICK = ZooSpec(test_per_subset=40)  # the same zoo, a smaller test split (the CI test)
DEFAULT_SEEDS = 1  # the README's command: within its time budget (docs/zoo.md)


def composite_config(zoo: str, method: str, params: dict, per_source: dict, suffix: str = "",
                     modalities=data.MODALITIES) -> dict:
    """The YAML a user would write; `suffix` names decoupled adapters ("-damc": zoo/<m>-damc) that
    go with each source (its encoder + connector + placeholder)."""
    models = [{"model": os.path.join(zoo, m), "modality": m,
               **({"placeholder": f"<{m}>"} if m == data.NEW else {}),  # its own token: the original's is taken
               **({"adapters": os.path.join(zoo, m + suffix)} if suffix else {}),
               **({"parameters": per_source} if per_source else {})}
              for m in modalities]
    cfg = {"merge_method": method, "base_model": os.path.join(zoo, "base"), "models": models, "dtype": "float32"}
    if params:
        cfg["parameters"] = params
    return cfg


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    """A hash of the package's source: composites made by other code are not reused. Read once
    per process (the story asks for it for every composite)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return h.hexdigest()[:10]


def compose_cached(zoo: str, cfg: dict) -> str:
    """Compose `cfg` once per (config, package code) under the zoo; reused by warm runs."""
    from mergekit.options import MergeOptions

    from mergekit_multimodal.api import compose

    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    out = os.path.join(zoo, f"composites-{code_hash()}", f"{cfg['merge_method']}-{key}")
    if not os.path.isfile(os.path.join(out, "composite_config.json")):
        compose(cfg, out, MergeOptions(quiet=True), overwrite=True)
    return out


#: the zoo's prompt: the evaluator fills {question} and {choices} ("A. red" lines; the zoo's
#: tokenizer splits "A." and ignores new lines, so this is exactly the training format)
TEMPLATE = "{question}\n{choices}\nanswer :"
#: how the story asks every model: the zoo's prompt, answers scored by the choice's first token
ASK = dict(template=TEMPLATE, answer_with="choice", progress=False)


def evaluate_cached(zoo: str, model: str, benchmark: str, **options) -> "EvalResult":
    """`evaluation.evaluate(model, benchmark, **ASK, **options)`, its result kept in the zoo beside the
    composites (`composites-<code_hash>/evaluations/<key>.json`) and read back by later runs. The key
    is the content of every file of `model` (a composite, an export or a source checkpoint), of the
    benchmark's question file and every media file it names, the package's code (`code_hash`, the
    evaluator's included) and the options: a change to any of them asks the model again."""
    from mergekit_multimodal.evaluation import EvalResult, evaluate

    options = {**ASK, **options}
    key = hashlib.sha256(json.dumps({"model": _tree_hash(model), "benchmark": _benchmark_hash(benchmark),
                                     "code": code_hash(), "options": options}, sort_keys=True).encode()).hexdigest()
    path = os.path.join(zoo, f"composites-{code_hash()}", "evaluations", f"{key[:20]}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return EvalResult.from_dict(json.load(f))
    result = evaluate(model, benchmark, **options)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result.to_dict(predictions=True), f)
    os.replace(path + ".tmp", path)  # whole or absent: an interrupted run leaves no half result
    return result


def _file_hashes(h, root: str, paths) -> None:
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())


def _tree_hash(directory: str) -> str:
    """sha256 over every file under `directory` (relative names and contents)."""
    h = hashlib.sha256()
    _file_hashes(h, directory, sorted(os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs))
    return h.hexdigest()


_BENCH_FILES: Dict[tuple, List[str]] = {}
_BENCH_HASHES: Dict[tuple, str] = {}


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def _benchmark_hash(benchmark: str) -> str:
    """sha256 over a benchmark's question file and every media file its questions name (not the
    other files beside it); read once per process while none of those files changes (size, mtime)."""
    from mergekit_multimodal.evaluation import load_benchmark
    from mergekit_multimodal.evaluation.benchmark import _benchmark_file

    questions = _benchmark_file(os.fspath(benchmark))
    if _stamp(questions) not in _BENCH_FILES:  # the media its questions name
        _BENCH_FILES[_stamp(questions)] = [questions] + sorted(
            {p for q in load_benchmark(questions) for items in q.media.values() for p in items})
    files = _BENCH_FILES[_stamp(questions)]
    stamp = tuple(map(_stamp, files))
    if stamp not in _BENCH_HASHES:
        h = hashlib.sha256()
        _file_hashes(h, os.path.dirname(questions), files)
        _BENCH_HASHES[stamp] = h.hexdigest()
    return _BENCH_HASHES[stamp]


def run_story(out_dir: str, spec: ZooSpec = ZooSpec(), cache: Optional[str] = None, echo=click.echo,
              rows_wanted: Optional[List[str]] = None, seeds: int = 1) -> dict:
    """Everything the README's main command does, for `seeds` zoos (seeds spec.seed, spec.seed + 1,
    ...); returns the results dict (also written as JSON): `table` holds the means over seeds,
    `intervals` their 95% intervals (zoo/stats.py), `claims` the comparisons the README makes."""
    import torch
    from tqdm.auto import tqdm

    from mergekit_multimodal.evaluation import transformers_output
    from mergekit_multimodal.zoo.build import build_zoo, total_steps

    threads = torch.get_num_threads()
    with transformers_output(bars=False, errors_only=True):  # the story prints its own progress
        try:
            os.makedirs(out_dir, exist_ok=True)
            t0 = time.time()
            timings = {"zoo_s": 0.0, "eval_s": 0.0, "sections_s": 0.0}  # sections: within eval_s
            runs = []
            for k in range(seeds):
                sp = dataclasses.replace(spec, seed=spec.seed + k)
                t1 = time.time()
                with tqdm(total=total_steps(sp), unit="step", desc=f"seed {sp.seed} ({k + 1}/{seeds}) 1/3 zoo: train "
                          "(or reuse) base, 4 sources + a fine-tune, 5 DAMC adapters") as bar:
                    zoo = build_zoo(sp, cache, bar.update)
                timings["zoo_s"] += time.time() - t1
                for d in (f"composites-{code_hash()}", f"sources-{code_hash()}"):  # in use: dated now (prune)
                    if os.path.isdir(os.path.join(zoo, d)):
                        os.utime(os.path.join(zoo, d))
                stale = prune_stale_composites(zoo, code_hash())
                if stale:
                    echo(f"removed {len(stale)} composite cache(s) made by other versions of the package: "
                         f"{', '.join(stale)}")
                bench = os.path.join(zoo, "bench-test")
                echo(f"zoo (seed {sp.seed}): {zoo}\nbenchmark (held-out seed {spec.test_seed}): {bench}")
                torch.set_num_threads(1)  # tiny models: one thread beats two fighting over small kernels
                t1 = time.time()
                runs.append(_evaluate_seed(zoo, bench, rows_wanted, f"seed {sp.seed} ({k + 1}/{seeds})"))
                timings["eval_s"] += time.time() - t1
                timings["sections_s"] += runs[-1]["sections_s"]
                torch.set_num_threads(threads)
            timings["total_s"] = time.time() - t0
            return _summarise(out_dir, spec, runs, echo, timings)
        finally:
            torch.set_num_threads(threads)


def prune_stale_composites(zoo: str, current: str) -> List[str]:
    """Delete the zoo's `composites-<hash>` / `sources-<hash>` caches of other package code that
    were last changed over a day ago: this code never reads them again (the hash is part of their
    name) and each holds a dozen composites."""
    import re
    import shutil

    pattern = re.compile(r"^(composites|sources)-([0-9a-f]{10})$")  # the names compose_cached makes
    day_ago = time.time() - 86400  # spare caches used in the last day (another checkout may be running)
    stale = sorted(d for d in os.listdir(zoo) if (m := pattern.match(d)) and m.group(2) != current
                   and os.path.isdir(os.path.join(zoo, d)) and os.path.getmtime(os.path.join(zoo, d)) < day_ago)
    for d in stale:
        shutil.rmtree(os.path.join(zoo, d))
    return stale


def _correct(r: "EvalResult") -> Dict[str, List[int]]:
    """subset -> 1/0 per question, in question-id order (the same order in every seed's benchmark)."""
    out: Dict[str, List[int]] = {}
    for p in sorted(r.predictions, key=lambda p: p["id"]):
        out.setdefault(p["subset"], []).append(int(p["correct"]))
    return out


def _evaluate_seed(zoo: str, bench: str, rows_wanted: Optional[List[str]], label: str) -> dict:
    """One zoo: each source alone, every composite of COMPOSITES (and the tuned DAMC one), the
    shuffled-media control. Returns per-question correctness per row, results, composite paths."""
    from tqdm.auto import tqdm

    correct: Dict[str, Dict[str, List[int]]] = {"sources": {}}
    results: Dict[str, dict] = {}
    plotted: Dict[str, "EvalResult"] = {}
    for m in tqdm(data.MODALITIES, desc=f"{label} 2/3 evaluate each source alone"):
        r = evaluate_cached(zoo, os.path.join(zoo, m), bench, modality=m, subsets=[m],
                            cache_dir=os.path.join(zoo, f"sources-{code_hash()}"), name=f"source {m}")
        results[f"source {m}"] = r.to_dict(predictions=True)
        correct["sources"].update(_correct(r))
    rows = [r for r in COMPOSITES if rows_wanted is None or r[0] in rows_wanted]
    rows += [r for r in TUNED if rows_wanted is None or r[0] in rows_wanted]
    paths = {}
    asked: Dict[tuple, Dict[str, List[int]]] = {}  # (composite, route, benchmark) -> correctness per subset
    for name, method, params, per_source, route, suffix in tqdm(rows, desc=f"{label} 3/3 compose + evaluate"):
        if suffix and f"{method} sources" not in correct:  # decoupled sources: each alone, a one-source composite
            correct[f"{method} sources"] = {}
            results[f"{method} sources"] = {}
            for m in data.MODALITIES:
                path = compose_cached(zoo, composite_config(zoo, method, params, per_source, suffix, [m]))
                r = evaluate_cached(zoo, path, bench, subsets=[m], route=route, name=f"{name} source {m}")
                correct[f"{method} sources"].update(_correct(r))
                asked[(path, route, bench)] = _correct(r)
                results[f"{method} sources"][m] = r.to_dict(predictions=True)
        cfg = composite_config(zoo, method, params, per_source, suffix)
        if name in (r[0] for r in TUNED):
            cfg = tuned_config(zoo, cfg)
        path = compose_cached(zoo, cfg)
        paths[name] = (path, route)
        plotted[name] = _record(name, evaluate_cached(zoo, path, bench, route=route, name=name), correct, results,
                                path)
        asked[(path, route, bench)] = correct[name]
    if CONTROL in paths:  # the same composite and questions, each question shown another question's media
        path, route = paths[CONTROL]
        name = f"{CONTROL}, media shuffled"
        plotted[name] = _record(name, evaluate_cached(zoo, path, shuffled_media_benchmark(bench), route=route,
                                                      name=name), correct, results, path)
    t0 = time.time()
    section = [r for r in rows if r[0] in SECTION_ROWS]
    paths.update(_evaluate_forgetting(zoo, section, correct, results))
    _evaluate_curve(zoo, section, correct, asked)
    refused = _evaluate_exports(zoo, bench, paths["mmer"][0], correct, results) if "mmer" in paths else {}
    if "mmer" in paths:
        _evaluate_low_rank_exports(zoo, bench, paths["mmer"][0], correct, results)
    return {"zoo": zoo, "benchmark": bench, "correct": correct, "results": results, "paths": paths,
            "plotted": plotted, "export_refused": refused, "sections_s": time.time() - t0}


def _record(name: str, r: "EvalResult", correct: dict, results: dict, path: Optional[str] = None) -> "EvalResult":
    """Keep one evaluation: its per-question correctness and its results (with the composite's path)."""
    results[name] = {**r.to_dict(predictions=True), **({"composite": path} if path else {})}
    correct[name] = _correct(r)
    return r


def _evaluate_forgetting(zoo: str, rows: list, correct: dict, results: dict) -> Dict[str, tuple]:
    """FORGETTING: the original source (data.FORGET_SOURCE), its fine-tune on the `more` task
    (data.NEW) and each method's composite of the two (task routes `image` and `image_new`; MMER's
    single-input questions on their own route), on bench-forget/'s old task (the original's, its
    media given as `image`) and new task (media given as `image_new`). Returns the composites' paths."""
    bench = os.path.join(zoo, "bench-forget")
    for label, m in (("source", data.FORGET_SOURCE), ("fine-tune", data.NEW)):  # alone: named NEW, any task
        name = f"{FORGETTING} {label} {m}"
        _record(name, evaluate_cached(zoo, os.path.join(zoo, m), bench, modality=data.NEW, name=name,
                                      cache_dir=os.path.join(zoo, f"sources-{code_hash()}")), correct, results)
    paths = {}
    for row, method, params, per_source, route, suffix in rows:
        name = f"{FORGETTING} {row}"
        path = compose_cached(zoo, composite_config(zoo, method, params, per_source, suffix, FORGET_PAIR))
        paths[name] = (path, route)
        _record(name, evaluate_cached(zoo, path, bench, route=route, name=name), correct, results, path)
    return paths


def _own_tasks(zoo: str, modalities) -> Dict[str, List[str]]:
    """benchmark dir -> the subsets that are these sources' own tasks (data.NEW's: bench-forget's new task)."""
    out: Dict[str, List[str]] = {}
    for m in modalities:
        bench, subset = ("bench-forget", data.NEW_TASK) if m == data.NEW else ("bench-test", m)
        out.setdefault(os.path.join(zoo, bench), []).append(subset)
    return out


def _evaluate_curve(zoo: str, rows: list, correct: dict, asked: Dict[tuple, Dict[str, List[int]]]) -> None:
    """CURVE (MMER's figure 4): each method's composite of the first k sources of CURVE_ORDER,
    k = 1..N, on those sources' own tasks only: rows `curve <row> <k>`; references `curve <ref>`
    (the sources alone, each on its own task; DAMC's: the decoupled sources alone). A composite the
    story already asked the same questions (`asked`: k = 4, the main rows; DAMC's k = 1, its decoupled
    image source) is not asked again."""
    new = f"{FORGETTING} fine-tune {data.NEW}"
    if "sources" in correct and new in correct:
        correct[f"{CURVE} sources"] = {**correct["sources"], data.NEW_TASK: correct[new][data.NEW_TASK]}
    for row, method, params, per_source, route, suffix in rows:
        ref = f"{CURVE} {_reference(row)}"
        if ref not in correct:  # the decoupled sources: each alone, a one-source composite
            correct[ref] = dict(correct[_reference(row)])
            r = evaluate_cached(zoo, compose_cached(zoo, composite_config(zoo, method, params, per_source, suffix,
                                                                         [data.NEW])),
                                os.path.join(zoo, "bench-forget"), subsets=[data.NEW_TASK], route=route)
            correct[ref].update(_correct(r))
        for k in range(1, len(CURVE_ORDER) + 1):
            path = compose_cached(zoo, composite_config(zoo, method, params, per_source, suffix, CURVE_ORDER[:k]))
            correct[f"{CURVE} {row} {k}"] = {}
            for bench, subsets in _own_tasks(zoo, CURVE_ORDER[:k]).items():
                done = asked.get((path, route, bench), {})
                if not all(s in done for s in subsets):
                    done = _correct(evaluate_cached(zoo, path, bench, subsets=subsets, route=route))
                correct[f"{CURVE} {row} {k}"].update({s: done[s] for s in subsets})


def _evaluate_exports(zoo: str, bench: str, composite: str, correct: dict, results: dict) -> Dict[str, str]:
    """EXPORT: each route of the MMER composite written as a plain checkpoint of its source class
    (`mergekit-mm-export COMPOSITE OUT --route m`, cached beside the composite) and evaluated exactly
    as a source is, on its own task. Returns the refused routes with the reason (the point-cloud
    family has no transformers class: refused by design)."""
    from mergekit_multimodal.errors import CompositionError
    from mergekit_multimodal.export import export

    root = composite + "-exports"
    refused: Dict[str, str] = {}
    correct[EXPORT] = {}
    results[EXPORT] = {}
    for m in data.MODALITIES:
        out = os.path.join(root, m)
        if not os.path.isdir(out):
            try:
                export(composite, out, m)
            except CompositionError as e:
                refused[m] = str(e)
                continue
        r = evaluate_cached(zoo, out, bench, modality=m, subsets=[m],
                            cache_dir=os.path.join(zoo, f"sources-{code_hash()}"), name=f"{EXPORT} {m}")
        correct[EXPORT].update(_correct(r))
        results[EXPORT][m] = {**r.to_dict(predictions=True), "checkpoint": out}
    return refused


#: ranks of the low-rank MMER adapters the export section scores (the zoo's LLM: hidden 64, MLP 128)
LORA_RANKS = (1, 4, 16)


def _evaluate_low_rank_exports(zoo: str, bench: str, composite: str, correct: dict, results: dict) -> None:
    """EXPORT at low rank: each route of the MMER composite as `mergekit-mm-export --lora --rank r
    --base` (its source class holding the merged LLM + a rank-r adapter), the adapter merged into the
    base by PEFT (what an engine applying it computes) and evaluated as a source is; rows
    "mmer export lora r<r>", each route's reported probe logit error in the results. Routes the
    checkpoint export refuses (point cloud) are left out, as there."""
    import shutil

    import transformers
    from peft import PeftModel

    from mergekit_multimodal.compose import output
    from mergekit_multimodal.errors import CompositionError
    from mergekit_multimodal.export import REPORT, export

    root = composite + "-exports"
    for rank in LORA_RANKS:
        row = f"{EXPORT} lora r{rank}"
        correct[row], results[row] = {}, {}
        for m in data.MODALITIES:
            pair, merged = os.path.join(root, f"{m}-lora-r{rank}"), os.path.join(root, f"{m}-lora-r{rank}-merged")
            if not os.path.isdir(merged):
                try:
                    if not os.path.isdir(pair):
                        export(composite, pair, m, lora=True, rank=rank, base=True)
                except CompositionError:
                    continue  # refused as the checkpoint export is (the EXPORT section names why)

                def write(tmp, pair=pair):
                    base_dir = os.path.join(pair, "base")
                    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
                        cls = getattr(transformers, json.load(f)["architectures"][0])
                    model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), os.path.join(pair, "lora"))
                    model.merge_and_unload().save_pretrained(tmp)
                    for name in os.listdir(base_dir):  # tokenizer, processor, generation config
                        if not os.path.exists(os.path.join(tmp, name)) and not name.startswith("model"):
                            shutil.copy(os.path.join(base_dir, name), os.path.join(tmp, name))

                output.write_aside(merged, write)
            r = evaluate_cached(zoo, merged, bench, modality=m, subsets=[m],
                                cache_dir=os.path.join(zoo, f"sources-{code_hash()}"), name=f"{row} {m}")
            correct[row].update(_correct(r))
            with open(os.path.join(pair, "lora", REPORT), encoding="utf-8") as f:
                probe = json.load(f)["probe"]
            results[row][m] = {**r.to_dict(predictions=True), "adapter": pair, "probe": probe}


def tuned_config(zoo: str, cfg: dict) -> dict:
    """DAMC's lambda_i chosen by `mergekit-mm-tune`'s search (tune.tune, coordinate descent over its
    default candidates, one round) on the validation split bench-val/; the choice is cached in the zoo."""
    from mergekit_multimodal.evaluation import evaluate_accuracy
    from mergekit_multimodal.tune import apply_values, tune

    cached = os.path.join(zoo, f"composites-{code_hash()}", f"{cfg['merge_method']}-tuned.json")
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        val = os.path.join(zoo, "bench-val")
        ask = {k: v for k, v in ASK.items() if k != "progress"}
        res = tune(cfg, lambda d: evaluate_accuracy(d, val, **ask), strategy="coordinate", max_rounds=1,
                   workdir=os.path.dirname(cached), progress=False)
        with open(cached, "w", encoding="utf-8") as f:
            json.dump({"best": res.best, "val_accuracy": res.best_score, "trials": res.trials}, f)
    with open(cached, encoding="utf-8") as f:
        return apply_values(cfg, json.load(f)["best"])


def _summarise(out_dir: str, spec: ZooSpec, runs: List[dict], echo, timings: dict) -> dict:
    """Means and intervals over seeds and questions; the table, the plot, the JSON, the links."""
    from mergekit_multimodal.evaluation import plot_results
    from mergekit_multimodal.zoo import stats
    from mergekit_multimodal.zoo.build import write_examples

    correct = stats.stack([r["correct"] for r in runs])
    plan = stats.draws(correct)
    table: Dict[str, Dict[str, float]] = {}
    intervals: Dict[str, Dict[str, List[float]]] = {}
    for row, subsets in correct.items():
        for s in subsets:
            point, lo, hi = stats.estimate(correct, stats.accuracy(row, s), plan)
            table.setdefault(row, {})[s] = point
            intervals.setdefault(row, {})[s] = [lo, hi]
        ref = _reference(row)
        if row.startswith(CURVE) and row.rsplit(" ", 1)[-1].isdigit():  # curve <row> <k>: against curve <ref>
            ref = f"{CURVE} {_reference(row.split(' ')[1])}"
        elif row.startswith((FORGETTING, CURVE)):
            continue
        if ref in correct and row not in (ref, "damc sources") and "shuffled" not in row:
            own = [s for s in subsets if s in correct[ref] and s not in COMMON]
            point, lo, hi = stats.estimate(correct, stats.retention(row, ref, own), plan)
            table[row]["retention"], intervals[row]["retention"] = point, [lo, hi]
    claims = _claims(correct, plan)
    cell = lambda row, c: (table[row][c], *intervals[row][c])  # noqa: E731
    main = [r for r in table if not r.startswith((FORGETTING, CURVE, EXPORT))]
    cols = OWN + ["retention"] + COMMON
    echo(f"\nAccuracy % on the held-out test split, mean [95% interval] over {len(runs)} seed(s) and the "
         "questions (chance: 25%; retention = mean over modalities of composite own-task accuracy / source "
         "own-task accuracy; damc rows: against the decoupled sources)")
    echo(format_story_table({k: {c: cell(k, c) for c in cols if c in table[k]} for k in main}, cols))
    sections = _sections(out_dir, spec, runs, table, intervals, echo)
    echo("\nClaims (difference or value, [95% interval]):")
    for c in claims:
        echo(f"  {c['claim']}: {stats.fmt(*c['value'])}  -> {'holds' if c['holds'] else 'NOT shown'} beyond the interval")
    first = runs[0]["plotted"]
    means = [_mean_row(n, {s: (table[n][s], sc.chance) for s, sc in r.subsets.items()}, r.benchmark)
             for n, r in first.items()]
    src = _mean_row("sources (own task)", {m: (table["sources"][m], 0.25) for m in OWN}, means[0].benchmark)
    plot_results([src] + means, os.path.join(out_dir, "zoo-results.png"),
                 intervals=[{m: intervals["sources"][m] for m in OWN}] + [intervals[r.name] for r in means])
    examples = write_examples(os.path.join(out_dir, "examples"))
    links = _link_composites(out_dir, runs[0]["paths"])
    doc = {"zoo": runs[0]["zoo"], "benchmark": runs[0]["benchmark"], "spec": dataclasses.asdict(spec),
           "seeds": [spec.seed + k for k in range(len(runs))], "table": table, "intervals": intervals,
           "claims": claims, **sections, "interval_method": "two-level paired bootstrap over seeds and questions (zoo/stats.py)",
           "results": runs[0]["results"], "per_seed": [{"zoo": r["zoo"], "correct": r["correct"]} for r in runs],
           "composites": links, "examples": examples, "timings": timings}
    with open(os.path.join(out_dir, "zoo-results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    echo(f"\nwrote {out_dir}/zoo-results.json, {out_dir}/zoo-results.png, {out_dir}/zoo-forgetting.png, "
         f"{out_dir}/zoo-retention.png, {out_dir}/composites/ (seed "
         f"{spec.seed}'s), {out_dir}/examples/  ({timings['total_s']:.0f} s: zoo {timings['zoo_s']:.0f} s, "
         f"compose + evaluate {timings['eval_s']:.0f} s)")
    return doc


def _sections(out_dir: str, spec: ZooSpec, runs: List[dict], table: dict, intervals: dict, echo) -> dict:
    """Print the FORGETTING, CURVE and EXPORT tables, plot the first two; their JSON entries."""
    cell = lambda row, c: (table[row][c], *intervals[row][c])  # noqa: E731
    out: dict = {}
    forget = [r for r in table if r.startswith(FORGETTING)]
    if forget:
        cols = [data.OLD_TASK, data.NEW_TASK]
        echo(f"\nForgetting: the {data.FORGET_SOURCE} source fine-tuned on a new task ('{data.MORE_Q.split(' : ')[1]}', "
             f"{spec.forget_steps} steps, every weight), then composed with its original as two task routes "
             f"({data.FORGET_SOURCE}, {data.NEW}); accuracy % on bench-forget/ ({data.OLD_TASK}: the original's task)")
        echo(format_story_table({r[len(FORGETTING) + 1:]: {c: cell(r, c) for c in cols} for r in forget}, cols))
        rows = [_mean_row(r[len(FORGETTING) + 1:], {c: (table[r][c], 0.25) for c in cols}, "bench-forget") for r in forget]
        from mergekit_multimodal.evaluation import plot_results

        plot_results(rows, os.path.join(out_dir, "zoo-forgetting.png"),
                     intervals=[{c: intervals[r][c] for c in cols} for r in forget])
        out["forgetting"] = {r[len(FORGETTING) + 1:]: {c: list(cell(r, c)) for c in cols} for r in forget}
    curve = {row: [(k, cell(f"{CURVE} {row} {k}", "retention")) for k in range(1, len(CURVE_ORDER) + 1)
                   if "retention" in table.get(f"{CURVE} {row} {k}", {})] for row in SECTION_ROWS}
    curve = {row: pts for row, pts in curve.items() if pts}
    if curve:
        ks = [str(k) for k in range(1, len(CURVE_ORDER) + 1)]
        echo(f"\nRetention % vs number of sources composed (own tasks only; the first k of "
             f"{', '.join(CURVE_ORDER)}; damc against the decoupled sources)")
        echo(format_story_table({row: {str(k): v for k, v in pts} for row, pts in curve.items()}, ks))
        plot_curve(curve, os.path.join(out_dir, "zoo-retention.png"), CURVE_ORDER)
        out["retention_curve"] = {"order": list(CURVE_ORDER),
                                  "rows": {row: [[k, *v] for k, v in pts] for row, pts in curve.items()}}
    if EXPORT in table:
        have = [m for m in OWN if m in table[EXPORT]]
        refused = {m: why for r in runs for m, why in r["export_refused"].items()}
        echo("\nExport: each route of the mmer composite written by mergekit-mm-export as a plain checkpoint "
             "of its source class, evaluated as its source is (own task, accuracy %)")
        echo(format_story_table({"source": {m: cell("sources", m) for m in have},
                                 EXPORT: {c: cell(EXPORT, c) for c in have + ["retention"]}}, have + ["retention"]))
        for m, why in refused.items():
            echo(f"  {m}: refused: {why}")
        out["export"] = {"routes": {m: list(cell(EXPORT, m)) for m in have}, "retention": list(cell(EXPORT, "retention")),
                         "refused": refused}
        out.update(_low_rank_section(runs, table, cell, have, echo))
    return out


def _low_rank_section(runs: List[dict], table: dict, cell, have: List[str], echo) -> dict:
    """The low-rank rows of EXPORT (`_evaluate_low_rank_exports`): accuracy and retention per rank,
    and the probe logit error each adapter's export reported (seed 0)."""
    rows = [f"{EXPORT} lora r{r}" for r in LORA_RANKS if f"{EXPORT} lora r{r}" in table]
    if not rows:
        return {}
    echo("\nExport at low rank: each mmer route as `mergekit-mm-export --lora --rank r --base`, the adapter merged "
         "into its base (PEFT), evaluated as its source is (own task, accuracy %; probe: the relative logit error "
         "the export reported)")
    cols = [m for m in have if all(m in table[r] for r in rows)] + ["retention"]
    echo(format_story_table({row[len(EXPORT) + 1:]: {c: cell(row, c) for c in cols} for row in rows}, cols))
    probes = {row[len(EXPORT) + 1:]: {m: v["probe"]["relative_error"] for m, v in runs[0]["results"][row].items()}
              for row in rows}
    for name, p in probes.items():
        echo(f"  {name} probe: " + ", ".join(f"{m} {v:.3g}" for m, v in p.items()))
    return {"export_lora": {row[len(EXPORT) + 1:]: {"routes": {c: list(cell(row, c)) for c in cols if c != "retention"},
                                                    "retention": list(cell(row, "retention")),
                                                    "probe": probes[row[len(EXPORT) + 1:]]} for row in rows}}


def plot_curve(curve: Dict[str, list], path: str, order) -> str:
    """Retention (%) against the number of sources composed, one line per method with interval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for row, pts in curve.items():
        ks = [k for k, _ in pts]
        ys = [100 * v[0] for _, v in pts]
        err = [[100 * (v[0] - v[1]) for _, v in pts], [100 * (v[2] - v[0]) for _, v in pts]]
        ax.errorbar(ks, ys, yerr=err, marker="o", capsize=2, label=row)
    ax.set_xticks(range(1, len(order) + 1), [f"{k}\n+{m}" for k, m in enumerate(order, start=1)], fontsize=7)
    ax.set_xlabel("sources composed")
    ax.set_ylabel("retention (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _reference(row: str) -> str:
    """The row a composite's retention is measured against: the decoupled sources for DAMC."""
    return "damc sources" if row.startswith("damc") else "sources"


def _claims(correct, plan) -> List[dict]:
    """The comparisons the README states, each with its interval; `holds` when the interval clears 0
    (a difference), or the threshold (MMER retention >= 99%; the control: its interval reaches chance)."""
    from mergekit_multimodal.zoo import stats

    out = []

    def add(claim, stat, holds):
        value = stats.estimate(correct, stat, plan)
        out.append({"claim": claim, "value": list(value), "holds": bool(holds(*value))})

    ret = {r: stats.retention(r, _reference(r), OWN) for r in correct if _reference(r) in correct
           and r != _reference(r) and r not in ("damc sources",) and "shuffled" not in r}
    if "mmer" in ret:
        add("mmer retention >= 99%", ret["mmer"], lambda p, lo, hi: lo >= 0.99)
    for other in ("naive_mc", "ties", "damc"):
        if "mmer" in ret and other in ret:
            add(f"mmer retention - {other} retention > 0", stats.difference(ret["mmer"], ret[other]),
                lambda p, lo, hi: lo > 0)
    src, new = f"{FORGETTING} source {data.FORGET_SOURCE}", f"{FORGETTING} fine-tune {data.NEW}"
    if src in correct and new in correct:
        add(f"forgetting: source {data.FORGET_SOURCE} - its fine-tune on {data.OLD_TASK} > 0",
            stats.difference(stats.accuracy(src, data.OLD_TASK), stats.accuracy(new, data.OLD_TASK)),
            lambda p, lo, hi: lo > 0)
    # MMER's claim: the composite of an MLLM and its fine-tune mitigates the fine-tune's forgetting
    # (old task above the fine-tune's) while keeping the new task (not below the fine-tune's)
    for row in ("naive_mc", "mmer", "damc"):
        if new in correct and f"{FORGETTING} {row}" in correct:
            add(f"forgetting: {row} - the fine-tune on {data.OLD_TASK} > 0", stats.difference(
                stats.accuracy(f"{FORGETTING} {row}", data.OLD_TASK), stats.accuracy(new, data.OLD_TASK)),
                lambda p, lo, hi: lo > 0)
            add(f"forgetting: {row} - the fine-tune on {data.NEW_TASK} not below 0", stats.difference(
                stats.accuracy(f"{FORGETTING} {row}", data.NEW_TASK), stats.accuracy(new, data.NEW_TASK)),
                lambda p, lo, hi: hi >= 0)
    for row in ("mmer", "damc"):
        for task in (data.OLD_TASK, data.NEW_TASK):
            if f"{FORGETTING} {row}" in correct and f"{FORGETTING} naive_mc" in correct:
                add(f"forgetting: {row} - naive_mc on {task} > 0", stats.difference(
                    stats.accuracy(f"{FORGETTING} {row}", task), stats.accuracy(f"{FORGETTING} naive_mc", task)),
                    lambda p, lo, hi: lo > 0)
    for c in COMMON:
        for row in ("mmer", "damc", "damc tuned"):
            if row in correct and "naive_mc" in correct:
                add(f"{row} - naive_mc on {c} > 0", stats.difference(stats.accuracy(row, c),
                                                                       stats.accuracy("naive_mc", c)),
                    lambda p, lo, hi: lo > 0)
        for row in ("naive_mc", "mmer", "damc"):
            if row in correct:
                add(f"{row} on {c} > chance (25%)", stats.accuracy(row, c), lambda p, lo, hi: lo > 0.25)
        if f"{CONTROL}, media shuffled" in correct:
            add(f"{CONTROL}, media shuffled, on {c} not above chance", stats.accuracy(f"{CONTROL}, media shuffled", c),
                lambda p, lo, hi: lo <= 0.25)
    return out


def _mean_row(name: str, subsets: Dict[str, tuple], benchmark: str) -> "EvalResult":
    from mergekit_multimodal.evaluation import EvalResult, SubsetScore

    scores = {s: SubsetScore(0, 0, acc, chance) for s, (acc, chance) in subsets.items()}
    macro = sum(s.accuracy for s in scores.values()) / len(scores)
    return EvalResult(model=name, benchmark=benchmark, name=name, subsets=scores, overall=macro, correct=0, total=0,
                      macro=macro, predictions=[], seconds=0.0)


def _link_composites(out_dir: str, paths: Dict[str, tuple]) -> Dict[str, str]:
    """out_dir/composites/<row> -> the cached composite (symbolic links), for `mergekit-mm-run`."""
    root = os.path.join(out_dir, "composites")
    os.makedirs(root, exist_ok=True)
    links = {}
    for name, (path, _) in paths.items():
        link = os.path.join(root, name.replace(" ", "-"))
        if os.path.islink(link) or os.path.exists(link):
            os.remove(link)
        os.symlink(os.path.abspath(path), link)
        links[name] = link
    return links


def shuffled_media_benchmark(bench: str, seed: int = 0) -> str:
    """A control: the benchmark's questions with their media permuted among the questions of the
    same subset and modalities, so no question sees its own inputs. Scores near chance mean the
    composites' answers come from the media."""
    import random

    out = os.path.join(bench, f"benchmark-media-shuffled-seed{seed}.jsonl")
    if not os.path.isfile(out):
        with open(os.path.join(bench, "benchmark.jsonl"), encoding="utf-8") as f:
            questions = [json.loads(line) for line in f if line.strip()]
        rng = random.Random(seed)
        key = lambda q: (q["subset"], tuple(sorted(q["media"])))  # noqa: E731  same modalities: same markers
        for k in dict.fromkeys(map(key, questions)):
            group = [q for q in questions if key(q) == k]
            media = [q["media"] for q in group]
            order = list(range(len(group)))
            while len(group) > 1 and any(i == j for i, j in enumerate(order)):  # no question keeps its own
                rng.shuffle(order)
            for q, j in zip(group, order):
                q["media"] = media[j]
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(q) + "\n" for q in questions)
        os.replace(out + ".tmp", out)
    return out


def format_story_table(rows: Dict[str, Dict[str, tuple]], cols: List[str]) -> str:
    """Models as rows (the evaluator's own table puts models in columns): cells (mean, low, high) as
    percentages `mean [low, high]`, '-' where n/a."""
    from mergekit_multimodal.zoo.stats import fmt

    head = ["model"] + cols
    body = [[name] + ["-" if v.get(c) is None else fmt(*v[c]) for c in cols] for name, v in rows.items()]
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    fmt_row = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(head), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in body])


@click.command("mergekit-mm-zoo")
@click.argument("out_dir", default="zoo-out")
@click.option("--quick", is_flag=True, help="A smaller test split (40 questions a subset), as CI uses.")
@click.option("--seeds", default=DEFAULT_SEEDS, show_default=True, type=click.IntRange(1),
              help="Train and evaluate this many zoos (seeds 0..N-1): means and 95% intervals over seeds and questions.")
@click.option("--cache", default=None, help="Zoo cache (default ~/.cache/mergekit-multimodal/zoo or $MERGEKIT_MM_ZOO_CACHE).")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def main(out_dir, quick, seeds, cache, debug):
    """Build the tiny zoo, compose it with every method, evaluate, print the table and save the plot."""
    with cli_errors(exit_code=1, debug=debug):
        run_story(out_dir, QUICK if quick else ZooSpec(), cache, seeds=seeds)


if __name__ == "__main__":
    main()
