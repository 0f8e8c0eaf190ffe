"""Adaptive adjustment: search a composite's coefficients on validation data (`mergekit-mm-tune`).

DAMC's lambda_i (and MMER's alpha / lambda) are chosen on a validation set (Chen et al., 2024;
research notes §3). Each candidate is composed into a temporary directory with
`mergekit_multimodal.api.compose` and scored by `score_fn(composite_dir) -> float` (higher is
better): the CLI's `--val BENCHMARK` scores with `mergekit_multimodal.evaluation.evaluate_accuracy`,
Python users pass any callback. Strategies: `grid` (every combination) and `coordinate`
(coordinate descent: one key at a time over its candidates, others fixed, until a round changes
nothing; far fewer composes when there are several keys). The best values are written back into
a copy of the YAML.

Search-space keys: `<modality>.<param>` for a per-model parameter (`image.lambda`), `<param>` for
a method parameter (`alpha`).
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import click
import tqdm
import yaml

from mergekit_multimodal.errors import CompositionError, cli_errors
from mergekit_multimodal.evaluation import ANSWER_WITH

Space = Mapping[str, Sequence[Any]]
ScoreFn = Callable[[str], float]

#: default candidates when the CLI gets no --space
DEFAULT_LAMBDAS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_SPACES = {"mmer": {"alpha": (0.5, 0.75, 1.0), "lambda": (0.5, 1.0, 1.5)}}


@dataclass
class TuneResult:
    best: Dict[str, Any]
    best_score: float
    trials: List[Tuple[Dict[str, Any], float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the YAML with the best values written in

    def table(self) -> str:
        """The trials as a plain-text table, best first."""
        keys = list(self.best)
        rows = sorted(self.trials, key=lambda t: -t[1])
        cells = [keys + ["score"]] + [[_fmt(a[k]) for k in keys] + [f"{s:.4f}"] for a, s in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def apply_values(config: dict, values: Mapping[str, Any]) -> dict:
    """A copy of the YAML dict with each `<modality>.<param>` / `<param>` set."""
    cfg = copy.deepcopy(config)
    by_modality = {m.get("modality"): m for m in cfg.get("models") or []}
    for key, value in values.items():
        modality, sep, param = key.rpartition(".")
        if sep:
            if modality not in by_modality:
                raise CompositionError(f"search key {key!r}: no model with modality {modality!r}; "
                                       f"modalities: {', '.join(map(str, by_modality))}")
            by_modality[modality].setdefault("parameters", {})[param] = value
        else:
            cfg.setdefault("parameters", {})[param] = value
    return cfg


def default_space(config: dict) -> Dict[str, Sequence[Any]]:
    method = config.get("merge_method")
    if method == "damc":
        return {f"{m['modality']}.lambda": DEFAULT_LAMBDAS for m in config.get("models") or []}
    if method in DEFAULT_SPACES:
        return dict(DEFAULT_SPACES[method])
    raise CompositionError(f"no default search space for merge_method {method!r}; give --space KEY=v1,v2")


def tune(config: Union[dict, str], score_fn: ScoreFn, space: Optional[Space] = None, strategy: str = "grid", *,
         max_rounds: int = 5, workdir: Optional[str] = None, options=None, progress: bool = True) -> TuneResult:
    """Search `space` for the values maximising `score_fn(composite_dir)`.

    config: the composite YAML as a dict, or a path to it. Returns the best values, every trial
    (a candidate is composed and scored once, even when coordinate descent revisits it) and the
    config with the best values written in.
    """
    from mergekit.options import MergeOptions

    from mergekit_multimodal.api import compose

    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    space = {k: list(v) for k, v in (space or default_space(config)).items()}
    if not space or any(not v for v in space.values()):
        raise CompositionError("the search space is empty (every key needs at least one candidate)")
    if strategy not in ("grid", "coordinate"):
        raise CompositionError(f"strategy {strategy!r}: choose grid or coordinate")
    options = options or MergeOptions(quiet=True, write_model_card=False)
    keys = list(space)
    scores: Dict[tuple, float] = {}
    trials: List[Tuple[Dict[str, Any], float]] = []
    total = len(list(itertools.product(*space.values()))) if strategy == "grid" else None
    bar = tqdm.tqdm(total=total, desc=f"Tuning ({strategy})", unit="candidate", disable=not progress)

    def score(values: Tuple) -> float:
        if values in scores:
            return scores[values]
        assignment = dict(zip(keys, values))
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            out = compose(apply_values(config, assignment), os.path.join(tmp, "composite"), options)
            s = float(score_fn(out))
        scores[values] = s
        trials.append((assignment, s))
        bar.update(1)
        bar.set_postfix(best=max(scores.values()))
        return s

    try:
        if strategy == "grid":
            for values in itertools.product(*space.values()):
                score(values)
        else:
            current = [v[len(v) // 2] for v in space.values()]  # start mid-range
            for _ in range(max_rounds):
                changed = False
                for i, key in enumerate(keys):
                    tried = {v: score(tuple(current[:i] + [v] + current[i + 1:])) for v in space[key]}
                    best_v = max(tried, key=tried.get)
                    if tried[best_v] > tried[current[i]]:  # ties keep the current value
                        current[i], changed = best_v, True
                if not changed:
                    break
    finally:
        bar.close()
    best_values = max(scores, key=scores.get)
    best = dict(zip(keys, best_values))
    return TuneResult(best, scores[best_values], trials, apply_values(config, best))


def _benchmark_scorer(benchmark: str, device: str, limit: Optional[int], **prompt) -> ScoreFn:
    """Overall accuracy on `benchmark` through mergekit-mm-eval's evaluator; `prompt`: its
    template / answer_with / route options, so a model is tuned on the prompt it is used with."""
    from mergekit_multimodal.evaluation import evaluate_accuracy

    return lambda d: evaluate_accuracy(d, benchmark, device=device, limit=limit, **prompt)


def _parse_space(items: Sequence[str]) -> Dict[str, List[Any]]:
    space = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise click.BadParameter(f"{item!r}: expected KEY=v1,v2,...", param_hint="--space")
        space[key] = [yaml.safe_load(v) for v in values.split(",")]
    return space


@click.command("mergekit-mm-tune")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--val", "benchmark", required=True, help="validation benchmark, scored with mergekit-mm-eval's evaluator")
@click.option("--space", multiple=True, help="KEY=v1,v2,... (e.g. image.lambda=0.25,0.5,1); default: the method's")
@click.option("--strategy", type=click.Choice(["grid", "coordinate"]), default="grid", show_default=True)
@click.option("--out", "out_file", default="tuned.yml", show_default=True, help="the YAML with the chosen values")
@click.option("--device", default="cpu", show_default=True)
@click.option("--limit", type=int, default=None, help="score on the first N validation examples only")
@click.option("--workdir", default=None, help="where candidates are composed (a temporary directory each)")
@click.option("--template", default=None, help="the evaluator's prompt template (mergekit-mm-eval --template)")
@click.option("--answer-with", type=click.Choice(ANSWER_WITH), default="label", show_default=True,
              help="as mergekit-mm-eval --answer-with")
@click.option("--route", default=None, help="as mergekit-mm-eval --route (e.g. auto)")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def main(config_file, benchmark, space, strategy, out_file, device, limit, workdir, template, answer_with, route,
         debug):
    """Search CONFIG_FILE's coefficients on a validation benchmark; write the best as a YAML."""
    with cli_errors(exit_code=1, debug=debug):
        with open(config_file, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        prompt = dict(answer_with=answer_with, route=route)
        if template:
            prompt["template"] = template.replace("\\n", "\n")
        scorer = _benchmark_scorer(benchmark, device, limit, **prompt)
        result = tune(config, scorer, _parse_space(space) or None, strategy, workdir=workdir)
    click.echo(result.table())
    with cli_errors(exit_code=1, debug=debug), open(out_file, "w", encoding="utf-8") as f:
        prompt_args = "".join(f" --{k.replace('_', '-')} {v!r}" for k, v in prompt.items() if v is not None)
        f.write(f"# mergekit-mm-tune --val {benchmark} --strategy {strategy}{prompt_args}: "
                f"best score {result.best_score:.4f}\n")
        yaml.safe_dump(result.config, f, sort_keys=False)
    click.echo(f"best: {', '.join(f'{k}={_fmt(v)}' for k, v in result.best.items())} "
               f"(score {result.best_score:.4f}); written to {out_file}")


if __name__ == "__main__":  # pragma: no cover
    main()
