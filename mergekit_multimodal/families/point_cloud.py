"""Point-cloud LLaVA of ours (`PointLlavaForConditionalGeneration`): the family, its model classes,
loader and preprocessor (transformers has no point-cloud LLaVA; see docs/zoo.md).

A checkpoint directory holds `config.json` (`architectures: ["PointLlavaForConditionalGeneration"]`,
`model_type: "point_llava"`, `text_config` = a causal-LM config, `point_config` = the encoder's sizes,
`point_token_index` = the placeholder id) and `model.safetensors` with
`point_encoder.*` (a PointNet-style encoder), `multi_modal_projector.*` (the connector) and the LLM
in LLaVA's legacy layout (`language_model.model.*`, `language_model.lm_head.weight`), so the engine
reads it like any other family. Point clouds are float arrays [points, 3] (xyz) or [points, 6] (xyz rgb).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import transformers
from torch import nn

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families.base import Encoder, Family

ARCHITECTURE = "PointLlavaForConditionalGeneration"
#: size budget of one point cloud (docs/runtime.md)
MAX_POINTS = 10_000_000
MODEL_TYPE = "point_llava"


class PointLlavaConfig(transformers.PretrainedConfig):
    """Registered with AutoConfig so transformers' Auto classes (e.g. AutoTokenizer on a checkpoint
    directory) read our config.json instead of warning about an unknown model type."""

    model_type = MODEL_TYPE


if MODEL_TYPE not in transformers.CONFIG_MAPPING:
    transformers.AutoConfig.register(MODEL_TYPE, PointLlavaConfig)


class PointEncoder(nn.Module):
    """Per-point MLP, then `num_tokens` learned queries attend over the points (a tiny Q-Former)."""

    def __init__(self, in_dim: int = 3, hidden_size: int = 32, num_tokens: int = 4, num_points: int = 64):
        super().__init__()
        self.in_dim, self.num_points = in_dim, num_points
        self.point_mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.queries = nn.Parameter(torch.randn(num_tokens, hidden_size) * 0.02)
        self.attn = nn.MultiheadAttention(hidden_size, 2, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, points: torch.Tensor) -> torch.Tensor:  # [B, P, in_dim] -> [B, T, hidden]
        h = self.point_mlp(points)
        q = self.queries.unsqueeze(0).expand(points.shape[0], -1, -1)
        out, _ = self.attn(q, h, h, need_weights=False)
        return self.norm(out + q)


class PointProjector(nn.Module):
    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(in_size, out_size), nn.GELU(), nn.Linear(out_size, out_size)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class PointLlavaForConditionalGeneration(nn.Module):
    """Encoder + connector, and optionally the LLM (a transformers causal LM) for training/saving."""

    def __init__(self, config: dict, language_model: nn.Module | None = None):
        super().__init__()
        pc = config["point_config"]
        self.config = config
        self.point_encoder = PointEncoder(pc["in_dim"], pc["hidden_size"], pc["num_tokens"], pc["num_points"])
        self.multi_modal_projector = PointProjector(pc["hidden_size"], config["text_config"]["hidden_size"])
        if language_model is not None:
            self.language_model = language_model

    def get_point_features(self, points: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.point_encoder(points))

    # the same accessors transformers' MLLMs give, so training code treats every family alike
    def get_decoder(self):
        return self.language_model.get_decoder()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def save_pretrained(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        sd = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        if self.language_model.config.tie_word_embeddings:
            sd.pop("language_model.lm_head.weight", None)
        save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2)


def make_config(text_config: dict, point_token_index: int, *, in_dim=3, hidden_size=32, num_tokens=4,
                num_points=64) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "text_config": text_config,
            "point_config": {"in_dim": in_dim, "hidden_size": hidden_size, "num_tokens": num_tokens,
                             "num_points": num_points},
            "point_token_index": point_token_index}


def load_encoder(directory: str, dtype=None):
    """Encoder + connector from a source or `modalities/<m>/` directory (LLM tensors are ignored)."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        model = PointLlavaForConditionalGeneration(cfg)
        # the model's own weights (one file or shards), not other files beside them (DAMC's prefix_suffix)
        files = sorted(n for n in os.listdir(directory) if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n))
        sd = {}
        for n in files:
            sd.update({k: v for k, v in load_file(os.path.join(directory, n)).items()
                       if not k.startswith("language_model.")})
        want = model.state_dict()
    except Exception as exc:
        raise CompositionError(f"{directory}: cannot load the point-cloud encoder ({type(exc).__name__}: {exc})") from None
    where = os.path.join(directory, files[0] if len(files) == 1 else "*.safetensors")
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing:
        raise CompositionError(f"{where}: point-cloud encoder tensor(s) missing: {missing[:5]}")
    if unexpected:
        raise CompositionError(f"{where}: unexpected point-cloud encoder tensor(s): {unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CompositionError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the config needs "
                                   f"{tuple(want[k].shape)}")
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg


def features(model, cfg, media) -> List[torch.Tensor]:
    """`point_clouds` [items, points, dims] -> one [num_tokens, hidden] feature matrix per item."""
    return list(model.get_point_features(media["point_clouds"]))


def _load_points(item: Any) -> Tuple[np.ndarray, str]:
    """(array [points, channels], what to call it in errors)."""
    if isinstance(item, (str, os.PathLike)):
        path = str(item)
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise CompositionError(f"{path}: not a readable .npy point cloud ({type(exc).__name__}: {exc})") from None
        where = path
    else:
        arr, where = np.asarray(item), "point cloud"
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise CompositionError(f"{where}: a point cloud is [points, 3 or 6] with at least one point, "
                               f"got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise CompositionError(f"{where}: a point cloud is numbers, got dtype {arr.dtype}")
    if arr.shape[0] > MAX_POINTS:
        raise CompositionError(f"{where}: {arr.shape[0]} points is over the budget of {MAX_POINTS}; subsample it first")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise CompositionError(f"{where}: {int((~np.isfinite(arr)).sum())} value(s) are NaN or inf")
    return arr, where


def preprocess_point_clouds(items: Sequence[Any], directory: str) -> Dict[str, torch.Tensor]:
    """Point clouds (.npy paths or arrays) -> {"point_clouds": [items, num_points, in_dim]} for the
    encoder stored in `directory`: resampled to its point count (evenly spaced, order kept; deterministic)."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        pc = json.load(f)["point_config"]
    out = []
    for item in items:
        arr, where = _load_points(item)
        if arr.shape[1] < pc["in_dim"]:
            raise CompositionError(f"{where}: {arr.shape[1]} channels per point; the encoder needs {pc['in_dim']}")
        arr = arr[:, : pc["in_dim"]]
        idx = np.linspace(0, len(arr) - 1, pc["num_points"]).round().astype(int)
        out.append(torch.from_numpy(arr[idx]))
    return {"point_clouds": torch.stack(out)}


class PointCloudPreprocessor:
    """The family's preprocessor: items -> {"point_clouds": ...} for the encoder stored in `directory`."""

    def __init__(self, directory: str, num_frames=None):
        self.directory = directory

    def __call__(self, items):
        return preprocess_point_clouds(items, self.directory)


FAMILY = Family(
    name="point_cloud",
    architectures=(ARCHITECTURE,),
    placeholder_keys=("point_token_index",),
    encoder_prefixes=("point_encoder.",),
    connector_prefixes=("multi_modal_projector.",),
    kind="point_cloud",
    markers=("point",),  # ModelCompose's MCUB writes <point>
    pipeline_tag="any-to-any",
    encoder=Encoder(features, ("point_clouds",), load=load_encoder),
    preprocessor=PointCloudPreprocessor,
)
