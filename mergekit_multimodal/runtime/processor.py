"""`CompositeProcessor`: text with placeholders + media files -> inputs of `CompositeModel`.

The composite's tokenizer knows every modality's placeholder; each modality's processor config
(carried from its source into `modalities/<m>/`) is loaded with transformers' own Auto classes, so
images, audio and video are resized, normalised and featurised exactly as that source expects.
Video frames go through the source's image processor one frame at a time: transformers' video
processors need torchvision, which the CPU torch builds we target cannot install; for the LLaVA
video families both apply the same per-frame resize / crop / normalise.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import transformers

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.routes import read_composite_config
from mergekit_multimodal.runtime import media as M
from mergekit_multimodal.runtime.point_cloud import PointCloudPreprocessor

#: family -> the kind of media its modality takes (what `images=` / `videos=` / `audios=` fill)
KIND_OF_FAMILY = {"llava": "image", "mistral3": "image", "video_llava": "video", "llava_next_video": "video",
                  "qwen2_audio": "audio", "voxtral": "audio", "point_cloud": "point_cloud"}


def _quiet(fn: Callable, *args, **kwargs):
    prev = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # "falling back to the PIL backend" on every load
    try:
        return fn(*args, **kwargs)
    finally:
        transformers.utils.logging.set_verbosity(prev)


def _load(auto_cls, directory: str, name: str):
    try:
        return _quiet(auto_cls.from_pretrained, directory)
    except Exception as exc:
        raise CompositionError(f"{directory}: cannot load the {name} processor config "
                               f"({type(exc).__name__}: {exc})") from None


class ImagePreprocessor:
    def __init__(self, directory: str, family: str):
        self.processor = _load(transformers.AutoImageProcessor, directory, "image")
        self.kwargs = {}
        if family == "mistral3":  # as PixtralProcessor does: sizes rounded to whole merged patches
            cfg = transformers.AutoConfig.from_pretrained(directory)
            side = cfg.vision_config.patch_size * cfg.spatial_merge_size
            self.kwargs["patch_size"] = {"height": side, "width": side}

    def __call__(self, items: Sequence[Any]) -> Dict[str, torch.Tensor]:
        out = _quiet(self.processor, images=[M.load_image(i) for i in items], return_tensors="pt", **self.kwargs)
        return {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes")}


class VideoPreprocessor:
    """Frames sampled to the source's `num_frames` (when its video config names one), then the
    source's image processor per frame -> `pixel_values_videos` [videos, frames, 3, H, W]."""

    def __init__(self, directory: str, family: str, num_frames: Optional[int] = None):
        self.processor = _load(transformers.AutoImageProcessor, directory, "video")
        self.num_frames = num_frames or _num_frames(directory)

    def __call__(self, items: Sequence[Any]) -> Dict[str, torch.Tensor]:
        videos = [M.sample_frames(M.load_video(i), self.num_frames) for i in items]
        counts = sorted({len(v) for v in videos})
        if len(counts) > 1:
            raise CompositionError(f"videos in one call must have the same number of frames, got {counts}; "
                                   f"pass num_frames= to CompositeProcessor to sample them to one count")
        pixels = [_quiet(self.processor, images=list(v), return_tensors="pt")["pixel_values"] for v in videos]
        return {"pixel_values_videos": torch.stack(pixels)}


class AudioPreprocessor:
    """Waveforms at the feature extractor's rate, padded (or cut) to its window, as the source's processor does."""

    def __init__(self, directory: str, family: str):
        self.family = family
        self.extractor = _load(transformers.AutoFeatureExtractor, directory, "audio")

    def __call__(self, items: Sequence[Any]) -> Dict[str, torch.Tensor]:
        rate = self.extractor.sampling_rate
        waves = [M.load_audio(i, rate) for i in items]
        out = self.extractor(waves, sampling_rate=rate, return_attention_mask=True, padding="max_length",
                             return_tensors="pt")
        media = {"input_features": out["input_features"]}
        if self.family == "qwen2_audio":
            media["feature_attention_mask"] = out["attention_mask"]
        return media


#: family -> preprocessor factory(directory, family)
PREPROCESSORS: Dict[str, Callable] = {
    "llava": ImagePreprocessor, "mistral3": ImagePreprocessor,
    "video_llava": VideoPreprocessor, "llava_next_video": VideoPreprocessor,
    "qwen2_audio": AudioPreprocessor, "voxtral": AudioPreprocessor,
    "point_cloud": PointCloudPreprocessor,
}


