"""`mergekit-mm-zoo [OUT]`: the whole story with no downloads, on a laptop CPU.

Build (or reuse) the zoo -> compose its four sources with each method in COMPOSITES -> evaluate
every source and composite on the held-out commonality benchmark -> one table, a plot, a JSON.
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
OWN = list(data.MODALITIES)
COMMON = ["common-2", "common-3", "common-4"]
#: the composite asked again with shuffled media (the control row)
CONTROL = "mmer"
QUICK = ZooSpec(test_per_subset=40)  # the same zoo, a smaller test split (the CI test)


def composite_config(zoo: str, method: str, params: dict, per_source: dict, suffix: str = "",
                     modalities=data.MODALITIES) -> dict:
    """The YAML a user would write; `suffix` names decoupled adapters ("-damc": zoo/<m>-damc) that
    go with each source (its encoder + connector + placeholder)."""
    models = [{"model": os.path.join(zoo, m), "modality": m,
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


def run_story(out_dir: str, spec: ZooSpec = ZooSpec(), cache: Optional[str] = None, echo=click.echo,
              rows_wanted: Optional[List[str]] = None) -> dict:
    """Everything the README's main command does; returns the results dict (also written as JSON)."""
    import torch
    from tqdm.auto import tqdm

    from mergekit_multimodal.evaluation import transformers_output
    from mergekit_multimodal.zoo.build import build_zoo, total_steps

    threads = torch.get_num_threads()
    with transformers_output(bars=False, errors_only=True):  # the story prints its own progress
        try:
            os.makedirs(out_dir, exist_ok=True)
            t0 = time.time()
            timings = {}
            with tqdm(total=total_steps(spec), desc="1/3 zoo: train (or reuse) base, 4 sources, 4 DAMC adapters",
                      unit="step") as bar:
                zoo = build_zoo(spec, cache, bar.update)
            timings["zoo_s"] = time.time() - t0
            for d in (f"composites-{code_hash()}", f"sources-{code_hash()}"):  # in use: dated now (prune)
                if os.path.isdir(os.path.join(zoo, d)):
                    os.utime(os.path.join(zoo, d))
            stale = prune_stale_composites(zoo, code_hash())
            if stale:
                echo(f"removed {len(stale)} composite cache(s) made by other versions of the package: {', '.join(stale)}")
            bench = os.path.join(zoo, "bench-test")
            echo(f"zoo: {zoo}\nbenchmark (held-out seed {spec.test_seed}): {bench}")
            torch.set_num_threads(1)  # tiny models: one thread beats two fighting over small kernels
            return _compose_and_evaluate(out_dir, spec, zoo, bench, echo, rows_wanted, timings, t0)
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


