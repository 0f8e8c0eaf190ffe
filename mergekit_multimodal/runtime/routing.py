"""Per-token routing inside every LLM layer (linear layers, norms; embeddings in model.py).

A `RoutedLinear` keeps the composite's merged weight (the text route) and a delta object that
builds a route's weight (`apply(base, route)`) or, when low-rank, its output (`route_out(x, route)`):
for MMER (`RouteDelta`) the task vector tau_* plus each modality's 1-bit mask; for DAMC
(`LowRankDelta`, `DenseDelta` when densified) LoRA factors or dense deltas. A modality's weight delta
(scale_m * mask_m - alpha) * tau_* is unpacked on the fly for the tokens of that modality only,
so no full copy of the LLM per route stays resident (docs/runtime.md); on CPU it is built a
cache-sized block of rows at a time, all routes sharing each block. Tokens are assigned to
routes by a `RouteState` the composite model fills before each forward: route 0 is text.
During cached decoding the new tokens do not match the prefill's route map and take the text
route, as DAMC and MMER prescribe for generated tokens.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouteState:
    """Which route each token of the current forward takes; shared by all routed layers."""

    route_ids: Optional[torch.Tensor] = None  # [batch, seq] long, 0 = text
    present: List[int] = field(default_factory=list)  # routes other than text present in route_ids
    whole: Optional[int] = None  # one route for every token (retention use), overrides route_ids
    rows: Dict[int, torch.Tensor] = field(default_factory=dict)  # route -> its tokens' flat indices
    #: route -> its tokens as (start, end) runs of flat positions, when there are few runs (a prompt's
    #: text and media spans): rows are then read as views and written by slice, not gathered/scattered
    spans: Dict[int, List[tuple]] = field(default_factory=dict)
    keep: frozenset = frozenset()  # routes whose dense weights stay resident once built (speed option)

    def set_tokens(self, route_ids: Optional[torch.Tensor]) -> None:
        """Computed once per forward, shared by every routed layer."""
        self.route_ids = route_ids
        self.present = [] if route_ids is None else [int(r) for r in torch.unique(route_ids) if int(r) != 0]
        flat = route_ids.reshape(-1) if self.present else None
        self.rows = {r: torch.nonzero(flat == r).squeeze(-1) for r in [0, *self.present]} if self.present else {}
        self.spans = {}
        for r, idx in self.rows.items():
            if idx.numel():
                idx = idx.cpu().tolist()
                breaks = [i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1]
                if len(breaks) < MAX_SPANS:
                    starts, ends = [0, *breaks], [*breaks, len(idx)]
                    self.spans[r] = [(idx[a], idx[b - 1] + 1) for a, b in zip(starts, ends)]

    def gather(self, flat: torch.Tensor, route: int) -> torch.Tensor:
        """The route's token rows of a [tokens, features] tensor: a view when they are one run."""
        spans = self.spans.get(route)
        if spans is not None and len(spans) == 1:
            return flat[spans[0][0]:spans[0][1]]
        if spans is not None:
            return torch.cat([flat[a:b] for a, b in spans])
        return flat.index_select(0, self.rows[route])

    def scatter(self, out: torch.Tensor, route: int, values: torch.Tensor) -> None:
        """out[route's rows] = values, by slice copies when the rows are few runs."""
        spans = self.spans.get(route)
        if spans is None:
            out.index_copy_(0, self.rows[route], values)
            return
        at = 0
        for a, b in spans:
            out[a:b].copy_(values[at:at + b - a])
            at += b - a


#: more runs than this per route (scattered tokens) and rows are gathered / scattered by index
MAX_SPANS = 64


