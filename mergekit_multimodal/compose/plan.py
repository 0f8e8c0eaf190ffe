"""From a validated config to a plan: which checkpoints, which LLM tensors, which parts to carry.

Everything that can be checked without reading tensor data is checked here (layouts, names,
shapes, vocabularies, parameters), so bad input fails before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from mergekit.common import dtype_from_name
from mergekit.options import MergeOptions

from mergekit_multimodal.compose.checkpoint import Checkpoint
from mergekit_multimodal.compose.config import CompositeMergeConfig
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.methods import CompositeMethod, get_method
from mergekit_multimodal.compose.vocab import EMBED, HEAD, VocabPlan, load_tokenizer, plan_vocabulary

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorJob:
    """One LLM tensor of the composite."""

    name: str
    shape: Tuple[int, ...]
    vocab_rows: bool  # rows past the base vocabulary are carried from sources
    t: float  # depth in [0, 1], for mergekit-style parameter gradients
    out_dtype: torch.dtype


@dataclass
class CompositePlan:
    config: CompositeMergeConfig
    options: MergeOptions
    method: CompositeMethod
    base: Checkpoint
    sources: List[Checkpoint]
    modalities: List[str]
    vocab: VocabPlan
    base_tokenizer: object
    jobs: List[TensorJob]
    tied_output: bool
    compute_dtype: torch.dtype
    global_params: Dict
    source_params: List[Dict]
    #: what the method read beyond the checkpoints (`CompositeMethod.plan_sources`; DAMC: each
    #: source's decoupled deltas)
    method_state: Any = None
    #: per source, connector tensors replaced (DAMC: a trained connector or a ModelCompose projector)
    connector_overrides: Optional[List[Dict[str, torch.Tensor]]] = None


def _num_layers(names) -> int:
    layers = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(layers) + 1 if layers else 1


def build_plan(config: CompositeMergeConfig, options: MergeOptions) -> CompositePlan:
    method = get_method(config.merge_method)
    global_params = dict(config.parameters or {})
    source_params = [dict(m.parameters or {}) for m in config.models]
    method.check_parameters(global_params, source_params, "config")

    base = Checkpoint.open("base_model", config.base_model, options, config.base_layout)
    method.check_config(config)
    sources = [
        Checkpoint.open(f"models[{i}] ({m.modality})", m.model, options, m.layout)
        for i, m in enumerate(config.models)
    ]
    modalities = [m.modality for m in config.models]
    for src, m in zip(sources, config.models):
        if src.layout.family.text_only and m.layout is None:
            raise CompositionError(
                f"{src.label} ({src.path}): a plain causal LM brings no modality encoder; a source must be an MLLM"
            )

    base_tok = load_tokenizer(base.path)
    vocab = plan_vocabulary(
        base, sources, modalities, [m.placeholder for m in config.models], base_tok,
        [load_tokenizer(s.path) for s in sources], config.pad_vocab_to_multiple_of,
    )

    tied_output = base.tied and all(s.tied for s in sources)
    names = list(base.llm)
    if not tied_output and HEAD not in names:
        names.append(HEAD)
    wanted = set(names)
    for src in sources:
        have = set(src.llm) | {HEAD}
        missing = [n for n in names if n not in have]
        if missing:
            raise CompositionError(
                f"{src.label} ({src.path}): LLM tensor {missing[0]!r} of the base is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = sorted(set(src.llm) - wanted)
        if extra:
            raise CompositionError(
                f"{src.label} ({src.path}): LLM tensor {src.llm[extra[0]]!r} has no counterpart "
                f"{extra[0]!r} in the base; sources must share the base's architecture"
            )

    n_layers = _num_layers(names)
    jobs = []
    for name in names:
        base_shape = base.llm_shape(name)
        is_vocab = name in (EMBED, HEAD)
        for src in sources:
            shape = src.llm_shape(name)
            ok = shape[1:] == base_shape[1:] if is_vocab else shape == base_shape
            if not ok:
                raise CompositionError(
                    f"{src.label} ({src.path}): LLM tensor {src.llm.get(name, name)!r} has shape {list(shape)}, "
                    f"the base's {name!r} has {list(base_shape)}"
                )
        m = _LAYER.search(name)
        t = int(m.group(1)) / max(n_layers - 1, 1) if m else 0.0
        shape = (vocab.rows,) + tuple(base_shape[1:]) if is_vocab else tuple(base_shape)
        out_dtype = dtype_from_name(config.out_dtype or config.dtype) or base.shapes[base.key(name)][1]
        jobs.append(TensorJob(name, shape, is_vocab, t, out_dtype))

    plan = CompositePlan(
        config=config,
        options=options,
        method=method,
        base=base,
        sources=sources,
        modalities=modalities,
        vocab=vocab,
        base_tokenizer=base_tok,
        jobs=jobs,
        tied_output=tied_output,
        compute_dtype=dtype_from_name(config.dtype) or torch.float32,
        global_params=global_params,
        source_params=source_params,
    )
    method.plan_sources(plan)
    return plan
