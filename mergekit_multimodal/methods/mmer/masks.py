"""Bit-packing of MMER masks: 1 bit per parameter per source (torch has no packbits; numpy does)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Flatten (C order) and pack 8 booleans per byte, least significant bit first."""
    bits = mask.detach().to("cpu", torch.bool).contiguous().numpy().reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    count = int(np.prod(shape)) if len(shape) else 1
    expected = (count + 7) // 8
    if packed.numel() != expected:
        raise ValueError(f"packed mask has {packed.numel()} bytes, {expected} expected for shape {tuple(shape)}")
    bits = np.unpackbits(packed.cpu().numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
