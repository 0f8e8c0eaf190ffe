"""`mergekit-mm-yaml CONFIG OUT [flags]`: a drop-in for `mergekit-yaml` that also builds composites.

Every mergekit flag comes from mergekit's own option decorator (nothing retyped); a plain
mergekit config goes to mergekit's `run_merge` exactly as `mergekit-yaml` would send it.
"""

from __future__ import annotations

import sys

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_multimodal.api import run_yaml
from mergekit_multimodal.errors import CompositionError


@click.command("mergekit-mm-yaml", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--overwrite/--no-overwrite", default=False, show_default=True,
              help="Replace an existing composite at OUT_PATH (only once the new one is complete)")
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str, overwrite: bool):
    merge_options.apply_global_options()
    try:
        with open(config_file, "r", encoding="utf-8") as f:
            source = f.read()
    except OSError as exc:
        raise click.ClickException(f"{config_file}: {exc.strerror}")
    try:
        run_yaml(source, out_path, merge_options, source_name=config_file, overwrite=overwrite)
    except CompositionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
