"""Reading a composite's safetensors streams (`<basename>.safetensors` or its sharded index)
through mergekit's lazy loader, with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Iterator, Tuple

from mergekit.io import LazyTensorLoader, ShardedTensorIndex
from mergekit.io.lazy_tensor_loader import ShardInfo

from mergekit_multimodal.errors import CompositionError


def open_stream(directory: str, basename: str) -> LazyTensorLoader:
    """mergekit's loader over `<basename>.safetensors` or its index (mergekit's own index reader
    only knows the basename `model`)."""
    index_path = os.path.join(directory, f"{basename}.safetensors.index.json")
    single = os.path.join(directory, f"{basename}.safetensors")
    try:
        return _open(directory, basename, index_path, single)
    except CompositionError:
        raise
    except Exception as exc:  # safetensors/json/OS errors on a damaged composite
        where = index_path if os.path.exists(index_path) else single
        raise CompositionError(f"{where}: unreadable ({type(exc).__name__}: {exc}); the composite is damaged, "
                               f"compose it again or re-download it") from None


def _open(directory: str, basename: str, index_path: str, single: str) -> LazyTensorLoader:
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: Dict[str, str] = json.load(f)["weight_map"]
        shards = [ShardInfo(s, [k for k, v in weight_map.items() if v == s]) for s in sorted(set(weight_map.values()))]
        return LazyTensorLoader(ShardedTensorIndex(directory, True, weight_map, shards), lazy_unpickle=False)
    if os.path.exists(single):
        return LazyTensorLoader(ShardedTensorIndex.from_file(single), lazy_unpickle=False)
    raise CompositionError(f"{directory}: no {basename}.safetensors (or index) in the composite")


def weights_file(directory: str, basename: str = "model") -> str:
    """The file that names a stream's tensors: its index when sharded, else the single file."""
    index = os.path.join(directory, f"{basename}.safetensors.index.json")
    return index if os.path.exists(index) else os.path.join(directory, f"{basename}.safetensors")


def refuse_incomplete(info: dict, file: str, what: str, ignore_missing: Iterable[str] = ()) -> None:
    """transformers' `output_loading_info` of a load: any missing, unexpected or mis-shaped tensor is
    an error naming `file` and the tensor (transformers would random-initialise a missing one).
    `ignore_missing`: tensors legitimately absent (the shrunk LLM of an encoder checkpoint)."""
    ignore = set(ignore_missing)
    missing = sorted(set(info.get("missing_keys") or ()) - ignore)
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {', '.join(repr(k) for k in missing[:5])}"
                        + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s) {', '.join(repr(k) for k in unexpected[:5])}"
                        + (f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    for key, found, want in mismatched[:5]:
        problems.append(f"tensor {key!r} has shape {tuple(found)}, the config needs {tuple(want)}")
    if info.get("error_msgs"):
        problems += [str(m) for m in info["error_msgs"][:3]]
    if problems:
        raise CompositionError(f"{file}: {what} does not match its config: {'; '.join(problems)}; "
                               f"the composite is damaged, compose it again or re-download it")


def check_finite(tensor, file: str, name: str) -> None:
    """NaN or inf in a tensor read from `file` is an error naming both."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CompositionError(f"{file}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf)")


def shard_path(directory: str, index_file: str, shard: object) -> str:
    """A shard an index names: a file inside the index's directory, never a path leading out of it."""
    if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
        raise CompositionError(f"{index_file}: names shard {shard!r}, which is not a file inside {directory}")
    return os.path.join(directory, shard)


def header_shapes(directory: str, basename: str = "model") -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{tensor: (shape, safetensors dtype such as "F32", "U8")} of a stream, from the safetensors
    headers alone (no tensor data is read); an index's names are checked against its shards."""
    from safetensors import safe_open

    index_path = os.path.join(directory, f"{basename}.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CompositionError(f"{index_path}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        by_shard: Dict[str, list] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard_path(directory, index_path, shard), []).append(name)
    else:
        single = os.path.join(directory, f"{basename}.safetensors")
        if not os.path.exists(single):
            raise CompositionError(f"{directory}: no {basename}.safetensors (or index) in the composite")
        by_shard = {single: None}
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for file, names in sorted(by_shard.items()):
        if names is not None and not os.path.isfile(file):
            raise CompositionError(f"{index_path}: names shard {os.path.basename(file)}, which is missing ({file})")
        try:
            with safe_open(file, framework="pt") as f:
                keys = set(f.keys())
                for k in keys if names is None else names:
                    if k not in keys:
                        raise CompositionError(f"{index_path}: says {file} holds {k!r}; it does not")
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except CompositionError:
            raise
        except Exception as exc:  # noqa: BLE001 - missing, truncated, not safetensors
            raise CompositionError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return out


def iter_tensors(directory: str, basename: str = "model") -> Iterator[Tuple[str, str, "object"]]:
    """(file, name, tensor) of every tensor of a stream, one at a time (safetensors' safe_open)."""
    from safetensors import safe_open

    files = sorted({os.path.join(directory, f) for f in os.listdir(directory)
                    if f.startswith(basename) and f.endswith(".safetensors")
                    and (f == f"{basename}.safetensors" or f[len(basename)] == "-")})
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    yield file, k, f.get_tensor(k)
        except Exception as exc:  # noqa: BLE001 - truncated mid-way
            raise CompositionError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
