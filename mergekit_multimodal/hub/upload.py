"""Push a composite (or a plain merge) to the Hugging Face Hub, with retries.

The upload itself is huggingface_hub's: `create_repo`, `create_branch`, `upload_folder` (LFS or
Xet, its own progress bars, its own token lookup: `--token`, else HF_TOKEN, else the cached login).
`push` validates first (`validate.validate_for_push`), then retries each step on transient
failures (connection errors, HTTP 408/429/5xx), with exponential backoff: huggingface_hub retries
single requests such as preupload and LFS parts, but not the commit call, and one 503 there would
otherwise lose the whole push.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, Optional, Tuple

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.hub.validate import validate_for_push

#: attempts per step, and the first wait in seconds (doubled after each failure)
RETRY_ATTEMPTS = 4
RETRY_BASE_WAIT = 2.0
RETRY_MAX_WAIT = 60.0
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


#: seconds to open a connection to the Hub, and to wait for each read (or write) on it; every
#: request huggingface_hub sends without a timeout of its own gets these (env overrides below)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
CONNECT_TIMEOUT_ENV = "MERGEKIT_MM_HUB_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "MERGEKIT_MM_HUB_READ_TIMEOUT"


# -- timeouts ---------------------------------------------------------------------------------


def hub_timeouts() -> Tuple[float, float]:
    """(connect, read) seconds: the env overrides, else CONNECT_TIMEOUT and READ_TIMEOUT."""
    out = []
    for env, default in ((CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT), (READ_TIMEOUT_ENV, READ_TIMEOUT)):
        raw = os.environ.get(env)
        try:
            value = float(raw) if raw else float(default)
        except ValueError:
            raise CompositionError(f"{env}={raw!r}: expected a number of seconds") from None
        if value <= 0:
            raise CompositionError(f"{env}={raw!r}: expected a positive number of seconds")
        out.append(value)
    return out[0], out[1]


@contextlib.contextmanager
def bounded_hub_requests() -> Iterator[None]:
    """Every request huggingface_hub sends inside gets connect/read/write/pool timeouts where it
    has none (its default client has none, and HfApi's calls such as create_repo pass none).

    huggingface_hub's own way (`set_client_factory`): the client its factory makes (the user's
    own factory kept, proxies and all) gets a request hook that fills the missing timeouts;
    the previous factory is restored on exit."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    connect, read = hub_timeouts()
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def bound(request) -> None:
        timeout = dict(request.extensions.get("timeout") or {})
        for key, value in (("connect", connect), ("read", read), ("write", read), ("pool", read)):
            if timeout.get(key) is None:
                timeout[key] = value
        request.extensions = {**request.extensions, "timeout": timeout}

    def factory():
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), bound]}
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def worst_case_seconds() -> float:
    """How long one push step can take against a server that accepts and never answers: each
    attempt waits at most connect + read seconds, then the backoff between attempts."""
    connect, read = hub_timeouts()
    waits = sum(min(RETRY_BASE_WAIT * 2 ** a, RETRY_MAX_WAIT) for a in range(RETRY_ATTEMPTS - 1))
    return RETRY_ATTEMPTS * (connect + read) + waits


# -- retries ----------------------------------------------------------------------------------


def _network_errors() -> tuple:
    """Connection-level exception types of whichever HTTP client this huggingface_hub uses."""
    types: list = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(types)


def _status(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """Worth another try: the connection failed, or the server said 408/429/5xx."""
    status = _status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    return isinstance(exc, _network_errors())


def _wait(exc: BaseException, attempt: int) -> float:
    retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("Retry-After")
    try:
        if retry_after is not None:
            return min(float(retry_after), RETRY_MAX_WAIT)
    except ValueError:
        pass
    return min(RETRY_BASE_WAIT * 2 ** attempt, RETRY_MAX_WAIT)


def with_retries(step: str, fn: Callable, echo: Callable[[str], None]):
    """Run fn(); on a transient failure wait and run it again, up to RETRY_ATTEMPTS times in all."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by is_transient
            if not is_transient(exc) or attempt == RETRY_ATTEMPTS - 1:
                raise
            wait = _wait(exc, attempt)
            echo(f"{step}: {type(exc).__name__} ({_status(exc) or exc}); retrying in {wait:.1f}s "
                 f"(attempt {attempt + 2} of {RETRY_ATTEMPTS})")
            time.sleep(wait)


# -- push -------------------------------------------------------------------------------------


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def push(path: str, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         token: Optional[str] = None, endpoint: Optional[str] = None, commit_message: Optional[str] = None,
         echo: Callable[[str], None] = _stderr) -> str:
    """Validate `path`, then create the repo (and branch) and upload the folder; return the commit URL.

    `endpoint` defaults to huggingface_hub's configured one (HF_ENDPOINT); `token` to its usual
    lookup. Nothing is sent when validation fails. Failures of the upload raise CompositionError.
    Every request has timeouts (`bounded_hub_requests`) and each step RETRY_ATTEMPTS tries, so a
    server that never answers fails within `worst_case_seconds()` a step.
    """
    files = validate_for_push(path)
    with bounded_hub_requests():
        return _upload(path, repo_id, files, private=private, revision=revision, token=token, endpoint=endpoint,
                       commit_message=commit_message, echo=echo)


def _upload(path: str, repo_id: str, files, *, private, revision, token, endpoint, commit_message, echo) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    total = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    api = HfApi(endpoint=endpoint, token=token, library_name="mergekit-multimodal")
    where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
    echo(f"Pushing {path} to {api.endpoint}/{repo_id}{' (private)' if private else ''}: "
         f"{len(files)} files, {_size(total)}")
    for f in files:
        echo(f"  {f}  {_size(os.path.getsize(os.path.join(path, f)))}")
    try:
        url = with_retries("create_repo", lambda: api.create_repo(repo_id, private=private or None, exist_ok=True), echo)
        repo_id = getattr(url, "repo_id", None) or repo_id  # "name" alone resolves to the user's namespace
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            with_retries("create_branch", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), echo)
        info = with_retries("upload_folder", lambda: api.upload_folder(
            repo_id=repo_id, folder_path=path, revision=revision,
            commit_message=commit_message or f"Upload {os.path.basename(os.path.normpath(path))} with mergekit-multimodal",
        ), echo)
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise CompositionError(f"push of {path} to {where} failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - network errors of the HTTP client, after the retries
        if not is_transient(exc):
            raise
        raise CompositionError(f"push of {path} to {where} failed after {RETRY_ATTEMPTS} attempts: "
                               f"{type(exc).__name__}: {exc}") from None
    commit_url = getattr(info, "commit_url", None) or str(info)
    echo(f"Pushed {len(files)} files to {where}: {commit_url}")
    return commit_url
