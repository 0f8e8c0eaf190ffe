"""DAMC at run time: each modality's route as LoRA factors over the merged weight (or dense deltas)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class LowRankDelta(nn.Module):
    """DAMC: route m's delta on the merged weight is B_m A_m - B_t A_t (modality factors minus the
    lambda-scaled text factors), applied as x A^T B^T so no dense weight is ever built per route.

    `factors` maps a route id (1..N) to its (A, B); a route without an entry only removes the text part.
    """

    def __init__(self, text: Optional[tuple], factors: Dict[int, tuple]):
        super().__init__()
        self.has_text = text is not None
        if text is not None:
            self.register_buffer("text_A", text[0], persistent=False)
            self.register_buffer("text_B", text[1], persistent=False)
        self.routes = sorted(factors)
        for r, (a, b) in factors.items():
            self.register_buffer(f"A{r}", a, persistent=False)
            self.register_buffer(f"B{r}", b, persistent=False)

    def route_out(self, x: torch.Tensor, route: int) -> torch.Tensor:
        """x @ delta_m^T in low rank: two thin matmuls per factor pair."""
        out = None
        if route in self.routes:
            out = F.linear(F.linear(x, getattr(self, f"A{route}")), getattr(self, f"B{route}"))
        if self.has_text:
            t = F.linear(F.linear(x, self.text_A), self.text_B)
            out = -t if out is None else out - t
        return out if out is not None else x.new_zeros(*x.shape[:-1], 0)

    def delta(self, route: int) -> torch.Tensor:
        d = 0
        if route in self.routes:
            d = getattr(self, f"B{route}") @ getattr(self, f"A{route}")
        if self.has_text:
            d = d - self.text_B @ self.text_A
        return d

    def apply(self, base: torch.Tensor, route: int) -> torch.Tensor:
        return base + self.delta(route)


class DenseDelta(nn.Module):
    """DAMC with `densify`: one stored dense delta per route (merged + delta_m is route m's weight)."""

    def __init__(self, deltas: Dict[int, torch.Tensor]):
        super().__init__()
        self.routes = sorted(deltas)
        for r, d in deltas.items():
            self.register_buffer(f"d{r}", d, persistent=False)

    def delta(self, route: int) -> torch.Tensor:
        return getattr(self, f"d{route}")

    def apply(self, base: torch.Tensor, route: int) -> torch.Tensor:
        return base + self.delta(route) if route in self.routes else base
