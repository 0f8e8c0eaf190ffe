"""MMER at run time: a routed tensor's delta for each modality, built from tau_* and its 1-bit mask.

delta_m = (scale_m * mask_m - alpha) * tau_*, so route m's weight is merged + delta_m. The masks
stay packed (1 bit per parameter); a route's weight is built on the fly for its tokens only
(runtime/routing.py), a cache-sized block of rows at a time on CPU (`linear_blocked`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


_TABLES: Dict[tuple, torch.Tensor] = {}


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: the LSB-first bits of every byte value, as 0/1 in `dtype`."""
    key = (device, dtype)
    if key not in _TABLES:
        bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
        _TABLES[key] = bits.to(dtype)
    return _TABLES[key]


class RouteDelta(nn.Module):
    """tau_* with each route's packed mask and scale: delta_m = (scale_m * mask_m - alpha) * tau_*."""

    def __init__(self, tau: torch.Tensor, packed_masks: List[torch.Tensor], scales: List[float], alpha: float):
        super().__init__()
        self.register_buffer("tau", tau, persistent=False)
        for i, m in enumerate(packed_masks):
            self.register_buffer(f"mask{i}", m, persistent=False)
        self.scales = list(scales)
        self.alpha = float(alpha)

    def coefficients(self, route: int, packed: Optional[torch.Tensor] = None, shape=None) -> torch.Tensor:
        """scale_m * mask_m - alpha per element, in one lookup: each byte of the packed mask indexes
        a [256, 8] table of its 8 coefficients (so no separate mask tensor is built)."""
        packed = getattr(self, f"mask{route - 1}") if packed is None else packed
        count = self.tau.numel() if shape is None else math.prod(shape)
        if packed.device.type != "cpu":
            coeff = self._unpacked(route, packed)[:count]
        else:
            index = packed.reshape(-1) if packed.dtype == torch.int32 else packed.reshape(-1).int()
            coeff = self._table(route).index_select(0, index).reshape(-1)[:count]
        return coeff.reshape(self.tau.shape if shape is None else shape)

    def _unpacked(self, route: int, packed: torch.Tensor) -> torch.Tensor:
        """The same coefficients by a bitwise and and a select: elementwise, coalesced kernels. On
        CUDA the [256, 8] table's gather took 84% of a lean prefill's GPU time (H200, bf16, 271M
        model); on CPU the table is faster, so it stays there. The two values are the table's own
        (rounded to float32, then to tau's dtype), so both paths give the same bits."""
        key = ("select", route, packed.device, packed.dtype, self.tau.dtype)
        tables = self.__dict__.setdefault("_tables", {})  # a cache, not module state
        if key not in tables:
            bit = torch.tensor([1 << i for i in range(8)], device=packed.device).to(packed.dtype)
            on, off = torch.tensor([self.scales[route - 1] - self.alpha, -self.alpha], device=packed.device)
            tables[key] = (bit, on.to(self.tau.dtype), off.to(self.tau.dtype))
        bit, on, off = tables[key]
        return torch.where((packed.reshape(-1, 1) & bit).reshape(-1) != 0, on, off)

    def _table(self, route: int) -> torch.Tensor:
        """Route m's [256, 8] coefficient table, built once per device and dtype (a per-call build
        costs as much as a small block's lookup)."""
        key = (route, self.tau.device, self.tau.dtype)
        tables = self.__dict__.setdefault("_tables", {})  # a cache, not module state
        if key not in tables:
            bits = _bit_table(self.tau.device, torch.bool)
            tables[key] = torch.where(bits, self.scales[route - 1] - self.alpha, -self.alpha).to(self.tau.dtype)
        return tables[key]

    def apply(self, base: torch.Tensor, route: int) -> torch.Tensor:
        """base + delta_m as a new tensor, in two passes (coefficient lookup, addcmul)."""
        return torch.addcmul(base, self.coefficients(route), self.tau)

    def linear_blocked(self, xs: Dict[int, torch.Tensor], base: torch.Tensor, block: int) -> Dict[int, torch.Tensor]:
        """{route: x @ (base + delta_route)^T} with each route's weight built `block` output rows at
        a time (block % 8 == 0, so each block starts on a byte of the packed masks). A block of base
        and tau_* is read from memory once and stays in the CPU cache while every route builds its
        rows and multiplies its tokens, instead of three whole-weight round trips per route."""
        assert block % 8 == 0, block
        packed = {r: getattr(self, f"mask{r - 1}").reshape(-1) for r in xs}
        rows, cols = base.shape
        outs: Dict[int, List[torch.Tensor]] = {r: [] for r in xs}
        for start in range(0, rows, block):
            end = min(start + block, rows)
            base_rows, tau_rows = base[start:end], self.tau[start:end]
            for r, x in xs.items():
                coeff = self.coefficients(r, packed[r][start * cols // 8:(end * cols + 7) // 8], (end - start, cols))
                outs[r].append(F.linear(x, torch.addcmul(base_rows, coeff, tau_rows)))
        return {r: torch.cat(o, dim=-1) for r, o in outs.items()}

    def delta(self, route: int) -> torch.Tensor:
        return self.apply(torch.zeros_like(self.tau), route)

    def rows(self, route: int, ids: torch.Tensor) -> torch.Tensor:
        """delta(route)[ids] without building the whole [vocab, hidden] delta (embedding lookups)."""
        vocab, hidden = self.tau.shape
        if hidden % 8:
            return self.delta(route)[ids]
        packed = getattr(self, f"mask{route - 1}").reshape(vocab, hidden // 8)[ids]
        return self.coefficients(route, packed, (*ids.shape, hidden)) * self.tau[ids]
