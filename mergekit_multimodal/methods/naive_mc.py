"""NaiveMC (Chen et al., 2024, arXiv 2402.12750): reuse every encoder, average the LLMs.

merged = sum_i w_i * theta_i / sum_i w_i   (w_i = 1 by default: the plain mean)

Because all sources share the base, this equals theta_base + mean_i(tau_i) with equal weights.

Example YAML::

    merge_method: naive_mc
    base_model: lmsys/vicuna-7b-v1.5
    models:
      - model: llava-hf/llava-1.5-7b-hf
        modality: image
      - model: LanguageBind/Video-LLaVA-7B-hf
        modality: video
        parameters: {weight: 2.0}
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, ParamDef, TensorParams


def weighted_average(sources: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("naive_mc weights sum to zero")
    out = torch.zeros_like(sources[0])
    for w, t in zip(weights, sources):
        out.add_(t, alpha=float(w))
    return out / total if normalize else out


class NaiveMC(CompositeMethod):
    name = "naive_mc"
    uses_base = False
    chunkable = True
    param_defs = (
        ParamDef("weight", 1.0, per_source=True, help="weight of this source's LLM"),
        ParamDef("normalize", True, validate=bool, help="divide by the sum of weights"),
    )

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state=None) -> MergeOutput:
        return MergeOutput(weighted_average(sources, params.per_source["weight"], params.shared["normalize"]))
