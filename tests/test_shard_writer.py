"""The streaming shard writer produces files safetensors, mergekit and transformers read back exactly."""

import json

import pytest
import torch
from mergekit.io import LazyTensorLoader

from mergekit_multimodal.compose.writer import Entry, PlannedShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.arange(7, dtype=torch.uint8),
            "c": torch.tensor(2.5), "d": torch.randn(100, generator=g), "e": torch.randn(2, 2, 2, generator=g).half()}


# 64 B shards: [a b c] (41 B), [d] (400 B), [e] (16 B)
@pytest.mark.parametrize("shard_size,shards", [(0, 1), (10_000, 1), (64, 3)])
def test_roundtrip_in_any_write_order(tmp_path, shard_size, shards):
    ts = _tensors()
    w = PlannedShardWriter(str(tmp_path), [Entry(k, tuple(v.shape), v.dtype) for k, v in ts.items()], shard_size)
    for k in ["d", "a", "e", "c", "b"]:
        w.write(k, ts[k])
    w.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == shards
    if shards > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ts) and set(index["weight_map"].values()) == set(files)
        assert files[0] == f"model-00001-of-{shards:05d}.safetensors"
    loader = LazyTensorLoader.from_disk(str(tmp_path))  # mergekit's reader
    for k, v in ts.items():
        assert torch.equal(loader.get_tensor(k), v), k


def test_wrong_shape_and_unwritten_tensors_are_errors(tmp_path):
    w = PlannedShardWriter(str(tmp_path), [Entry("x", (2, 2), torch.float32), Entry("y", (3,), torch.float32)], 0)
    with pytest.raises(ValueError, match="x"):
        w.write("x", torch.zeros(2, 3))
    w.write("x", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="'y'"):
        w.close()
