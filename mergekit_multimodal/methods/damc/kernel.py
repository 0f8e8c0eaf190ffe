"""DAMC (Chen et al., 2024, arXiv 2402.12750): compose MLLMs trained with decoupled parameters.

Each source i brings, per LLM linear, a text delta dT_i and a modality delta dM_i (LoRA) on the
shared base W0 (the YAML `base_model`):

    text route (the composite's LLM):   W_text = W0 + sum_i lambda_i * dT_i
    modality-i route:                    W_i    = W0 + dM_i   = W_text - sum_j lambda_j dT_j + dM_i

lambda_i defaults to 1/N. The modality routes are stored low-rank (the factors of the second
form) unless `densify: true`. Sources are read by `sources.py`; the composite's text route is
`text_route` over the densified text deltas, row chunk by row chunk (outputs.py). As a mergekit
method on plain full checkpoints, `merge` reads dT_i = theta_i - W0 (task arithmetic with
weights lambda_i).

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
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.methods.base import CompositeMethod, MergeOutput, TensorParams, composite_kernel


def lambdas_of(params: TensorParams, n: int) -> List[float]:
    """Per-source lambda; unset ones are 1/N (the README example of the paper's code)."""
    return _lambdas(params.per_source.get("lambda") or [None] * n)


def _lambdas(values: Sequence[Optional[float]]) -> List[float]:
    return [1.0 / len(values) if v is None else float(v) for v in values]


def text_route(base: torch.Tensor, text_deltas: Sequence[Optional[torch.Tensor]], lambdas: Sequence[float]) -> torch.Tensor:
    """W0 + sum_i lambda_i * dT_i (a source without a delta for this tensor adds nothing)."""
    out = base.clone()
    for lam, d in zip(lambdas, text_deltas):
        if d is not None and lam != 0:
            out.add_(d, alpha=float(lam))
    return out


@composite_kernel(name="damc", pretty_name="DAMC", reference_url="https://arxiv.org/abs/2402.12750",
                  contract=InputContract(base=BasePolicy.REQUIRED))
def damc(group: TensorGroup, lambda_: PerNonBase[Optional[float]] = None, densify: bool = False) -> torch.Tensor:
    """DAMC's parameters, declared once: `lambda` (per model: the weight of its text delta, default
    1/N), `densify` (store dense per-route deltas instead of LoRA factors). As a mergekit method on
    plain full checkpoints, dT_i = theta_i - W0 (lambda-weighted task arithmetic)."""
    base = group.base.tensor.float()
    sources = [e.tensor.float() for e in group.non_base]
    lambdas = _lambdas(lambda_.values_for(group.non_base))
    return text_route(base, [s - base for s in sources], lambdas).to(group.entries[0].tensor.dtype)


class DAMCKernel(CompositeMethod):
    """The merge half of DAMC (methods/damc/__init__.py adds its sources, outputs and runtime)."""

    kernel = damc
    uses_base = True
    chunkable = True

    def merge(self, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor], params: TensorParams,
              state=None) -> MergeOutput:
        """Full source weights (mergekit path): dT_i = theta_i - W0."""
        if base is None:
            raise CompositionError("damc needs a base model (W0)")
        return MergeOutput(text_route(base, [s - base for s in sources], lambdas_of(params, len(sources))))
