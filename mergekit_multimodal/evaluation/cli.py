"""`mergekit-mm-eval`: the command line over `evaluate` and `write_results`."""

from __future__ import annotations

import os

import click

from mergekit_multimodal.errors import CompositionError, cli_errors
from mergekit_multimodal.evaluation.benchmark import LETTERS
from mergekit_multimodal.evaluation.prompts import ANSWER_WITH, DEFAULT_TEMPLATE, SCORINGS
from mergekit_multimodal.evaluation.report import format_table, write_results
from mergekit_multimodal.evaluation.running import DTYPE_NAMES, evaluate
from mergekit_multimodal.runtime.model import resolve_device


@click.command("mergekit-mm-eval")
@click.argument("model", type=click.Path(file_okay=False))
@click.argument("benchmark", type=click.Path())
@click.option("--out", default=None, metavar="DIR", help="Where results go (default: eval-<model name>).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_NAMES)), default=None,
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
@click.option("--scoring", type=click.Choice(SCORINGS), default=None,
              help="logits (default): the labels' next-token logits; first-label: greedy generation, the first "
                   "label in the output; first-char: greedy generation, right when the output's first character "
                   "is the answer's letter (ModelCompose's MCUB/AVQA scoring).")
@click.option("--generate", is_flag=True, help="Same as --scoring first-label.")
@click.option("--answers", "answers_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="ModelCompose files: the answers file (default: <prefix>answer.json beside BENCHMARK, "
                   "e.g. MCUB-answer.json).")
@click.option("--media-root", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="ModelCompose files: the directory media paths are relative to (default: the one holding "
                   "data/, walking up from BENCHMARK).")
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(1))
@click.option("--num-frames", default=None, type=click.IntRange(1), help="Sample each video to this many frames.")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Keep a single source's one-source composite here for reuse (default: a temporary dir).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def main(model, benchmark, out, device, dtype, route, limit, subsets, batch_size, modality, template, labels,
         answer_with, scoring, generate, answers_path, media_root, max_new_tokens, num_frames, cache_dir, quiet,
         debug):
    """Multiple-choice accuracy of MODEL (a composite, or one source MLLM) on BENCHMARK
    (benchmark.jsonl / .json, a directory holding one, or ModelCompose's MCUB-4.json,
    MCUB-3-<modalities>.json, avqa-test_mm_<modalities>.json as they are); see docs/evaluate.md.

    \b
    mergekit-mm-eval ./my-composite ./mcub/benchmark.jsonl --out eval-mine
    mergekit-mm-eval ./llava-1.5-7b ./mcub --subset image --route image
    mergekit-mm-eval ./my-composite ModelCompose/data/test/MCUB-4.json --scoring first-char
    """
    template = template.replace("\\n", "\n") if template else DEFAULT_TEMPLATE
    label_list = tuple(s.strip() for s in labels.split(",")) if labels else LETTERS
    with cli_errors(exit_code=1, debug=debug):
        device = str(resolve_device(device))
        if out is not None and os.path.exists(out) and not os.path.isdir(out):
            raise CompositionError(f"--out {out}: exists and is not a directory")
        if any(not s for s in label_list) or len(set(label_list)) != len(label_list):
            raise CompositionError(f"--labels {labels!r}: give distinct, non-empty labels")
        result = evaluate(model, benchmark, device=device, dtype=dtype, route=route, limit=limit,
                          batch_size=batch_size, progress=not quiet, subsets=subsets or None, template=template,
                          labels=label_list, generate=generate, max_new_tokens=max_new_tokens, modality=modality,
                          cache_dir=cache_dir, num_frames=num_frames, answer_with=answer_with, scoring=scoring,
                          answers=answers_path, media_root=media_root)
        out = out or f"eval-{result.name}"
        paths = write_results(result, out)
    click.echo(format_table([result]))
    for s, n in result.skipped.items():
        click.echo(f"skipped {n} {s} question(s): the model lacks a modality they need", err=True)
    click.echo(f"results: {paths['results']}, {paths['predictions']}, {paths['plot']}", err=True)


if __name__ == "__main__":
    main()
