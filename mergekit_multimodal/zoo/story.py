"""`mergekit-mm-zoo [OUT]`: the whole story with no downloads, on a laptop CPU.

Build (or reuse) the zoo -> compose its four sources with each method in COMPOSITES -> evaluate
every source and composite on the held-out commonality benchmark -> one table, a plot, a JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Dict, List, Optional

import click

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.zoo import data as D
from mergekit_multimodal.zoo.train import ZooSpec

#: (row name, merge method, global parameters, per-source parameters, evaluation route).
#: route "own": single-modality questions on their own modality's whole-input route (MMER's
#: retention use), multi-modality questions per-token; None: per-token routing throughout.
#: Last field: the suffix of the source directories (DAMC composes decoupled sources "<m>-damc",
#: built by SOURCE_BUILDERS in zoo/build.py once the damc training helper exists).
COMPOSITES = [
    ("naive_mc", "naive_mc", {}, {}, None, ""),
    ("mmer", "mmer", {}, {}, "own", ""),
    ("mmer per-token", "mmer", {}, {}, None, ""),
    ("ties", "ties", {}, {"weight": 1.0, "density": 0.5}, None, ""),
    ("damc", "damc", {}, {}, None, "-damc"),
]
OWN = list(D.MODALITIES)
COMMON = ["common-2", "common-3", "common-4"]
QUICK = ZooSpec(base_steps=300, connector_steps=60, llm_steps=30, test_per_subset=40)


def composite_config(zoo: str, method: str, params: dict, per_source: dict, suffix: str = "") -> dict:
    models = [{"model": os.path.join(zoo, m + suffix), "modality": m, **({"parameters": per_source} if per_source else {})}
              for m in D.MODALITIES]
    cfg = {"merge_method": method, "base_model": os.path.join(zoo, "base"), "models": models, "dtype": "float32"}
    if params:
        cfg["parameters"] = params
    return cfg


def compose_cached(zoo: str, name: str, cfg: dict) -> str:
    from mergekit.options import MergeOptions

    from mergekit_multimodal.api import compose

    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    out = os.path.join(zoo, "composites", f"{cfg['merge_method']}-{key}")
    if not os.path.isfile(os.path.join(out, "composite_config.json")):
        compose(cfg, out, MergeOptions(quiet=True), overwrite=True)
    return out


def run_story(out_dir: str, spec: ZooSpec = ZooSpec(), cache: Optional[str] = None, echo=click.echo,
              rows_wanted: Optional[List[str]] = None) -> dict:
    """Everything the README's main command does; returns the results dict (also written as JSON)."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    from mergekit_multimodal.evaluate import evaluate, format_table, save_plot, source_as_composite
    from mergekit_multimodal.zoo.build import build_zoo, total_steps

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    timings = {}
    with tqdm(total=total_steps(spec), desc="1/3 zoo: train (or reuse) base + 4 sources", unit="step") as bar:
        zoo = build_zoo(spec, cache, bar.update)
    timings["zoo_s"] = time.time() - t0
    bench = os.path.join(zoo, "bench-test")
    echo(f"zoo: {zoo}\nbenchmark (held-out seed {spec.test_seed}): {bench}")
    torch.set_num_threads(1)
    table: Dict[str, Dict[str, object]] = {}
    results: Dict[str, dict] = {}
    t1 = time.time()
    for m in tqdm(D.MODALITIES, desc="2/3 evaluate each source alone"):
        src = source_as_composite(os.path.join(zoo, m), m, cache=os.path.join(zoo, "sources"))
        r = evaluate(src, bench, scoring="choice")
        results[f"source {m}"] = r.to_json()
        table[f"source {m}"] = {m: r.subsets[m]["accuracy"]}
    own_src = {m: table[f"source {m}"][m] for m in D.MODALITIES}
    rows = [r for r in COMPOSITES if rows_wanted is None or r[0] in rows_wanted]
    for name, method, params, per_source, route, suffix in tqdm(rows, desc="3/3 compose + evaluate"):
        if suffix and not all(os.path.isdir(os.path.join(zoo, m + suffix)) for m in D.MODALITIES):
            echo(f"{name}: not available (no {suffix} sources in the zoo yet)")
            table[name] = {"note": "not available"}
            continue
        try:
            path = compose_cached(zoo, name, composite_config(zoo, method, params, per_source, suffix))
        except CompositionError as exc:
            echo(f"{name}: not available ({str(exc).split(':')[-1].strip()[:90]})")
            table[name] = {"note": "not available"}
            continue
        r = evaluate(path, bench, route=route, scoring="choice")
        results[name] = {**r.to_json(), "composite": path}
        acc = {s: v["accuracy"] for s, v in r.subsets.items()}
        ret = [acc[m] / own_src[m] for m in D.MODALITIES if own_src[m] > 0]
        table[name] = {**acc, "retention": sum(ret) / len(ret) if ret else None}
    timings["eval_s"] = time.time() - t1
    timings["total_s"] = time.time() - t0
    cols = OWN + ["retention"] + COMMON
    printable = {k: {c: v.get(c) for c in cols} for k, v in table.items() if "note" not in v}
    echo("\nAccuracy on the held-out test split (chance: 25%; retention = mean over modalities of "
         "composite own-task accuracy / source own-task accuracy)")
    echo(format_table(printable, cols))
    for k, v in table.items():
        if "note" in v:
            echo(f"{k}: {v['note']}")
    save_plot(printable, OWN + COMMON, os.path.join(out_dir, "zoo-results.png"),
              "Zoo: own tasks and commonality (held-out)", chance=0.25)
    doc = {"zoo": zoo, "benchmark": bench, "spec": dataclasses.asdict(spec), "table": table, "results": results,
           "timings": timings}
    with open(os.path.join(out_dir, "zoo-results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    echo(f"\nwrote {out_dir}/zoo-results.json, {out_dir}/zoo-results.png  ({timings['total_s']:.0f} s: zoo "
         f"{timings['zoo_s']:.0f} s, compose + evaluate {timings['eval_s']:.0f} s)")
    return doc


@click.command("mergekit-mm-zoo")
@click.argument("out_dir", default="zoo-out")
@click.option("--quick", is_flag=True, help="A reduced zoo (fewer training steps, smaller test split), as CI uses.")
@click.option("--cache", default=None, help="Zoo cache (default ~/.cache/mergekit-multimodal/zoo or $MERGEKIT_MM_ZOO_CACHE).")
def main(out_dir, quick, cache):
    """Build the tiny zoo, compose it with every method, evaluate, print the table and save the plot."""
    try:
        run_story(out_dir, QUICK if quick else ZooSpec(), cache)
    except CompositionError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
