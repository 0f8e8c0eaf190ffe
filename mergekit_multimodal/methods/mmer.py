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

from typing import List, Optional, Sequence

import torch

from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, ParamDef, Routes, TensorParams


def _choice(*options):
    def check(value):
        if value not in options:
            raise ValueError(f"expected one of {options}, got {value!r}")
        return value

    return check


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (TIES' trim)."""
    if density >= 1.0:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect(taus: Sequence[torch.Tensor], election: str = "max", density: float = 1.0) -> torch.Tensor:
    """The merged task vector tau_* (see the module docstring)."""
    if election == "ties":
        taus = [trim_to_density(t, density) for t in taus]
    stacked = torch.stack(list(taus))
    gamma = torch.sign(stacked.sum(dim=0))
    agree = torch.sign(stacked) == gamma.unsqueeze(0)
    agree &= stacked != 0
    if election == "max":
        return gamma * torch.where(agree, stacked.abs(), torch.zeros_like(stacked)).amax(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, stacked, torch.zeros_like(stacked)).sum(dim=0) / count


def masks_for(taus: Sequence[torch.Tensor], tau_star: torch.Tensor, mask: str = "l1", lam: float = 1.0) -> List[torch.Tensor]:
    if mask == "sign":
        return [(t * tau_star) > 0 for t in taus]
    return [t.abs() >= lam * (tau_star - t).abs() for t in taus]


def rescale_factor(tau: torch.Tensor, mask: torch.Tensor, tau_star: torch.Tensor) -> float:
    denom = (tau_star * mask).abs().sum().item()
    return tau.abs().sum().item() / denom if denom > 0 else 1.0


class MMER(CompositeMethod):
    name = "mmer"
    uses_base = True
    param_defs = (
        ParamDef("election", "max", validate=_choice("max", "ties"), help="how tau_* is elected"),
        ParamDef("density", 1.0, help="fraction of each tau_i kept before a ties election"),
        ParamDef("alpha", 1.0, help="scale of tau_* in the text route"),
        ParamDef("lambda", 1.0, help="mask threshold of the l1 rule"),
        ParamDef("mask", "l1", validate=_choice("l1", "sign"), help="mask rule"),
        ParamDef("rescale", False, validate=bool, help="EMR rescale of each route"),
    )

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams) -> MergeOutput:
        p = params.shared
        taus = [s - base for s in sources]
        tau_star = elect(taus, p["election"], p["density"])
        masks = masks_for(taus, tau_star, p["mask"], p["lambda"])
        scales = [rescale_factor(t, m, tau_star) if p["rescale"] else 1.0 for t, m in zip(taus, masks)]
        merged = base + p["alpha"] * tau_star
        return MergeOutput(merged, Routes(tau_star, masks, scales))
