"""Reading a composite's safetensors streams (`<basename>.safetensors` or its sharded index)
through mergekit's lazy loader, with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Dict

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
