"""Push a composite (or a plain merge) to the Hugging Face Hub, refusing an incomplete one first.

The upload itself is huggingface_hub's: `create_repo`, `create_branch`, `upload_folder` (LFS or
Xet, its own progress bars, its own token lookup: `--token`, else HF_TOKEN, else the cached login).
What this module adds is what a multi-GB directory needs before and around that:

- `validate_for_push`: every file the loader will read is there and opens (JSON configs, shard
  indexes against their shards, every safetensors header, MMER's routes, the model card), checked
  locally BEFORE the first request, so a half-written composite never lands on the Hub;
- retries of each step on transient failures (connection errors, HTTP 408/429/5xx), with
  exponential backoff: huggingface_hub retries single requests such as preupload and LFS parts,
  but not the commit call, and one 503 there would otherwise lose the whole push.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from safetensors import safe_open

from mergekit_multimodal.format import files as L
from mergekit_multimodal.errors import CompositionError

#: attempts per step, and the first wait in seconds (doubled after each failure)
RETRY_ATTEMPTS = 4
RETRY_BASE_WAIT = 2.0
RETRY_MAX_WAIT = 60.0
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)

# -- validation -------------------------------------------------------------------------------


def _ignored(rel: str) -> bool:
    """What upload_folder leaves out anyway (its DEFAULT_IGNORE_PATTERNS): .git/ and .cache/huggingface/."""
    parts = rel.split("/")
    return ".git" in parts or any(parts[i:i + 2] == [".cache", "huggingface"] for i in range(len(parts)))


def list_upload_files(path: str) -> List[str]:
    """Files under `path` (relative, '/'-separated, sorted) that upload_folder will send."""
    out = []
    for dirpath, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path).replace(os.sep, "/")
            if not _ignored(rel):
                out.append(rel)
    return sorted(out)


def _json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CompositionError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise CompositionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CompositionError(f"{path}: expected a JSON object")
    return data


def _keys(shard: Path) -> set:
    """The tensor names in a safetensors file; safe_open checks the header against the file size."""
    try:
        with safe_open(str(shard), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, not safetensors: all the same to the user
        raise CompositionError(f"{shard}: not a readable safetensors file ({exc})") from None


def _check_index(index: Path) -> None:
    """Every shard an index names exists and holds the tensors the index says it holds."""
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CompositionError(f"{index}: no weight_map")
    by_shard: dict = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    for shard, tensors in sorted(by_shard.items()):
        file = index.parent / shard
        if not file.is_file():
            raise CompositionError(f"{index}: names shard {shard}, which is missing ({file})")
        if shard.endswith(".safetensors"):
            missing = [t for t in tensors if t not in _keys(file)]
            if missing:
                raise CompositionError(f"{index}: says {file} holds {missing[0]!r} (and {len(missing) - 1} more); it does not")


def _check_weights(directory: Path, basename: str, what: str) -> None:
    """`<basename>.safetensors` or its index (plain merges may also write pytorch_model*.bin)."""
    names = [f"{basename}.safetensors", f"{basename}.safetensors.index.json"]
    if basename == "model":
        names += ["pytorch_model.bin", "pytorch_model.bin.index.json"]
    if not any((directory / n).is_file() for n in names):
        raise CompositionError(f"{directory}: {what} has no weights ({' or '.join(names[:2])})")


def _check_model_dir(directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise CompositionError(f"{directory}: {what} is missing")
    _json(directory / "config.json")
    _check_weights(directory, "model", what)


def _check_composite(root: Path, cfg_path: Path) -> None:
    cfg = _json(cfg_path)
    if cfg.get("format_version") != L.FORMAT_VERSION:
        raise CompositionError(f"{cfg_path}: format_version {cfg.get('format_version')!r}; this version writes {L.FORMAT_VERSION}")
    _check_model_dir(root / (cfg.get("llm") or {}).get("path", "."), "the merged LLM")
    modalities = cfg.get("modalities")
    if not isinstance(modalities, dict) or not modalities:
        raise CompositionError(f"{cfg_path}: names no modalities")
    for name, info in modalities.items():
        if not isinstance(info, dict) or not info.get("path"):
            raise CompositionError(f"{cfg_path}: modality {name!r} has no path")
        _check_model_dir(root / info["path"], f"modality {name!r} (named in {L.COMPOSITE_CONFIG})")
    routes = cfg.get("routes")
    if routes:
        rdir = root / routes.get("dir", L.ROUTES_DIR)
        kind = routes.get("kind", "mmer")
        if not rdir.is_dir():
            raise CompositionError(f"{rdir}: {kind.upper()} routes named in {L.COMPOSITE_CONFIG} are missing")
        if kind == "damc":
            _check_weights(rdir, routes.get("damc", L.DAMC_BASENAME), "the DAMC routes")
            return
        for key, default in (("task_vector", L.TASK_VECTOR_BASENAME), ("masks", L.MASKS_BASENAME)):
            _check_weights(rdir, routes.get(key, default), f"the MMER {key.replace('_', ' ')}")


def _check_card(readme: Path) -> None:
    from huggingface_hub import ModelCard

    if not readme.is_file():
        raise CompositionError(f"{readme}: no model card (it is written unless --no-write-model-card)")
    try:
        ModelCard.load(readme)
    except Exception as exc:  # noqa: BLE001 - bad front matter
        raise CompositionError(f"{readme}: not a valid model card ({exc})") from None


def validate_for_push(path: str) -> List[str]:
    """Check a composite (or plain merged model) directory is complete; return the files to upload.

    A composite is a directory with composite_config.json; without it, the directory must be a
    plain model (config.json + weights) and must not hold composite parts. Raises CompositionError
    naming the first bad file.
    """
    root = Path(path)
    if not root.is_dir():
        raise CompositionError(f"{path}: no such directory")
    cfg_path = root / L.COMPOSITE_CONFIG
    if cfg_path.exists():
        _check_composite(root, cfg_path)
    else:
        for d in (L.MODALITIES_DIR, L.ROUTES_DIR):
            if (root / d).exists():
                raise CompositionError(f"{cfg_path}: missing, though {d}/ is there: an incomplete composite")
        _check_model_dir(root, "the merged model")
    files = list_upload_files(path)
    for rel in files:
        if rel.endswith(".safetensors.index.json"):
            _check_index(root / rel)
    for rel in files:
        if rel.endswith(".safetensors"):
            _keys(root / rel)
    _check_card(root / "README.md")
    return files


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
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    files = validate_for_push(path)
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
