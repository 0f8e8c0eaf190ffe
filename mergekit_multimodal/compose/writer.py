"""Sharded safetensors written tensor by tensor straight to disk, for outputs whose shapes are known.

Why not mergekit's TensorWriter or safetensors.save_file: both hold a whole shard in memory
(mergekit's default shard is 5 GB, i.e. the whole LLM of a 2B model, per writer). A composite
knows every output name, shape and dtype at plan time, so each shard's header is written first
and each tensor goes to its offset as soon as it is computed: memory stays at one tensor.
Files and index follow transformers' naming (`model-00001-of-00002.safetensors` +
`model.safetensors.index.json`), which mergekit's and transformers' loaders read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class PlannedShardWriter:
    """Write `entries` into shards of at most `max_shard_size` bytes (a larger tensor gets its own)."""

    def __init__(self, out_dir: str, entries: Sequence[Entry], max_shard_size: int, basename: str = "model"):
        self.out_dir, self.basename = out_dir, basename
        os.makedirs(out_dir, exist_ok=True)
        groups: List[List[Entry]] = [[]]
        size = 0
        for e in entries:
            if groups[-1] and max_shard_size > 0 and size + e.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        n = len(groups)
        self.files: List[str] = [
            f"{basename}.safetensors" if n == 1 else f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self._where: Dict[str, Tuple[int, int, Entry]] = {}  # name -> (file index, absolute offset, entry)
        self._handles = []
        self._pending = {e.name for e in entries}
        self.total_size = sum(e.nbytes for e in entries)
        for i, group in enumerate(groups):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for e in group:
                header[e.name] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                                  "data_offsets": [offset, offset + e.nbytes]}
                offset += e.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
            f = open(os.path.join(out_dir, self.files[i]), "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
            self._handles.append(f)
            start = 8 + len(raw)
            for e in group:
                self._where[e.name] = (i, start + header[e.name]["data_offsets"][0], e)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i, offset, e = self._where[name]
        if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
            raise ValueError(f"{name}: planned {e.shape} {e.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._handles[i]
        f.seek(offset)
        f.write(memoryview(data))
        self._pending.discard(name)

    def close(self, check: bool = True) -> None:
        """Close the files; with `check`, insist every planned tensor was written and write the index."""
        for f in self._handles:
            f.close()
        self._handles = []
        if not check:
            return
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} planned tensors were never written, e.g. {sorted(self._pending)[0]!r}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: self.files[i] for name, (i, _, _) in self._where.items()}}
            with open(os.path.join(self.out_dir, f"{self.basename}.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
