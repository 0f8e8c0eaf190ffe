"""The media preprocessors families build on: image, video and audio, from a source's own processor files.

Each modality's processor config (carried from its source into `modalities/<m>/`) is loaded with
transformers' own Auto classes, so images, audio and video are resized, normalised and featurised
exactly as that source expects. A family picks one of these (with its own options) as its
`preprocessor`; a preprocessor maps a list of media items to the processor outputs its encoder reads.
Video frames go through the source's image processor one frame at a time: transformers' video
processors need torchvision, which the CPU torch builds we target cannot install; for the LLaVA
video families both apply the same per-frame resize / crop / normalise.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import transformers

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.runtime.media import load_audio, load_image, load_video, sample_frames


def quiet(fn: Callable, *args, **kwargs):
    prev = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # "falling back to the PIL backend" on every load
    try:
        return fn(*args, **kwargs)
    finally:
        transformers.utils.logging.set_verbosity(prev)


def _load(auto_cls, directory: str, name: str):
    try:
        return quiet(auto_cls.from_pretrained, directory)
    except Exception as exc:
        raise CompositionError(f"{directory}: cannot load the {name} processor config "
                               f"({type(exc).__name__}: {exc})") from None


class ImagePreprocessor:
    """Images -> `pixel_values` (and `image_sizes` where the processor gives them)."""

    def __init__(self, directory: str, num_frames: Optional[int] = None, *,
                 extra_kwargs: Optional[Mapping[str, Any]] = None):
        self.processor = _load(transformers.AutoImageProcessor, directory, "image")
        self.kwargs = dict(extra_kwargs or {})

    def __call__(self, items: Sequence[Any]) -> Dict[str, torch.Tensor]:
        out = quiet(self.processor, images=[load_image(i) for i in items], return_tensors="pt", **self.kwargs)
        return {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes")}


class VideoPreprocessor:
    """Frames sampled to the source's `num_frames` (when its video config names one), then the
    source's image processor per frame -> `pixel_values_videos` [videos, frames, 3, H, W]."""

    def __init__(self, directory: str, num_frames: Optional[int] = None):
        self.processor = _load(transformers.AutoImageProcessor, directory, "video")
        self.num_frames = num_frames or _num_frames(directory)

    def __call__(self, items: Sequence[Any]) -> Dict[str, torch.Tensor]:
        videos = [sample_frames(load_video(i), self.num_frames) for i in items]
        counts = sorted({len(v) for v in videos})
        if len(counts) > 1:
            raise CompositionError(f"videos in one call must have the same number of frames, got {counts}; "
                                   f"pass num_frames= to CompositeProcessor to sample them to one count")
        pixels = [quiet(self.processor, images=list(v), return_tensors="pt")["pixel_values"] for v in videos]
        return {"pixel_values_videos": torch.stack(pixels)}


class AudioPreprocessor:
    """Waveforms at the feature extractor's rate, padded (or cut) to its window, as the source's
    processor does -> `input_features` (and the attention mask under `mask_key`, if given)."""

    def __init__(self, directory: str, num_frames: Optional[int] = None, *, mask_key: Optional[str] = None):
        self.mask_key = mask_key
        self.extractor = _load(transformers.AutoFeatureExtractor, directory, "audio")

    def __call__(self, items: Sequence[Any]) -> Dict[str, torch.Tensor]:
        rate = self.extractor.sampling_rate
        waves = [load_audio(i, rate) for i in items]
        out = self.extractor(waves, sampling_rate=rate, return_attention_mask=True, padding="max_length",
                             return_tensors="pt")
        media = {"input_features": out["input_features"]}
        if self.mask_key:
            media[self.mask_key] = out["attention_mask"]
        return media


def _num_frames(directory: str) -> Optional[int]:
    path = os.path.join(directory, "video_preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("num_frames")
    return None