def _num_frames(directory: str) -> Optional[int]:
    import json

    path = os.path.join(directory, "video_preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("num_frames")
    return None


class CompositeProcessor:
    """Builds `CompositeModel` inputs: `{"input_ids", "attention_mask", "media"}`.

    >>> proc = CompositeProcessor.from_pretrained("my-composite")
    >>> inputs = proc("USER: <image> <audio> What do they have in common?",
    ...               media={"image": ["cat.png"], "audio": ["meow.wav"]})
    >>> model.generate(**inputs, max_new_tokens=20)

    Each placeholder stands for one item of its modality, items taken in prompt order (across the
    batch, row by row). `images=`, `videos=`, `audios=` are shortcuts when exactly one modality of
    the composite takes that kind of media.
    """

    def __init__(self, path: str, tokenizer, config: dict, preprocessors: Dict[str, Callable]):
        self.path, self.tokenizer, self.composite_config = path, tokenizer, config
        self.preprocessors = preprocessors
        self.modalities: List[str] = list(config["modalities"])
        self.placeholders = {m: config["modalities"][m]["placeholder"] for m in self.modalities}
        self.placeholder_ids = {m: config["modalities"][m]["placeholder_id"] for m in self.modalities}

    @classmethod
    def from_pretrained(cls, path: str, num_frames: Optional[int] = None) -> "CompositeProcessor":
        cfg = read_composite_config(path)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise CompositionError(f"{path}: the composite's tokenizer does not load ({type(exc).__name__}: {exc})") from None
        preps = {}
        for m, info in cfg["modalities"].items():
            factory = PREPROCESSORS.get(info["family"])
            if factory is None:
                raise CompositionError(f"{path}: no processor for modality {m!r} of family {info['family']!r} "
                                       f"(supported: {', '.join(PREPROCESSORS)})")
            directory = os.path.join(path, info["path"])
            preps[m] = factory(directory, info["family"], num_frames) if factory is VideoPreprocessor \
                else factory(directory, info["family"])
        return cls(path, tok, cfg, preps)

    def kind(self, modality: str) -> Optional[str]:
        return KIND_OF_FAMILY.get(self.composite_config["modalities"][modality]["family"])

    def __call__(self, text: Union[str, Sequence[str]], media: Optional[Mapping[str, Sequence[Any]]] = None, *,
                 images=None, videos=None, audios=None, return_tensors: str = "pt") -> Dict[str, Any]:
        if return_tensors != "pt":
            raise ValueError("CompositeProcessor returns PyTorch tensors only (return_tensors='pt')")
        media = {m: list(items) for m, items in (media or {}).items()}
        for kind, items in (("image", images), ("video", videos), ("audio", audios)):
            if items is not None:
                media.setdefault(self.modality_of_kind(kind), []).extend(_as_list(items))
        for m in media:
            if m not in self.modalities:
                raise CompositionError(f"the composite has no modality {m!r}; it has {', '.join(self.modalities)}")
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts]
        for m in self.modalities:
            found = sum(int((r == self.placeholder_ids[m]).sum()) for r in rows)
            given = len(media.get(m, []))
            if found != given:
                raise CompositionError(f"the prompt has {found} {self.placeholders[m]!r} placeholder(s) but "
                                       f"{given} {m} item(s) were given; put one placeholder per item")
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding, as generation needs
            input_ids[b, width - len(r):] = r
            attention_mask[b, width - len(r):] = 1
        features = {m: self.preprocessors[m](items) for m, items in media.items() if items}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "media": features}

    def modality_of_kind(self, kind: str) -> str:
        matches = [m for m in self.modalities if self.kind(m) == kind]
        if len(matches) != 1:
            have = ", ".join(f"{m} ({self.kind(m)})" for m in self.modalities)
            why = "none takes" if not matches else f"{len(matches)} modalities take"
            raise CompositionError(f"a {kind} given without its modality is ambiguous: {why} {kind}s in this "
                                   f"composite ({have}); name the modality (mergekit-mm-run --media NAME=PATH, "
                                   f"or media={{NAME: [...]}} in Python)")
        return matches[0]

    def batch_decode(self, ids, **kwargs) -> List[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def _as_list(items) -> list:
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, np.ndarray) and items.dtype == object:
        return list(items)
    return [items]
