"""LLaVA-OneVision and LLaVA-Video (`LlavaOnevisionForConditionalGeneration`; transformers has no
LLaVA-Video class: LLaVA-Video-7B-Qwen2's `-hf` conversion is this class too).

One tower takes images (anyres tiles + base view, packed with `image_newline`; several images in one
prompt: each its base view of a padded square and one `image_newline`) and videos (frames pooled
2x2, one `image_newline` after the clip). Like Video-LLaVA, the modality name decides what a
composite runs: a modality named `video...` is a video modality (`<video>`, `video_token_index`,
`pixel_values_videos`); any other name is an image modality (`<image>`, `pixel_values` + `image_sizes`).

Video frames: the source's video processor (LlavaOnevisionVideoProcessor) needs torchvision, which
the CPU torch builds we target cannot load. Its steps are resize to `size` (no crop), rescale,
normalise, RGB; the composite applies those same steps per frame with the PIL backend of
transformers' SiglipImageProcessor (same steps), from the stored `video_preprocessor_config.json`
(the class defaults where a key is absent). PIL's and torchvision's bicubic resampling differ by
rounding; docs/runtime.md says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Sequence

import torch

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime import preprocess
from mergekit_multimodal.runtime.media import load_image
from mergekit_multimodal.runtime.preprocess import ImagePreprocessor, quiet


def features(model, cfg, media):
    if "pixel_values_videos" in media:
        out = model.model.get_video_features(
            pixel_values_videos=media["pixel_values_videos"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return list(out.pooler_output)
    # as the source's forward calls it: an image alone in its prompt is tiled (anyres), several images
    # of one prompt are their base views (batch_num_images; unset: every image alone)
    out = model.model.get_image_features(
        pixel_values=media["pixel_values"], image_sizes=media["image_sizes"],
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        batch_num_images=media.get("batch_num_images"))
    return list(out.pooler_output)


class ImagesByPrompt(ImagePreprocessor):
    """Images grouped by prompt, as LlavaOnevisionProcessor gives them to its image processor when a
    prompt's images come as one list (what its chat template does): an image alone in its prompt is
    tiled, several in one prompt are each padded to a square and resized (no tiles);
    `batch_num_images` records the grouping for the model."""

    def __call__(self, items: Sequence[Any], per_prompt: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        images = [load_image(i) for i in items]
        counts = [n for n in (per_prompt or [1] * len(images)) if n]
        if sum(counts) != len(images):
            raise CompositionError(f"{len(images)} image(s) given for prompts holding {sum(counts)}")
        starts = [sum(counts[:i]) for i in range(len(counts))]
        nested = [images[s:s + n] for s, n in zip(starts, counts)]
        out = quiet(self.processor, images=nested, return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}


#: LlavaOnevisionVideoProcessor's steps and the keys of its config that they read
_VIDEO_KEYS = ("size", "resample", "rescale_factor", "image_mean", "image_std", "do_resize", "do_rescale",
               "do_normalize", "do_convert_rgb")


class VideoPreprocessor(preprocess.VideoPreprocessor):
    """Videos -> `pixel_values_videos` [videos, frames, 3, H, W], frame by frame as the source's
    video processor computes them (see the module docstring): the generic video preprocessor with
    the video processor's steps in place of the source's image processor."""

    def __init__(self, directory: str, num_frames: Optional[int] = None):  # not super().__init__: no image processor to load
        import transformers
        from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

        settings = {k: getattr(LlavaOnevisionVideoProcessor, k) for k in _VIDEO_KEYS}
        path = os.path.join(directory, "video_preprocessor_config.json")
        stored: Dict[str, Any] = {}
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    stored = json.load(f)
            except (OSError, ValueError) as exc:
                raise CompositionError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        if stored.get("do_center_crop"):
            raise CompositionError(f"{path}: do_center_crop is set; LLaVA-OneVision's video processor does not crop "
                                   f"and the composite's frame steps do not either")
        settings.update({k: stored[k] for k in _VIDEO_KEYS if k in stored})
        size = settings["size"]
        if not (isinstance(size, dict) and {"height", "width"} <= set(size)):
            raise CompositionError(f"{path}: size must be {{height, width}} (got {size!r})")
        self.num_frames = num_frames or stored.get("num_frames")
        self.processor = quiet(transformers.SiglipImageProcessor, **{k: (list(v) if isinstance(v, tuple) else v)
                                                                     for k, v in settings.items()})


SIDE = 2 * tiny.IMAGE_SIZE  # 56 px: 4x4 patches, pooled 2x2 per video frame
GRID = [[SIDE, SIDE], [SIDE, 2 * SIDE], [2 * SIDE, SIDE], [2 * SIDE, 2 * SIDE]]


def _tiny_encoder(h: int) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                num_attention_heads=2, image_size=SIDE, patch_size=tiny.PATCH_SIZE)


class _TinyProcessor:
    """The image processor, plus the video processor's config as released checkpoints ship it (the
    class itself cannot be built without torchvision)."""

    def save_pretrained(self, d):
        import transformers

        quiet(transformers.LlavaOnevisionImageProcessor, size={"height": SIDE, "width": SIDE},
              image_grid_pinpoints=GRID).save_pretrained(d)
        video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": SIDE, "width": SIDE},
                 "resample": 3, "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True,
                 "do_normalize": True, "do_convert_rgb": True,
                 "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
        with open(os.path.join(d, "video_preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(video, f, indent=2)


_TINY = TinySource(
    "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig", "vision_config", _tiny_encoder,
    ("<image>", "<video>"), {"image_token_index": "<image>", "video_token_index": "<video>"}, _TinyProcessor,
    seed=9, modality="image", extra_config={"image_grid_pinpoints": GRID})

_IMAGE = Family(
    name="llava_onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    placeholder_keys=("image_token_index", "video_token_index", "image_token_id", "video_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.", "image_newline"),
    kind="image",
    pipeline_tag="image-text-to-text",
    encoder=Encoder(features, ("pixel_values", "image_sizes")),
    preprocessor=ImagesByPrompt,
    items_by_prompt="batch_num_images",  # several images in one prompt: neither tiled by its processor nor its forward
    # LLaVA-Video-7B-Qwen2-hf: the same class, composed as a video modality
    tiny={"llava_onevision": _TINY, "llava_video": dataclasses.replace(_TINY, seed=10, modality="video")},
)

FAMILY = dataclasses.replace(_IMAGE, variants={"video": dataclasses.replace(
    _IMAGE, kind="video", pipeline_tag="video-text-to-text", encoder=Encoder(features, ("pixel_values_videos",)),
    preprocessor=VideoPreprocessor, items_by_prompt=None, tiny={})})
