"""`mergekit-mm-example [DIR]`: the built-in example, end to end, in seconds on a CPU.

Builds tiny stand-ins of real MLLM families that share one base LLM (those whose family file
marks them `in_example`: image, two kinds of video, audio; random weights, real classes and key
layouts), writes a YAML, composes it with `mmer` and `naive_mc` through the same code
as `mergekit-mm-yaml`, and prints what a user would check: the files, each modality's
placeholder, and how close each modality's LLM weights stay to its own source.
"""

from __future__ import annotations

import os
import shutil

import click
import yaml

from mergekit_multimodal.api import run_yaml
from mergekit_multimodal.format.manifest import Manifest
from mergekit_multimodal.methods.routes import iter_route

def _kinds() -> dict:
    """Tiny stand-in -> its modality, for the families' stand-ins marked `in_example`."""
    from mergekit_multimodal.families import tiny_sources
    from mergekit_multimodal.testing import EXAMPLE_KINDS

    return {k: tiny_sources()[k][1] for k in EXAMPLE_KINDS}


def example_config(family, method: str) -> dict:
    models = []
    for kind, t in _kinds().items():
        m = {"model": str(family.sources[kind]), "modality": t.modality}
        if t.placeholder:
            m["placeholder"] = t.placeholder  # its own is taken by another source
        models.append(m)
    return {"merge_method": method, "base_model": str(family.base), "models": models, "dtype": "float32"}


def relative_distance(composite: str, modality: str, source_dir: str) -> float:
    """sum |route - source| / sum |source - base| over the shared LLM rows: 0 = the source itself."""
    from mergekit.common import ModelReference
    from mergekit.options import MergeOptions

    from mergekit_multimodal.compose.checkpoint import Checkpoint

    src = Checkpoint.open("source", ModelReference.parse(source_dir), MergeOptions())
    base_dir = os.path.join(os.path.dirname(source_dir), "base")
    base = Checkpoint.open("base", ModelReference.parse(base_dir), MergeOptions())
    num = den = 0.0
    for name, w in iter_route(composite, modality):
        s, b = src.get(name).float(), base.get(name).float()
        n = b.shape[0] if b.ndim else None
        w, s = (w[:n], s[:n]) if n else (w, s)
        num += (w - s).abs().sum().item()
        den += (s - b).abs().sum().item()
    return num / den


@click.command("mergekit-mm-example")
@click.argument("out_dir", default="example-out")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def main(out_dir: str, debug: bool):
    """Build tiny source MLLMs in OUT_DIR, compose them with MMER and NaiveMC, and compare the routes."""
    from mergekit_multimodal.errors import cli_errors

    with cli_errors(exit_code=1, debug=debug):
        _story(out_dir)


#: written into OUT_DIR, so a re-run knows the directory is an earlier example's and may replace it
MARKER = ".mergekit-mm-example"


def _claim(out_dir: str) -> None:
    """OUT_DIR must be absent, empty, or an earlier run's output (which is replaced): never delete
    a directory this command did not make."""
    from mergekit_multimodal.errors import CompositionError

    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise CompositionError(f"{out_dir}: exists and is not a directory; choose another output directory")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MARKER)):
            raise CompositionError(f"{out_dir}: exists and is not an earlier mergekit-mm-example output; "
                                   "choose another (or an empty) directory")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    open(os.path.join(out_dir, MARKER), "w").close()


def _story(out_dir: str):
    from mergekit.options import MergeOptions

    from mergekit_multimodal.testing import build_tiny_family

    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's per-shard bars drown the story
    _claim(out_dir)
    click.echo(f"1/3 building tiny source MLLMs in {out_dir}/models ...")
    family = build_tiny_family(os.path.join(out_dir, "models"), tuple(_kinds()))
    results = {}
    for step, method in enumerate(("mmer", "naive_mc"), start=2):
        cfg_path = os.path.join(out_dir, f"{method}.yml")
        with open(cfg_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(example_config(family, method), f, sort_keys=False)
        out = os.path.join(out_dir, f"composite-{method}")
        click.echo(f"{step}/3 mergekit-mm-yaml {cfg_path} {out}")
        with open(cfg_path, encoding="utf-8") as f:
            run_yaml(f.read(), out, MergeOptions(quiet=True), source_name=cfg_path)
        results[method] = out

    cfg = Manifest.read(results["mmer"])
    click.echo(f"\nComposite ({results['mmer']}):")
    for root, _, files in sorted(os.walk(results["mmer"])):
        rel = os.path.relpath(root, results["mmer"])
        if files:
            click.echo(f"  {rel + '/' if rel != '.' else ''}: {', '.join(sorted(files))}")
    click.echo("\nEach modality's LLM weights: distance to its own source (sum|w - theta_src| / sum|theta_src - theta_base|)")
    click.echo(f"  {'modality':<11}{'placeholder':<14}{'id':>4}  {'mmer route':>10}  {'naive_mc':>9}")
    for kind, t in _kinds().items():
        modality = t.modality
        m = cfg.modalities[modality]
        d = {k: relative_distance(results[k], modality, str(family.sources[kind])) for k in results}
        click.echo(f"  {modality:<11}{m.placeholder:<14}{m.placeholder_id:>4}  {d['mmer']:>10.3f}  {d['naive_mc']:>9.3f}")
    click.echo("\nLower is closer: MMER's masked routes keep each modality near its source; the naive average does not.")
    click.echo(f"Inspect: {results['mmer']}/composite_config.json, README.md; YAMLs in {out_dir}/")


if __name__ == "__main__":
    main()
