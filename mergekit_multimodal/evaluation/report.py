"""Outputs: the accuracy table, the bar chart, and results.json / predictions.jsonl written and read back."""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.evaluation.scoring import EvalResult


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


def plot_results(results: Sequence[EvalResult], path: str,
                 intervals: Optional[Sequence[Mapping[str, Tuple[float, float]]]] = None) -> str:
    """A bar chart of accuracy per subset (grouped by model when several), chance as dashed lines.
    `intervals`: per result, subset -> (low, high) accuracy, drawn as error bars."""
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
        span = intervals[k] if intervals else {}
        err = [[max(0.0, y - 100 * span[subsets[i]][0]) if subsets[i] in span else 0.0 for i, y in zip(have, ys)],
               [max(0.0, 100 * span[subsets[i]][1] - y) if subsets[i] in span else 0.0 for i, y in zip(have, ys)]]
        bars = ax.bar(xs, ys, width=width * 0.95, label=r.name, yerr=err if span else None,
                      error_kw={"elinewidth": 0.7, "capsize": 1.5})
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
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CompositionError(f"{out_dir}: exists and is not a directory; results need a directory")
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
