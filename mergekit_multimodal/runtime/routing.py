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

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

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

    def __init__(self, module: nn.Module, deltas: Dict[str, nn.Module], state: RouteState):
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
        if isinstance(child, nn.Linear):
            return RoutedLinear(child, own["weight"], own.get("bias"), state)
        return RoutedModule(child, own, state)

    return len(replace_modules(model, routed))
