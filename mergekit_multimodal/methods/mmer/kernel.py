"""MMER (Li et al., 2025, arXiv 2505.17110): one merged task vector plus a binary mask per source.

For one LLM tensor, with tau_i = theta_i - theta_base:

1. Election of tau_* (``election``):
   - ``max`` (default, EMR-Merging): gamma = sign(sum_i tau_i);
     tau_* = gamma * max_i { |tau_i| : sign(tau_i) = gamma }.
   - ``ties``: keep the top ``density`` fraction of each |tau_i| (trim), gamma = sign(sum of the
     trimmed), tau_* = mean of the trimmed tau_i whose sign agrees with gamma (disjoint mean).
2. Text route (the composite's LLM): theta_base + alpha * tau_*.
3. Mask per source (``mask``):
   - ``l1`` (default): m_i = 1[|tau_i| >= lambda * |tau_* - tau_i|]. With lambda = 1 this is the
     element-wise minimiser of |theta_i - (theta_base + m * tau_*)|, the L1 rule a reviewer of the
     paper states (TALL-masks' rule).
   - ``sign``: m_i = 1[tau_i * tau_* > 0] (EMR-Merging's mask).
4. Optional rescale (``rescale: true``, EMR): s_i = sum|tau_i| / sum|m_i * tau_*|, else s_i = 1.
5. Modality-i route: theta_base + s_i * m_i * tau_*.

Defaults and why are in docs/methods.md. Example YAML::

    merge_method: mmer
    base_model: lmsys/vicuna-7b-v1.5
    models:
      - {model: llava-hf/llava-1.5-7b-hf, modality: image}
      - {model: Qwen/Qwen2-Audio-7B, modality: audio}
    parameters: {election: max, mask: l1, lambda: 1.0, alpha: 1.0}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup

from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, TensorParams, composite_kernel


@dataclass
class Routes:
    """MMER's per-modality routes for one tensor (or row chunk): route_i = base + s_i * masks[i] * task_vector.

    s_i = tau_l1[i] / masked_l1[i] when rescaling (EMR), else 1; the sums are kept so the
    engine can add them up over the row chunks of a tensor before dividing.
    """

    task_vector: torch.Tensor
    masks: List[torch.Tensor]
    tau_l1: List[float]
    masked_l1: List[float]
    rescale: bool = False

    @property
    def scales(self) -> List[float]:
        return scales_from_sums(self.tau_l1, self.masked_l1, self.rescale)


def scales_from_sums(tau_l1: Sequence[float], masked_l1: Sequence[float], rescale: bool) -> List[float]:
    if not rescale:
        return [1.0] * len(tau_l1)
    return [n / d if d > 0 else 1.0 for n, d in zip(tau_l1, masked_l1)]


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """|tau| value at and above which an entry survives TIES' trim to `density` (ties kept)."""
    if density >= 1.0:
        return 0.0
    k = int(density * tau.numel())
    if k <= 0:
        return float("inf")
    return kth_largest(tau.abs().flatten(), k)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """Exact k-th largest of non-negative values.

    For float32, a two-level radix select on the IEEE bit pattern (which orders non-negative
    floats): a histogram of the high 16 bits finds the bin holding the answer, a histogram of the
    low 16 bits inside it finds the exact pattern. Two passes and no sort: several times faster on
    CPU than torch.kthvalue, which is also slow on the many equal values of bf16-derived deltas.
    Half-precision values are upcast (exactly); float64 uses torch.kthvalue.
    """
    if values.dtype in (torch.bfloat16, torch.float16):
        values = values.float()
    if values.dtype != torch.float32 or values.numel() < (1 << 16):
        return torch.kthvalue(values, values.numel() - k + 1).values.item()
    bits = values.contiguous().view(torch.int32)
    high = bits >> 16
    hi_bin, above = _bin_from_top(torch.bincount(high, minlength=1 << 15), k)
    low = bits[high == hi_bin] & 0xFFFF
    lo_bin, _ = _bin_from_top(torch.bincount(low, minlength=1 << 16), k - above)
    return torch.tensor([(hi_bin << 16) | lo_bin], dtype=torch.int32).view(torch.float32).item()