def _compose_and_evaluate(out_dir, spec, zoo, bench, echo, rows_wanted, timings, t0) -> dict:
    from tqdm.auto import tqdm

    from mergekit_multimodal.evaluation import evaluate, plot_results

    ask = dict(template=TEMPLATE, answer_with="choice", progress=False)
    table: Dict[str, Dict[str, object]] = {}
    results: Dict[str, dict] = {}
    plotted: List[EvalResult] = []
    t1 = time.time()
    own_results = {}
    for m in tqdm(data.MODALITIES, desc="2/3 evaluate each source alone"):
        r = evaluate(os.path.join(zoo, m), bench, modality=m, subsets=[m],
                     cache_dir=os.path.join(zoo, f"sources-{code_hash()}"),
                     name=f"source {m}", **ask)
        own_results[m] = r
        results[f"source {m}"] = r.to_dict(predictions=True)
        table[f"source {m}"] = {m: r.subsets[m].accuracy}
    own_src = {m: table[f"source {m}"][m] for m in data.MODALITIES}
    plotted.append(_sources_row(own_results))
    rows = [r for r in COMPOSITES if rows_wanted is None or r[0] in rows_wanted]
    paths = {}
    for name, method, params, per_source, route, suffix in tqdm(rows, desc="3/3 compose + evaluate"):
        own = own_src
        if suffix:  # decoupled sources: retention against each one alone (a one-source composite of it)
            alone = {m: evaluate(compose_cached(zoo, composite_config(zoo, method, params, per_source, suffix,
                                                                            [m])),
                                 bench, subsets=[m], route=route, name=f"{name} source {m}", **ask)
                     for m in data.MODALITIES}
            own = {m: r.subsets[m].accuracy for m, r in alone.items()}
            table[f"{name} sources"] = dict(own)
            results[f"{name} sources"] = {m: r.to_dict(predictions=True) for m, r in alone.items()}
        path = compose_cached(zoo, composite_config(zoo, method, params, per_source, suffix))
        paths[name] = (path, route)
        r = evaluate(path, bench, route=route, name=name, **ask)
        plotted.append(r)
        results[name] = {**r.to_dict(predictions=True), "composite": path}
        acc = {s: v.accuracy for s, v in r.subsets.items()}
        ret = [acc[m] / own[m] for m in data.MODALITIES if own[m] > 0]
        table[name] = {**acc, "retention": sum(ret) / len(ret) if ret else None}
    if CONTROL in paths:  # the same composite and questions, each question shown another question's media
        path, route = paths[CONTROL]
        name = f"{CONTROL}, media shuffled"
        r = evaluate(path, shuffled_media_benchmark(bench), route=route, name=name, **ask)
        plotted.append(r)
        results[name] = {**r.to_dict(predictions=True), "composite": path}
        table[name] = {s: v.accuracy for s, v in r.subsets.items()}
    timings["eval_s"] = time.time() - t1
    timings["total_s"] = time.time() - t0
    cols = OWN + ["retention"] + COMMON
    printable = {k: {c: v.get(c) for c in cols} for k, v in table.items()}
    echo("\nAccuracy on the held-out test split (chance: 25%; retention = mean over modalities of "
         "composite own-task accuracy / source own-task accuracy; damc: against the decoupled sources)")
    echo(format_story_table(printable, cols))
    plot_results(plotted, os.path.join(out_dir, "zoo-results.png"))
    doc = {"zoo": zoo, "benchmark": bench, "spec": dataclasses.asdict(spec), "table": table, "results": results,
           "timings": timings}
    with open(os.path.join(out_dir, "zoo-results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    echo(f"\nwrote {out_dir}/zoo-results.json, {out_dir}/zoo-results.png  ({timings['total_s']:.0f} s: zoo "
         f"{timings['zoo_s']:.0f} s, compose + evaluate {timings['eval_s']:.0f} s)")
    return doc


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


def _sources_row(own: Dict[str, "EvalResult"]) -> "EvalResult":
    """The four sources' own-task scores as one row of the plot."""
    from mergekit_multimodal.evaluation import EvalResult

    subsets = {m: r.subsets[m] for m, r in own.items()}
    correct, total = sum(s.correct for s in subsets.values()), sum(s.total for s in subsets.values())
    return EvalResult(model="sources", benchmark=next(iter(own.values())).benchmark, name="sources (own task)",
                      subsets=subsets, overall=correct / total, correct=correct, total=total,
                      macro=sum(s.accuracy for s in subsets.values()) / len(subsets), predictions=[], seconds=0.0)


def format_story_table(rows: Dict[str, Dict[str, Optional[float]]], cols: List[str]) -> str:
    """Models as rows (the evaluator's own table puts models in columns): percentages, '-' where n/a."""
    head = ["model"] + cols
    body = [[name] + ["-" if v.get(c) is None else f"{100 * v[c]:.1f}%" for c in cols] for name, v in rows.items()]
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


@click.command("mergekit-mm-zoo")
@click.argument("out_dir", default="zoo-out")
@click.option("--quick", is_flag=True, help="A smaller test split (40 questions a subset), as CI uses.")
@click.option("--cache", default=None, help="Zoo cache (default ~/.cache/mergekit-multimodal/zoo or $MERGEKIT_MM_ZOO_CACHE).")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def main(out_dir, quick, cache, debug):
    """Build the tiny zoo, compose it with every method, evaluate, print the table and save the plot."""
    with cli_errors(exit_code=1, debug=debug):
        run_story(out_dir, QUICK if quick else ZooSpec(), cache)


if __name__ == "__main__":
    main()
