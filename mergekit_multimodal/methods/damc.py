"""DAMC (Chen et al., 2024, arXiv 2402.12750): compose MLLMs trained with decoupled parameters.

Each source i brings, per LLM linear, a text delta dT_i and a modality delta dM_i (LoRA) on the
shared base W0 (the YAML `base_model`):

    text route (the composite's LLM):   W_text = W0 + sum_i lambda_i * dT_i
    modality-i route:                    W_i    = W0 + dM_i   = W_text - sum_j lambda_j dT_j + dM_i

lambda_i defaults to 1/N. The modality routes are stored low-rank (the factors of the second
form) unless `densify: true`. Sources are read by `mergekit_multimodal.decoupled`; the engine
feeds `text_route` with densified text deltas. As a mergekit method on plain full checkpoints,
`merge` reads dT_i = theta_i - W0 (task arithmetic with weights lambda_i).

Example YAML::

    merge_method: damc
    base_model: lmsys/vicuna-7b-v1.5
    models:
      - model: llava-hf/llava-1.5-7b-hf      # encoder + connector (its LLM is W0)
        modality: image
        adapters: ./damc-image                # text + image adapters, prefix/suffix tokens
        parameters: {lambda: 0.5}
    parameters: {densify: false}
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, ParamDef, TensorParams


def lambdas_of(params: TensorParams, n: int) -> List[float]:
    """Per-source lambda; unset ones are 1/N (the README example of the paper's code)."""
    values = params.per_source.get("lambda") or [None] * n
    return [1.0 / n if v is None else float(v) for v in values]


def text_route(base: torch.Tensor, text_deltas: Sequence[Optional[torch.Tensor]], lambdas: Sequence[float]) -> torch.Tensor:
    """W0 + sum_i lambda_i * dT_i (a source without a delta for this tensor adds nothing)."""
    out = base.clone()
    for lam, d in zip(lambdas, text_deltas):
        if d is not None and lam != 0:
            out.add_(d, alpha=float(lam))
    return out


class DAMC(CompositeMethod):
    name = "damc"
    uses_base = True
    chunkable = True
    param_defs = (
        ParamDef("lambda", None, per_source=True, help="weight of this source's text delta (default 1/N)"),
        ParamDef("densify", False, validate=bool, help="store dense per-route deltas instead of LoRA factors"),
    )

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state=None) -> MergeOutput:
        """Full source weights (mergekit path): dT_i = theta_i - W0."""
        if base is None:
            raise CompositionError("damc needs a base model (W0)")
        return MergeOutput(text_route(base, [s - base for s in sources], lambdas_of(params, len(sources))))
