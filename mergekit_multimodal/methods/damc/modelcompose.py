"""DAMC sources in ModelCompose's release form (Chen et al., 2024; THUNLP-MT/ModelCompose's
train_multimodal.py): `DIR/adapter_model.bin` (a torch pickle with `model.layers.{i}.<module>.lora_A.default.weight`
for text, `...lora_A.<modality>.weight`, `model.modal_projectors.<modality>.*`, `prefix_tokens.<modality>`,
`suffix_tokens.<modality>`), `DIR/config.json` (the encoders it was trained with, `lora_strategy`,
`lora_r` / `lora_alpha`), optionally `non_lora_trainables.bin`; and its projector mapped onto the
paired MLLM's connector (`Family.modelcompose_projector`). The shared pieces are in sources.py.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.format.files import read_json
from mergekit_multimodal.methods.damc.sources import (
    _PEFT_PREFIX,
    DecoupledSource,
    _pair,
    _scale,
    _split_lora,
    _tokens,
    safe_torch_load,
)

LOG = logging.getLogger(__name__)


def is_modelcompose(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "adapter_model.bin")) and not os.path.exists(
        os.path.join(directory, "adapter_config.json")) and os.path.exists(os.path.join(directory, "config.json"))



#: ModelCompose's MultimodalConfig defaults, used when a release's config.json omits them
MODELCOMPOSE_LORA_DEFAULTS = {"lora_r": 128, "lora_alpha": 256}
#: where ModelCompose's `--lora_strategy` puts the adapters: text (`default`) and/or `<modality>`
_STRATEGIES = {"modal+language": "decoupled", "modal": "modality only", "same": "one shared adapter"}


def read_modelcompose(directory: str, modality: str, name_map, adapter: Optional[str]) -> DecoupledSource:
    """A checkpoint as ModelCompose's train_multimodal.py writes it (lora strategies `modal+language`,
    `modal`, `same`). Composed ModelCompose checkpoints (several modalities merged) are refused:
    their text adapter is already a merge, so DAMC would merge it again."""
    path = os.path.join(directory, "adapter_model.bin")
    cfg = read_json(os.path.join(directory, "config.json"))
    weights = safe_torch_load(path)
    extra = os.path.join(directory, "non_lora_trainables.bin")  # projector / prefix tokens, when split off
    if os.path.exists(extra):
        for k, t in safe_torch_load(extra).items():
            weights.setdefault(k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k, t)
    by_adapter, rest = _split_lora(weights, path)
    encoders = {k: v for k, v in cfg.items() if k.startswith("mm_") and k.endswith("_encoder") and isinstance(v, str)}
    merged = sorted(a for a in by_adapter if a and a.startswith("default-"))
    if merged or len(encoders) > 1 or os.path.exists(os.path.join(directory, "merge_info.txt")):
        raise CompositionError(
            f"{directory}: a composed ModelCompose checkpoint ({', '.join(merged) or ', '.join(sorted(encoders))}); "
            f"its text adapter is already a merge. Give the single-modality checkpoints, one per source")
    strategy = cfg.get("lora_strategy")
    if strategy is not None and strategy not in _STRATEGIES:
        raise CompositionError(f"{directory}/config.json: lora_strategy {strategy!r} is not one ModelCompose "
                               f"writes ({', '.join(_STRATEGIES)})")
    others = [a for a in by_adapter if a not in ("default", None)]
    if strategy == "same" or (strategy is None and not others and "default" in by_adapter):
        others = []  # one adapter served text and modality tokens alike
    elif adapter is None:
        adapter = modality if modality in others else (others[0] if len(others) == 1 else None)
    if strategy == "same" or not others:
        if "default" not in by_adapter:
            raise CompositionError(f"{path}: no LoRA adapter (keys `...lora_A.default.weight` or `...lora_A.<modality>.weight`)")
        named = [k.split("_")[1] for k in encoders] or [modality]
        adapter, modality_factors = named[0], by_adapter["default"]
    else:
        if adapter not in others:
            raise CompositionError(f"{path}: modality adapters {others}; name the one to use with `adapter_name:`")
        modality_factors = by_adapter[adapter]
    if strategy == "modal+language" and "default" not in by_adapter:
        raise CompositionError(f"{path}: lora_strategy modal+language but no text adapter (keys `...lora_A.default.weight`)")
    missing = [k for k, v in MODELCOMPOSE_LORA_DEFAULTS.items() if k not in cfg]
    if missing:
        LOG.warning("%s/config.json has no %s; using ModelCompose's defaults %s", directory, " / ".join(missing),
                    MODELCOMPOSE_LORA_DEFAULTS)
    scale = _scale({**MODELCOMPOSE_LORA_DEFAULTS, **cfg}, f"{directory}/config.json")
    text = by_adapter.get("default", {})  # `modal`: no text adapter, text tokens run on W0
    src = DecoupledSource(directory, "modelcompose", adapter,
                          text=_pair(text, scale, path, name_map) if text else {},
                          modality=_pair(modality_factors, scale, path, name_map))
    src.prefix, src.suffix = _tokens(rest, adapter, modality, path)
    proj = f"model.modal_projectors.{adapter}."
    src.projector = {k[len(proj):]: v for k, v in rest.items() if k.startswith(proj)}
    src.projector_type = cfg.get(f"mm_{adapter}_projector_type") or cfg.get("mm_projector_type")
    src.encoders = encoders
    return src


def projector_overrides(src: DecoupledSource, family, names, shapes, where: str) -> Dict[str, torch.Tensor]:
    """ModelCompose's projector mapped onto the paired MLLM's connector tensors, for families that
    declare the mapping (`Family.modelcompose_projector`: LLaVA's)."""
    if not src.projector:
        return {}
    mapping = family.modelcompose_projector
    if mapping is None:
        raise CompositionError(f"{where}: ModelCompose projector for family {family.name!r} has no mapping "
                               "(only LLaVA's mlp2x_gelu is mapped); use a PEFT-form source")
    if src.projector_type not in (None, "mlp2x_gelu"):
        raise CompositionError(f"{where}: ModelCompose projector type {src.projector_type!r} (config.json) has no "
                               "mapping onto LLaVA's connector (only mlp2x_gelu); use a PEFT-form source")
    out = {}
    for k, t in src.projector.items():
        target = mapping.get(k)
        hit = [n for n in names if target and (n == target or n == "model." + target)]
        if not hit:
            raise CompositionError(f"{where}: projector key model.modal_projectors.{src.adapter}.{k} has no "
                                   f"LLaVA connector counterpart in the paired model")
        if tuple(shapes[hit[0]][0]) != tuple(t.shape):
            raise CompositionError(f"{where}: projector {k} has shape {list(t.shape)}, the paired model's "
                                   f"{hit[0]!r} has {list(shapes[hit[0]][0])}")
        out[hit[0]] = t
    return out
