"""NaiveMC (Chen et al., 2024, arXiv 2402.12750): reuse every encoder, average the LLMs.

merged = sum_i w_i * theta_i / sum_i w_i   (w_i = 1 by default: the plain mean)

Because all sources share the base, this equals theta_base + mean_i(tau_i) with equal weights.
`weighted_average` is written here, not taken from mergekit's `linear`: linear accumulates in
float32 whatever the merge dtype, so with `dtype: bfloat16` its result differs in the last bits
from what NaiveMC composites have always held (bf16 accumulation); it also divides by a zero sum.

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
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup

from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, TensorParams, composite_kernel


def weighted_average(sources: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i theta_i (divided by sum_i w_i), accumulated in the sources' dtype."""
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("naive_mc weights sum to zero")
    out = torch.zeros_like(sources[0])
    for w, t in zip(weights, sources):
        out.add_(t, alpha=float(w))
    return out / total if normalize else out


@composite_kernel(name="naive_mc", pretty_name="NaiveMC", reference_url="https://arxiv.org/abs/2402.12750",
                  contract=InputContract(base=BasePolicy.OPTIONAL))
def naive_mc(group: TensorGroup, weight: PerNonBase[float] = 1.0, normalize: bool = True) -> torch.Tensor:
    """NaiveMC's parameters, declared once: `weight` (per model: its LLM's weight), `normalize`
    (divide by the sum of weights). The base, if given, is not an input."""
    sources = [e.tensor.float() for e in group.non_base]
    out = weighted_average(sources, weight.values_for(group.non_base), normalize)
    return out.to(group.entries[0].tensor.dtype)


class NaiveMC(CompositeMethod):
    kernel = naive_mc
    uses_base = False
    chunkable = True

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state=None) -> MergeOutput:
        return MergeOutput(weighted_average(sources, params.per_source["weight"], params.shared["normalize"]))


METHOD = NaiveMC()
