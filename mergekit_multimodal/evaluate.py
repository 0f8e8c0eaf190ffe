"""`mergekit-mm-eval MODEL BENCHMARK`: multiple-choice accuracy of a composite or a single source.

Benchmark format (docs/evaluate.md): a directory with `benchmark.jsonl` (or `.json`, a list), one
question per line: `{"id", "subset", "question", "media": {modality: [paths relative to the file]},
"choices": [...], "answer": "B"}`. In `question`, `<modality>` (e.g. `<image>`, `<point_cloud>`)
marks where each item goes; it becomes the model's own placeholder. The prompt is
`TEMPLATE.format(question=..., choices=...)` with choices written `A . first B . second ...`.

Scoring is MCUB's first-letter rule, computed from one forward pass: the predicted answer is the
choice letter whose token gets the highest next-token logit after the prompt. That is exactly what
greedy decoding's first letter would be when restricted to the choice letters.
A single source (a checkpoint, not a composite) is composed alone with `naive_mc` into a cached
directory first: a one-source NaiveMC composite is that source exactly, so everything runs through
`CompositeModel`.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import click
import torch

from mergekit_multimodal.errors import CompositionError

LETTERS = string.ascii_uppercase
DEFAULT_TEMPLATE = "{question} {choices} answer :"
CHOICE_FORMAT = "{letter} . {choice}"


@dataclass
class Question:
    id: str
    subset: str
    question: str
    media: Dict[str, List[str]]
    choices: List[str]
    answer: str
    where: str = ""  # file:line, for error messages

    @property
    def modalities(self) -> List[str]:
        return [m for m, items in self.media.items() if items]


@dataclass
class Results:
    model: str
    benchmark: str
    route: Optional[str]
    subsets: Dict[str, Dict[str, float]] = field(default_factory=dict)  # name -> accuracy, correct, n
    skipped: Dict[str, int] = field(default_factory=dict)  # subset -> questions the model has no modality for

    @property
    def overall(self) -> float:
        n = sum(s["n"] for s in self.subsets.values())
        return sum(s["correct"] for s in self.subsets.values()) / n if n else float("nan")

    def to_json(self) -> dict:
        return {"model": self.model, "benchmark": self.benchmark, "route": self.route, "overall": self.overall,
                "subsets": self.subsets, "skipped": self.skipped}


def benchmark_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("benchmark.jsonl", "benchmark.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CompositionError(f"{path}: no benchmark.jsonl or benchmark.json in this directory")
    if not os.path.isfile(path):
        raise CompositionError(f"{path}: no such benchmark file or directory")
    return path


def load_benchmark(path: str, limit: Optional[int] = None) -> List[Question]:
    """Parse and check a benchmark: every field, every answer letter, every media file; errors name file:line."""
    fname = benchmark_file(path)
    root = os.path.dirname(os.path.abspath(fname))
    with open(fname, encoding="utf-8") as f:
        text = f.read()
    if fname.endswith(".json"):
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except (json.JSONDecodeError, TypeError) as exc:
            raise CompositionError(f"{fname}: not a JSON list of questions ({exc})") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise CompositionError(f"{fname}:{i}: not valid JSON ({exc.msg})") from None
    out = []
    for lineno, r in rows:
        where = f"{fname}:{lineno}"
        if not isinstance(r, dict):
            raise CompositionError(f"{where}: a question must be a JSON object")
        for key in ("question", "choices", "answer"):
            if key not in r:
                raise CompositionError(f"{where}: missing key {key!r}")
        choices = r["choices"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise CompositionError(f"{where}: 'choices' must be a list of 2 to 26 options")
        answer = str(r["answer"]).strip()
        if len(answer) != 1 or answer.upper() not in LETTERS[: len(choices)]:
            raise CompositionError(f"{where}: answer {r['answer']!r} is not one of the choice letters "
                                   f"{', '.join(LETTERS[: len(choices)])}")
        media = r.get("media") or {}
        if not isinstance(media, dict):
            raise CompositionError(f"{where}: 'media' must map modality -> list of paths")
        resolved = {}
        for m, items in media.items():
            items = [items] if isinstance(items, str) else list(items)
            paths = []
            for item in items:
                p = item if os.path.isabs(item) else os.path.join(root, item)
                if not os.path.isfile(p):
                    raise CompositionError(f"{where}: media file {item!r} ({m}) not found at {p}")
                paths.append(p)
            found = r["question"].count(f"<{m}>")
            if found != len(paths):
                raise CompositionError(f"{where}: the question has {found} '<{m}>' marker(s) for {len(paths)} {m} file(s)")
            resolved[m] = paths
        out.append(Question(str(r.get("id", lineno)), str(r.get("subset", "all")), r["question"], resolved,
                            [str(c) for c in choices], answer.upper(), where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise CompositionError(f"{fname}: no questions")
    return out


def is_composite(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, "composite_config.json"))


def source_as_composite(model_dir: str, modality: Optional[str] = None, cache: Optional[str] = None) -> str:
    """A single source composed alone with naive_mc (== the source) into a cache keyed by its files."""
    from mergekit.options import MergeOptions

    from mergekit_multimodal.api import compose
    from mergekit_multimodal.families import layout_for
    from mergekit_multimodal.runtime.processor import KIND_OF_FAMILY

    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise CompositionError(f"{model_dir}: neither a composite (composite_config.json) nor a checkpoint (config.json)")
    with open(cfg_path, encoding="utf-8") as f:
        family = layout_for(json.load(f), cfg_path).family
    if family.text_only:
        raise CompositionError(f"{model_dir}: a text-only model has no modality to evaluate")
    modality = modality or KIND_OF_FAMILY.get(family.name, family.name)
    stamp = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        st = os.stat(os.path.join(model_dir, name))
        stamp.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    stamp.update(f"{os.path.abspath(model_dir)}:{modality}".encode())
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "mergekit-multimodal", "sources")
    out = os.path.join(cache, stamp.hexdigest()[:16])
    if not is_composite(out):
        compose({"merge_method": "naive_mc", "base_model": model_dir, "dtype": "float32",
                 "models": [{"model": model_dir, "modality": modality}]}, out, MergeOptions(quiet=True),
                overwrite=True)
    return out


def next_token_ids(tokenizer, prompt: str, answers: Sequence[str]) -> List[int]:
    """Token id that starts each answer when the model writes it right after the prompt."""
    base = tokenizer(prompt)["input_ids"]
    ids = []
    for a in answers:
        full = tokenizer(f"{prompt} {a}")["input_ids"]
        if full[: len(base)] != base or len(full) <= len(base):
            raise CompositionError(f"cannot find the first token of answer {a!r} after the prompt")
        ids.append(full[len(base)])
    return ids


def letter_ids(tokenizer, template_prompt: str, n: int) -> List[int]:
    """Token id of each choice letter as the model would write it right after the prompt."""
    return next_token_ids(tokenizer, template_prompt, LETTERS[:n])


def build_prompt(q: Question, placeholders: Dict[str, str], template: str) -> str:
    text = q.question
    for m in q.media:
        text = text.replace(f"<{m}>", placeholders[m])
    choices = " ".join(CHOICE_FORMAT.format(letter=LETTERS[i], choice=c) for i, c in enumerate(q.choices))
    return template.format(question=text, choices=choices)


def evaluate(model_dir: str, benchmark: str, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
             route: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 16,
             template: str = DEFAULT_TEMPLATE, model=None, progress: bool = False, scoring: str = "letter") -> Results:
    """Accuracy per subset. route: None = per-token routing (the loader's default); a modality name =
    every token on that route; "own" = a single-modality question on its own modality's route (MMER's
    retention use), multi-modality questions per-token. `model` reuses a loaded CompositeModel.
    scoring: "letter" (MCUB: the model answers with the choice letter) or "choice" (the model answers
    with the option's text: the highest next-token logit among each option's first token; options
    must then start with distinct tokens)."""
    if scoring not in ("letter", "choice"):
        raise CompositionError(f"scoring must be 'letter' or 'choice', got {scoring!r}")
    from tqdm.auto import tqdm

    from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor

    questions = load_benchmark(benchmark, limit)
    path = model_dir if is_composite(model_dir) else source_as_composite(model_dir)
    model = model or CompositeModel.from_pretrained(path, torch_dtype=dtype, device=device)
    proc = CompositeProcessor.from_pretrained(path)
    placeholders = proc.placeholders
    res = Results(model_dir, benchmark, route)
    usable = []
    for q in questions:
        if all(m in placeholders for m in q.modalities):
            usable.append(q)
        else:
            res.skipped[q.subset] = res.skipped.get(q.subset, 0) + 1
    if route not in (None, "own") and route not in model.route_of:
        raise CompositionError(f"--route {route!r}: the composite has routes for {', '.join(model.route_of) or 'none'}")

    def route_of(q):
        if route == "own":
            return q.modalities[0] if len(q.modalities) == 1 and q.modalities[0] in model.route_of else None
        return route

    groups: Dict[tuple, List[Question]] = {}
    for q in usable:
        groups.setdefault((route_of(q), len(q.choices)), []).append(q)
    tally: Dict[str, List[int]] = {}
    bar = tqdm(total=len(usable), desc=f"eval {os.path.basename(os.path.normpath(model_dir))}", disable=not progress,
               leave=False)
    with torch.no_grad():
        for (r, n), qs in groups.items():
            prompts = [build_prompt(q, placeholders, template) for q in qs]
            ids = torch.tensor(letter_ids(proc.tokenizer, prompts[0], n)) if scoring == "letter" else None
            for i in range(0, len(qs), batch_size):
                chunk, texts = qs[i:i + batch_size], prompts[i:i + batch_size]
                media: Dict[str, List[str]] = {}
                for q in chunk:
                    for m, items in q.media.items():
                        media.setdefault(m, []).extend(items)
                try:
                    inputs = proc(texts, media=media)
                except CompositionError as exc:
                    raise CompositionError(f"{chunk[0].where} (batch of {len(chunk)}): {exc}") from None
                with model.route(r):
                    logits = model(**inputs).logits[:, -1].float()
                if scoring == "letter":
                    pred = logits[:, ids.to(logits.device)].argmax(-1).tolist()
                else:
                    pred = []
                    for row, q, t in zip(logits, chunk, texts):
                        cid = next_token_ids(proc.tokenizer, t, q.choices)
                        if len(set(cid)) != len(cid):
                            raise CompositionError(f"{q.where}: choices start with the same token; use letter scoring")
                        pred.append(int(row[torch.tensor(cid, device=row.device)].argmax()))
                for q, p in zip(chunk, pred):
                    t = tally.setdefault(q.subset, [0, 0])
                    t[0] += int(LETTERS[p] == q.answer)
                    t[1] += 1
                bar.update(len(chunk))
    bar.close()
    for s in sorted(tally):
        c, n = tally[s]
        res.subsets[s] = {"accuracy": c / n, "correct": c, "n": n}
    return res


def evaluate_accuracy(model_dir: str, benchmark: str, *, device: str = "cpu", limit: Optional[int] = None) -> float:
    """Overall accuracy in [0, 1] (the number `mergekit-mm-tune` optimises)."""
    return evaluate(model_dir, benchmark, device=device, limit=limit).overall


def format_table(rows: Dict[str, Dict[str, float]], columns: Sequence[str]) -> str:
    """rows: name -> {column: value in [0,1] or None}; percentages, '-' where absent."""
    width = max([len(r) for r in rows] + [5])
    head = f"{'':<{width}}" + "".join(f"{c:>13}" for c in columns)
    lines = [head]
    for name, vals in rows.items():
        cells = []
        for c in columns:
            v = vals.get(c)
            cells.append(f"{v * 100:>12.1f}%" if isinstance(v, float) else f"{v if v is not None else '-':>13}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def save_plot(rows: Dict[str, Dict[str, float]], columns: Sequence[str], path: str, title: str,
              chance: Optional[float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(columns) * max(1, len(rows)) / 2), 4))
    w = 0.8 / max(1, len(rows))
    for k, (name, vals) in enumerate(rows.items()):
        xs = [i + k * w for i in range(len(columns))]
        ys = [100 * vals[c] if isinstance(vals.get(c), float) else 0 for c in columns]
        ax.bar(xs, ys, w, label=name)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(columns))], columns, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@click.command("mergekit-mm-eval")
@click.argument("model_dir")
@click.argument("benchmark")
@click.option("--out", "out_dir", default=None, help="Directory for results.json and results.png (default: ./eval-<model>).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default=None, help="Default: the stored dtype.")
@click.option("--route", default=None, help="Run every token on this modality's route (MMER); 'own' = each "
              "single-modality question on its own modality's route.")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True, help="Prompt: {question}, {choices}.")
@click.option("--scoring", type=click.Choice(["letter", "choice"]), default="letter", show_default=True,
              help="letter: MCUB first-letter rule; choice: the model answers with the option's text.")
def main(model_dir, benchmark, out_dir, device, dtype, route, limit, batch_size, template, scoring):
    """Multiple-choice accuracy of MODEL_DIR (a composite or a single source MLLM) on BENCHMARK."""
    try:
        res = evaluate(model_dir, benchmark, device=device, dtype=_DTYPES.get(dtype), route=route, limit=limit,
                       batch_size=batch_size, template=template, progress=True, scoring=scoring)
    except CompositionError as exc:
        raise click.ClickException(str(exc)) from None
    out_dir = out_dir or f"eval-{os.path.basename(os.path.normpath(model_dir))}"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res.to_json(), f, indent=2)
    cols = list(res.subsets) + ["overall"]
    row = {**{s: v["accuracy"] for s, v in res.subsets.items()}, "overall": res.overall}
    click.echo(format_table({os.path.basename(os.path.normpath(model_dir)): row}, cols))
    if res.skipped:
        click.echo(f"skipped (modality not in the model): {res.skipped}")
    save_plot({os.path.basename(os.path.normpath(model_dir)): row}, cols, os.path.join(out_dir, "results.png"),
              f"{model_dir} on {benchmark}")
    click.echo(f"wrote {out_dir}/results.json, {out_dir}/results.png")


if __name__ == "__main__":
    main()