def _bin_from_top(counts: torch.Tensor, k: int):
    """The bin holding the k-th largest element, and how many elements lie in the bins above it."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, k))
    return counts.numel() - 1 - i, (int(from_top[i - 1]) if i > 0 else 0)


def elect(taus: Sequence[torch.Tensor], election: str = "max", thresholds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The merged task vector tau_* (see the module docstring), one source at a time to save memory.

    With u_i = tau_i * gamma, the entries that agree with the elected sign are exactly u_i > 0, so
    max election is gamma * max(0, max_i u_i) and the disjoint mean sums clamp(u_i, min=0).
    """
    if thresholds is not None:
        taus = [torch.where(t.abs() >= thr, t, 0.0) for t, thr in zip(taus, thresholds)]
    gamma = torch.sign(sum(taus))
    best = torch.zeros_like(gamma)
    count = torch.zeros_like(gamma) if election == "ties" else None
    for t in taus:
        u = t * gamma
        if election == "max":
            torch.maximum(best, u, out=best)
        else:
            best += u.clamp_(min=0)
            count += u > 0
    if election == "max":
        return best.mul_(gamma)
    return best.mul_(gamma).div_(count.clamp_(min=1))


def masks_for(taus: Sequence[torch.Tensor], tau_star: torch.Tensor, mask: str = "l1", lam: float = 1.0) -> List[torch.Tensor]:
    if mask == "sign":
        return [(t * tau_star) > 0 for t in taus]
    if lam == 1.0:
        return [t.abs() >= (tau_star - t).abs() for t in taus]
    return [t.abs() >= lam * (tau_star - t).abs() for t in taus]


def mmer_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], election: str = "max", density: float = 1.0,
               alpha: float = 1.0, lambda_: float = 1.0, mask: str = "l1", rescale: bool = False,
               thresholds: Optional[Sequence[float]] = None) -> MergeOutput:
    """The merged tensor (text route) and the routes of one tensor or row chunk (module docstring)."""
    if thresholds is None and election == "ties" and density < 1.0:
        thresholds = [trim_threshold(s - base, density) for s in sources]
    taus = [s - base for s in sources]
    tau_star = elect(taus, election, thresholds)
    masks = masks_for(taus, tau_star, mask, lambda_)
    if rescale:
        tau_l1 = [t.abs().sum().item() for t in taus]
        masked_l1 = [torch.where(m, tau_star.abs(), 0.0).sum().item() for m in masks]
    else:
        tau_l1 = masked_l1 = [0.0] * len(taus)
    merged = base + alpha * tau_star
    return MergeOutput(merged, Routes(tau_star, masks, tau_l1, masked_l1, rescale))


@composite_kernel(name="mmer", pretty_name="MMER", reference_url="https://arxiv.org/abs/2505.17110",
                  contract=InputContract(base=BasePolicy.REQUIRED))
def mmer(group: TensorGroup, election: Literal["max", "ties"] = "max", density: float = 1.0, alpha: float = 1.0,
         lambda_: float = 1.0, mask: Literal["l1", "sign"] = "l1", rescale: bool = False) -> torch.Tensor:
    """MMER's parameters, declared once: `election` (how tau_* is elected), `density` (fraction of each
    tau_i kept before a ties election), `alpha` (scale of tau_* in the text route), `lambda` (mask
    threshold of the l1 rule), `mask` (mask rule), `rescale` (EMR rescale of each route).
    As a mergekit method (plain configs) it gives the text route."""
    base = group.base.tensor.float()
    sources = [e.tensor.float() for e in group.non_base]
    out = mmer_merge(base, sources, election, density, alpha, lambda_, mask, rescale)
    return out.merged.to(group.entries[0].tensor.dtype)


class MMERKernel(CompositeMethod):
    """The merge half of MMER (methods/mmer/__init__.py adds what it writes and reads)."""

    kernel = mmer
    uses_base = True
    chunkable = True

    def prepare(self, base, sources, params, dtype=None):
        """TIES needs each tau_i's whole-tensor magnitude threshold before any chunk is merged."""
        p = params.shared
        if p["election"] != "ties" or p["density"] >= 1.0:
            return None
        dtype = dtype or base.dtype
        return [trim_threshold(s.to(dtype) - base.to(dtype), p["density"]) for s in sources]

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state=None) -> MergeOutput:
        p = params.shared
        if state is None:
            state = self.prepare(base, sources, params)
        return mmer_merge(base, sources, p["election"], p["density"], p["alpha"], p["lambda"], p["mask"], p["rescale"],
                          thresholds=state)
