"""Which model to run: a composite as it is, or a single source MLLM as a one-source NaiveMC
composite of it (identical to the source); and which of its modalities each question's media go to."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Optional, Tuple

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.evaluation.benchmark import Question


def is_composite(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "composite_config.json"))


def source_modality(path: str) -> str:
    """The modality name a single source checkpoint gets: the kind of media its family takes."""
    from mergekit_multimodal.families import layout_for
    from mergekit_multimodal.families import FAMILIES

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CompositionError(f"{path}: neither a composite (composite_config.json) nor a checkpoint (config.json)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    family = layout_for(cfg, path).family
    if family.kind is None:
        raise CompositionError(f"{path}: a {family.name} checkpoint has no modality to evaluate; "
                               f"evaluate a multimodal source ({', '.join(f.name for f in FAMILIES)})")
    return family.kind


def composite_for(model: str, *, modality: Optional[str] = None, cache_dir: Optional[str] = None) -> Tuple[str, bool]:
    """(composite dir, is_temporary): the model itself, or a one-source NaiveMC composite of it
    (identical to the source) under `cache_dir` (reused when already built) or a temporary dir."""
    if is_composite(model):
        return model, False
    modality = modality or source_modality(model)
    from mergekit_multimodal.api import compose

    src = os.path.abspath(model)
    cfg = {"merge_method": "naive_mc", "base_model": src, "models": [{"model": src, "modality": modality}]}
    if cache_dir:
        key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        out = os.path.join(cache_dir, f"{os.path.basename(src.rstrip(os.sep))}-{key}")
        if not is_composite(out):
            os.makedirs(cache_dir, exist_ok=True)
            compose(cfg, out, overwrite=True)
        return out, False
    out = os.path.join(tempfile.mkdtemp(prefix="mm-eval-"), "composite")
    compose(cfg, out)
    return out, True


def _resolve_modalities(q: Question, proc) -> Optional[Dict[str, str]]:
    """Benchmark modality -> composite modality (same name, else the one composite modality of that
    kind: `video` -> `video_next`); None when the composite lacks one."""
    out = {}
    for m in q.media:
        if m in proc.modalities:
            out[m] = m
            continue
        same_kind = [c for c in proc.modalities if proc.kind(c) == m]
        if len(same_kind) != 1:
            return None
        out[m] = same_kind[0]
    return out
