"""One exception type for every bad input, and one error path for every command line.

`CompositionError` is what library code raises for bad input; its message names the file, tensor
or key. `cli_errors` is what every console script (mergekit-mm-yaml, -push, -run, -eval, -tune,
-zoo, -example) runs its body in: an expected failure prints ONE line `error: <message>` on stderr
and exits with the command's documented code (2 for mergekit-mm-yaml and -push, as mergekit-yaml;
1 for the others); click's own usage errors keep exit code 2. `MERGEKIT_MM_DEBUG=1` (or a
command's `--debug`) re-raises instead, so the full traceback shows.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

#: the environment variable that shows tracebacks instead of one-line errors
DEBUG_ENV = "MERGEKIT_MM_DEBUG"


class CompositionError(Exception):
    """A composite cannot be built (or loaded) as asked; the message names the file, tensor or key."""


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _network_error(exc: BaseException) -> bool:
    from mergekit_multimodal.hub.upload import is_transient  # connection errors and timeouts of the HTTP client

    return getattr(exc, "response", None) is None and is_transient(exc)


def describe(exc: BaseException) -> Optional[str]:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback).

    Expected: CompositionError; a file that cannot be read or written (OSError: its strerror and
    filename), decoded (UnicodeDecodeError) or parsed (ValueError from a reader, JSON included);
    the network failing (connection errors, timeouts)."""
    if isinstance(exc, CompositionError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 text ({exc})"
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return f"{exc.filename}: {exc.strerror or exc}"
    if _network_error(exc):
        return f"network: {type(exc).__name__}: {exc}"
    if isinstance(exc, (OSError, ValueError)):
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def cli_errors(exit_code: int = 1, debug: bool = False, after: Optional[str] = None) -> Iterator[None]:
    """Run a command's body: an expected failure (see `describe`) prints `error: <message>` (one
    line; CompositionErrors that list several problems keep their lines) and exits `exit_code`;
    `after` adds a hint line. With MERGEKIT_MM_DEBUG=1 or `debug`, the exception propagates."""
    import click

    from mergekit_multimodal.hub.upload import bounded_hub_requests  # any Hub call a command makes: bounded

    try:
        with bounded_hub_requests():
            yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - filtered by describe()
        message = describe(exc)
        if message is None or debug_enabled(debug):
            raise
        click.echo(f"error: {message}" + (f"\n{after}" if after else ""), err=True)
        sys.exit(exit_code)