def unpack_bits(packed: torch.Tensor, shape, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of masks.pack_mask on any device: LSB-first bits of a flat uint8 tensor, as `dtype`."""
    count = 1
    for d in shape:
        count *= d
    bits = _bit_table(packed.device, dtype).index_select(0, packed.reshape(-1).int())  # one lookup per byte
    return bits.reshape(-1)[:count].reshape(shape)


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
        index = packed.reshape(-1) if packed.dtype == torch.int32 else packed.reshape(-1).int()
        coeff = self._table(route).index_select(0, index).reshape(-1)[:count]
        return coeff.reshape(self.tau.shape if shape is None else shape)

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


#: elements per block when a route's weight is built blockwise on CPU: the block's weight, tau_*,
#: coefficients and built rows (4 MiB in fp32) stay in cache while every route uses them
BLOCK_ELEMENTS = 1 << 18


class RoutedLinear(nn.Module):
    """nn.Linear whose tokens of modality m run on W_merged + delta_m (text tokens on W_merged).

    Each route's weight is built once per forward for that route's tokens and dropped after the
    layer (so the matmul FLOPs equal the plain model's); decode steps and text-only forwards run
    the plain linear untouched.
    """

    def __init__(self, linear: nn.Linear, weight_delta: RouteDelta, bias_delta: Optional[RouteDelta], state: RouteState):
        super().__init__()
        self.linear = linear
        self.weight_delta = weight_delta
        self.bias_delta = bias_delta
        self.state = state

    @property
    def weight(self) -> torch.Tensor:  # code that inspects layers (e.g. dtype/device lookups) sees the merged weight
        return self.linear.weight

    def _block(self) -> Optional[int]:
        """Rows per block when routes' weights are built blockwise (CPU, MMER), else None."""
        w = self.linear.weight
        if w.device.type != "cpu" or not isinstance(self.weight_delta, RouteDelta):
            return None
        block = max(8, BLOCK_ELEMENTS // w.shape[1] // 8 * 8)
        return block if block < w.shape[0] else None

    def _bias(self, route: int) -> Optional[torch.Tensor]:
        b = self.linear.bias
        return self.bias_delta.apply(b, route) if b is not None and self.bias_delta is not None else b

    def _route_linear(self, x: torch.Tensor, route: int) -> torch.Tensor:
        route_out = getattr(self.weight_delta, "route_out", None)
        if route_out is not None and route not in self.state.keep:  # low-rank delta: x W^T + x A^T B^T
            y = self.linear(x)
            d = route_out(x, route)
            return y + d.to(y.dtype) if d.shape[-1] else y
        kept = self.__dict__.setdefault("_kept", {})  # plain dict: kept weights are a cache, not state
        if route in kept:
            return F.linear(x, *kept[route])
        block = self._block() if route not in self.state.keep else None
        if block:  # CPU: build and use the route's weight a cache-sized block at a time
            y = self.weight_delta.linear_blocked({route: x}, self.linear.weight, block)[route]
            b = self._bias(route)
            return y if b is None else y + b
        w = self.weight_delta.apply(self.linear.weight, route)
        b = self.linear.bias
        if b is not None:
            b = self.bias_delta.apply(b, route) if self.bias_delta is not None else b
        if route in self.state.keep:
            kept[route] = (w, b)
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.whole:
            return self._route_linear(x, st.whole)
        if not st.present or st.route_ids.shape != x.shape[:-1]:  # text-only forward or a decode step
            return F.linear(x, self.linear.weight, self.linear.bias)  # (skips a module call: decode speed)
        flat = x.reshape(-1, x.shape[-1])
        y = flat.new_empty(flat.shape[0], self.linear.out_features)
        block = self._block()
        together = {r: st.gather(flat, r) for r, rows in st.rows.items()
                    if r and rows.numel() and r not in st.keep} if block else {}
        if together:  # every route's rows built from one cached block of the weight (CPU)
            for r, out in self.weight_delta.linear_blocked(together, self.linear.weight, block).items():
                b = self._bias(r)
                st.scatter(y, r, out if b is None else out + b)
        for r, rows in st.rows.items():
            if rows.numel() and r not in together:
                xs = st.gather(flat, r)
                st.scatter(y, r, self.linear(xs) if r == 0 else self._route_linear(xs, r))
        return y.reshape(*x.shape[:-1], -1)


class RoutedModule(nn.Module):
    """Any other module with routed parameters (RMSNorm, LayerNorm...): the selected tokens are run
    again with the route's parameters through torch.func.functional_call."""

    def __init__(self, module: nn.Module, deltas: Dict[str, RouteDelta], state: RouteState):
        super().__init__()
        self.module = module
        self.deltas = nn.ModuleDict({k.replace(".", "_"): v for k, v in deltas.items()})
        self.names = dict(zip([k.replace(".", "_") for k in deltas], deltas))
        self.state = state

    def _params(self, route: int) -> Dict[str, torch.Tensor]:
        own = dict(self.module.named_parameters())
        return {self.names[k]: own[self.names[k]] + d.delta(route) for k, d in self.deltas.items()}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.whole:
            return torch.func.functional_call(self.module, self._params(st.whole), (x, *args), kwargs)
        y = self.module.forward(x, *args, **kwargs)
        if not st.present or st.route_ids.shape != x.shape[:-1]:
            return y
        for r in st.present:
            sel = st.route_ids == r
            y[sel] = torch.func.functional_call(self.module, self._params(r), (x[sel],))
        return y


def install_routes(model: nn.Module, deltas: Dict[str, RouteDelta], state: RouteState) -> int:
    """Wrap every leaf module that has routed parameters (keyed by parameter name); returns the count.

    Embeddings are left alone: the composite model looks their rows up itself (model.py).
    """
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            own = {p: deltas[f"{full}.{p}"] for p, _ in child.named_parameters(recurse=False) if f"{full}.{p}" in deltas}
            if not own or isinstance(child, nn.Embedding) or any(True for _ in child.children()):
                continue
            if isinstance(child, nn.Linear):
                routed = RoutedLinear(child, own["weight"], own.get("bias"), state)
            else:
                routed = RoutedModule(child, own, state)
            setattr(module, child_name, routed)
            count += 1
    return count
