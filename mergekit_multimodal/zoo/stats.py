"""Means and 95% intervals over seeds and questions: a two-level (hierarchical) paired bootstrap.

Each replicate draws the seeds with replacement, then the questions of each subset with replacement
(the same draw for every row: all rows answer the same questions, so differences between rows are
paired), and recomputes every statistic from the resampled per-question correctness. The interval
is the 2.5th-97.5th percentile of the replicates; the point estimate is the statistic on the data
as they are (for an accuracy: the mean over seeds of the per-seed accuracy). With one seed the
interval covers question sampling only.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

#: correctness: row -> subset -> [seeds x questions] 0/1 array (the same questions in the same order per seed)
Correct = Mapping[str, Mapping[str, np.ndarray]]
#: a statistic: maps {row: {subset: per-seed accuracy array}} to one number per seed (array [seeds])
Stat = Callable[[Mapping[str, Mapping[str, np.ndarray]]], np.ndarray]


def draws(correct: Correct, replicates: int = 2000,
          seed: int = 0) -> Tuple[np.ndarray, Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]]]:
    """The resampling plan: seed indices [B, S], per subset question indices [B, Q], and every row's
    resampled accuracies (computed once: `estimate` reads them for each statistic)."""
    rng = np.random.default_rng(seed)
    shapes = {s: a.shape for subsets in correct.values() for s, a in subsets.items()}
    n_seeds = next(iter(shapes.values()))[0]
    seeds = rng.integers(0, n_seeds, (replicates, n_seeds)) if n_seeds > 1 else np.zeros((replicates, 1), int)
    questions = {s: rng.integers(0, shape[1], (replicates, shape[1])) for s, shape in sorted(shapes.items())}
    return seeds, questions, accuracies(correct, questions)


def accuracies(correct: Correct, questions: Mapping[str, np.ndarray] = None) -> Dict[str, Dict[str, np.ndarray]]:
    """Per-seed accuracies {row: {subset: [S]}} (questions None), or per replicate and seed [B, S]."""
    if questions is None:
        return {r: {s: a.mean(axis=1) for s, a in subsets.items()} for r, subsets in correct.items()}
    return {r: {s: a[:, questions[s]].mean(axis=-1).T for s, a in subsets.items()} for r, subsets in correct.items()}


def estimate(correct: Correct, stat: Stat, plan=None) -> Tuple[float, float, float]:
    """(point estimate, 2.5th percentile, 97.5th percentile) of `stat` averaged over seeds."""
    seeds, _, resampled = plan or draws(correct)
    point = float(np.mean(stat(accuracies(correct))))
    per_replicate = stat(resampled)  # [B, S]
    values = np.take_along_axis(per_replicate, seeds, axis=1).mean(axis=1)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return point, float(lo), float(hi)


def accuracy(row: str, subset: str) -> Stat:
    return lambda acc: acc[row][subset]


def retention(row: str, reference: str, subsets: Sequence[str]) -> Stat:
    """Mean over `subsets` of row accuracy / reference accuracy (subsets where the reference is 0 left out)."""
    def stat(acc):
        ratios = [np.where(acc[reference][s] > 0, acc[row][s] / np.maximum(acc[reference][s], 1e-12), np.nan)
                  for s in subsets]
        return np.nanmean(np.stack(ratios), axis=0)
    return stat


def difference(a: Stat, b: Stat) -> Stat:
    return lambda acc: a(acc) - b(acc)


def fmt(point: float, lo: float, hi: float) -> str:
    return f"{100 * point:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def stack(per_seed: List[Mapping[str, Mapping[str, Sequence[int]]]]) -> Dict[str, Dict[str, np.ndarray]]:
    """Per-seed {row: {subset: [0/1 per question]}} -> {row: {subset: [S, Q] array}} (rows every seed has)."""
    rows = [r for r in per_seed[0] if all(r in s for s in per_seed)]
    return {r: {sub: np.array([s[r][sub] for s in per_seed], dtype=float) for sub in per_seed[0][r]} for r in rows}
