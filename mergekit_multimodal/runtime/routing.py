"""Per-token routing inside every LLM layer (linear layers, norms; embeddings in model.py).

A `RoutedLinear` keeps the composite's merged weight (the text route) and the method's delta module
(methods/<method>/runtime.py: `read_deltas` builds them), which builds a route's weight
(`apply(base, route)`), or its output when low-rank (`route_out(x, route)`), or, where it can,
every route's output a cache-sized block of weight rows at a time (`linear_blocked`: MMER on CPU,
all routes sharing each block). A route's weight is built for that route's tokens only, so no full
copy of the LLM per route stays resident (docs/runtime.md). Tokens are assigned to routes by a
`RouteState` the composite model fills before each forward: route 0 is text. During cached
decoding the new tokens do not match the prefill's route map and take the text route, as DAMC
and MMER prescribe for generated tokens.

`replace_modules` is the one module walker for layer surgery (the loader's routed layers here,
DAMC training's decoupled LoRA layers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouteCache:
    """Built route weights kept resident, most-used routes first, up to `budget` bytes.

    A route is kept whole or not at all: its dense weights in every routed layer cost `route_bytes`
    (the merged LLM's routed parameters: the head counts although prefill rarely builds it). After each forward's route map is known, the routes
    are ranked by the tokens they have run so far and kept greedily while they fit; a route that
    falls out is dropped from every layer at once. Budget 0 keeps nothing (the lean default on
    CPU: each route's weight is built for its tokens and dropped); `math.inf` keeps every route.
    """

    budget: float = 0
    route_bytes: int = 0  # one route's dense routed weights (filled by install_routes)
    used: Dict[int, int] = field(default_factory=dict)  # route -> tokens run on it so far
    keep: frozenset = frozenset()  # routes whose weights are kept once built
    #: route -> {id(layer): (weight, bias) of a linear, or {name: tensor} of another routed module}
    weights: Dict[int, Dict[int, object]] = field(default_factory=dict)

    def use(self, counts: Dict[int, int]) -> None:
        """Count a forward's tokens per route, then re-rank and drop routes that no longer fit."""
        for r, n in counts.items():
            if r and n:
                self.used[r] = self.used.get(r, 0) + n
        keep, spent = [], 0
        for r in sorted(self.used, key=lambda r: (-self.used[r], r)):
            if self.budget > 0 and spent + self.route_bytes <= self.budget:
                keep.append(r)
                spent += self.route_bytes
        self.keep = frozenset(keep)
        for r in [r for r in self.weights if r not in self.keep]:
            del self.weights[r]

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for per_layer in self.weights.values() for kept in per_layer.values()
                   for t in (kept.values() if isinstance(kept, dict) else kept) if t is not None)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def cache_budget(spec: Union[None, int, float, str], device) -> float:
    """Bytes for the route cache from a user's spec: None or "auto" (CUDA: the device's free memory
    after loading less a headroom of max(4 GiB, 20% of the device) for activations; elsewhere 0),
    "all" (every route), 0 / "0" (none), an int, or a size such as "8GiB" / "500MB"."""
    if spec is None or spec == "auto":
        if getattr(device, "type", str(device)) != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(device)
        return max(0, free - max(4 * 2**30, total // 5))
    if spec == "all":
        return math.inf
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec >= 0:
        return spec
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", spec) if isinstance(spec, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"route cache {spec!r}: expected auto, all, a number of bytes or a size such as 8GiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


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
    cache: RouteCache = field(default_factory=RouteCache)  # built route weights kept resident

    def set_tokens(self, route_ids: Optional[torch.Tensor]) -> None:
        """Computed once per forward, shared by every routed layer."""
        self.route_ids = route_ids
        self.present = [] if route_ids is None else [int(r) for r in torch.unique(route_ids) if int(r) != 0]
        flat = route_ids.reshape(-1) if self.present else None
        self.rows = {r: torch.nonzero(flat == r).squeeze(-1) for r in [0, *self.present]} if self.present else {}
        if self.whole and route_ids is not None:
            self.cache.use({self.whole: route_ids.numel()})
        elif self.rows:
            self.cache.use({r: idx.numel() for r, idx in self.rows.items()})
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


#: elements per block when a route's weight is built blockwise on CPU: the block's weight, tau_*,
#: coefficients and built rows (4 MiB in fp32) stay in cache while every route uses them
BLOCK_ELEMENTS = 1 << 18


class RoutedLinear(nn.Module):
    """nn.Linear whose tokens of modality m run on W_merged + delta_m (text tokens on W_merged).

    Each route's weight is built once per forward for that route's tokens and dropped after the
    layer (so the matmul FLOPs equal the plain model's); decode steps and text-only forwards run
    the plain linear untouched.
    """

    def __init__(self, linear: nn.Linear, weight_delta: nn.Module, bias_delta: Optional[nn.Module], state: RouteState):
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
        if w.device.type != "cpu" or not hasattr(self.weight_delta, "linear_blocked"):
            return None
        block = max(8, BLOCK_ELEMENTS // w.shape[1] // 8 * 8)
        return block if block < w.shape[0] else None

    def _bias(self, route: int) -> Optional[torch.Tensor]:
        b = self.linear.bias
        return self.bias_delta.apply(b, route) if b is not None and self.bias_delta is not None else b

    def _route_linear(self, x: torch.Tensor, route: int) -> torch.Tensor:
        cache = self.state.cache
        kept = cache.weights.get(route, {}).get(id(self))
        if kept is not None:
            return F.linear(x, *kept)
        route_out = getattr(self.weight_delta, "route_out", None)
        if route_out is not None and route not in cache.keep:  # low-rank delta: x W^T + x A^T B^T
            y = self.linear(x)
            d = route_out(x, route)
            return y + d.to(y.dtype) if d.shape[-1] else y
        block = self._block() if route not in cache.keep else None
        if block:  # CPU: build and use the route's weight a cache-sized block at a time
            y = self.weight_delta.linear_blocked({route: x}, self.linear.weight, block)[route]
            b = self._bias(route)
            return y if b is None else y + b
        w = self.weight_delta.apply(self.linear.weight, route)
        b = self.linear.bias
        if b is not None:
            b = self.bias_delta.apply(b, route) if self.bias_delta is not None else b
        if route in cache.keep:
            cache.weights.setdefault(route, {})[id(self)] = (w, b)
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
                    if r and rows.numel() and r not in st.cache.keep} if block else {}
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

    def __init__(self, module: nn.Module, deltas: Dict[str, nn.Module], state: RouteState):
        super().__init__()
        self.module = module
        self.deltas = nn.ModuleDict({k.replace(".", "_"): v for k, v in deltas.items()})
        self.names = dict(zip([k.replace(".", "_") for k in deltas], deltas))
        self.state = state

    def _params(self, route: int) -> Dict[str, torch.Tensor]:
        cache = self.state.cache
        kept = cache.weights.get(route, {}).get(id(self))
        if kept is not None:
            return kept
        own = dict(self.module.named_parameters())
        params = {self.names[k]: own[self.names[k]] + d.delta(route) for k, d in self.deltas.items()}
        if route in cache.keep:
            cache.weights.setdefault(route, {})[id(self)] = params
        return params

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.whole:
            return torch.func.functional_call(self.module, self._params(st.whole), (x, *args), kwargs)
        y = self.module.forward(x, *args, **kwargs)
        if not st.present or st.route_ids.shape != x.shape[:-1]:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        for r in st.present:  # by slices when the route's tokens are few runs (no boolean-mask sync)
            st.scatter(flat_y, r, torch.func.functional_call(self.module, self._params(r), (st.gather(flat_x, r),)))
        return flat_y.view(y.shape)


def replace_modules(model: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]]) -> Dict[str, nn.Module]:
    """Walk every child module (full dotted name, module); where `replace` returns a module, put it
    in that child's place. Returns the replacements by name."""
    done = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new = replace(full, child)
            if new is not None:
                setattr(module, child_name, new)
                done[full] = new
    return done


def install_routes(model: nn.Module, deltas: Dict[str, nn.Module], state: RouteState) -> int:
    """Wrap every leaf module that has routed parameters (keyed by parameter name); returns the count.

    Embeddings are left alone: the composite model looks their rows up itself (model.py).
    """

    def routed(full: str, child: nn.Module) -> Optional[nn.Module]:
        own = {p: deltas[f"{full}.{p}"] for p, _ in child.named_parameters(recurse=False) if f"{full}.{p}" in deltas}
        if not own or isinstance(child, nn.Embedding) or any(True for _ in child.children()):
            return None
        if isinstance(child, nn.Linear):  # a route kept in the cache holds a copy of weight and bias
            state.cache.route_bytes += sum(p.numel() * p.element_size() for p in child.parameters(recurse=False))
            return RoutedLinear(child, own["weight"], own.get("bias"), state)
        state.cache.route_bytes += sum(child.get_parameter(p).numel() * child.get_parameter(p).element_size() for p in own)
        return RoutedModule(child, own, state)

    return len(replace_modules(model, routed))
