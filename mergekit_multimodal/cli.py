"""`mergekit-mm-yaml CONFIG OUT [flags]`: a drop-in for `mergekit-yaml` that also builds composites.

Every mergekit flag comes from mergekit's own option decorator (nothing retyped); a plain
mergekit config goes to mergekit's `run_merge` exactly as `mergekit-yaml` would send it.
`--push-to-hub REPO_ID` pushes the result once it is complete; `mergekit-mm-push` pushes one
already on disk (both through `hub.push`, which validates before sending anything).
"""

from __future__ import annotations

from typing import Optional

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_multimodal.api import run_yaml
from mergekit_multimodal.errors import CompositionError, cli_errors
from mergekit_multimodal.hub import push


def _hub_options(f):
    """Where and how to push: shared by `--push-to-hub` and `mergekit-mm-push`."""
    f = click.option("--private", is_flag=True, default=False, help="Create the Hub repository as private")(f)
    f = click.option("--revision", default=None, metavar="BRANCH",
                     help="Push to this branch (created if missing) instead of main")(f)
    f = click.option("--token", default=None,
                     help="Hub token; default: huggingface_hub's lookup (HF_TOKEN, then the `hf auth login` cache)")(f)
    f = click.option("--endpoint", default=None, envvar="HF_ENDPOINT", show_envvar=True,
                     help="Hub endpoint; default: huggingface_hub's (https://huggingface.co)")(f)
    return f


@click.command("mergekit-mm-yaml", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--overwrite/--no-overwrite", default=False, show_default=True,
              help="Replace an existing composite at OUT_PATH (only once the new one is complete)")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID",
              help="Push OUT_PATH to this Hub repository once the merge is complete")
@_hub_options
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str, overwrite: bool, push_to_hub: Optional[str],
         private: bool, revision: Optional[str], token: Optional[str], endpoint: Optional[str]):
    merge_options.apply_global_options()
    if not push_to_hub and (private or revision):
        raise click.UsageError("--private and --revision need --push-to-hub")
    if push_to_hub and not merge_options.write_model_card:
        raise click.UsageError("--push-to-hub needs the model card: drop --no-write-model-card")
    with cli_errors(exit_code=2):
        try:
            with open(config_file, "r", encoding="utf-8") as f:
                source = f.read()
        except UnicodeDecodeError as exc:
            raise CompositionError(f"{config_file}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise CompositionError(f"{config_file}: {exc.strerror or exc}") from None
        run_yaml(source, out_path, merge_options, source_name=config_file, overwrite=overwrite)
    if push_to_hub:
        with cli_errors(exit_code=2, after=f"{out_path} is complete; push it again with: "
                                           f"mergekit-mm-push {out_path} {push_to_hub}"):
            push(out_path, push_to_hub, private=private, revision=revision, token=token, endpoint=endpoint,
                 echo=click.echo)


@click.command("mergekit-mm-push")
@click.argument("composite", type=click.Path(file_okay=False))
@click.argument("repo_id")
@_hub_options
@click.option("--commit-message", default=None, help="Commit message (default: Upload <dir> with mergekit-multimodal)")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def push_main(composite: str, repo_id: str, private: bool, revision: Optional[str], token: Optional[str],
              endpoint: Optional[str], commit_message: Optional[str], debug: bool):
    """Check COMPOSITE is complete, then upload it to the Hub repository REPO_ID (created if missing)."""
    with cli_errors(exit_code=2, debug=debug):
        push(composite, repo_id, private=private, revision=revision, token=token, endpoint=endpoint,
             commit_message=commit_message, echo=click.echo)


if __name__ == "__main__":
    main()
