"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): separate image and video towers, one projector.

It brings both towers, so the modality name decides which one a composite runs: a modality named
`image...` is an image modality (its image tower, `pixel_values_images`, the `<image>` placeholder,
`image_token_index`); any other name is a video modality (video tower, `<video>`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import ImagePreprocessor, VideoPreprocessor


def _split_batch(features, items: int):
    return list(features.reshape(items, -1, features.shape[-1]))


def features(model, cfg, media):
    if "pixel_values_videos" in media:
        videos = media["pixel_values_videos"]
        out = model.model.get_video_features(pixel_values_videos=videos, vision_feature_layer=cfg.vision_feature_layer)
        return _split_batch(out.pooler_output, videos.shape[0])
    out = model.model.get_image_features(
        pixel_values_images=media["pixel_values_images"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return _split_batch(out.pooler_output, media["pixel_values_images"].shape[0])


class ImageTowerPreprocessor(ImagePreprocessor):
    """Images for the image tower: the processor's `pixel_values`, under the name the model takes."""

    def __init__(self, directory: str, num_frames: Optional[int] = None):
        super().__init__(directory)

    def __call__(self, items):
        return {"pixel_values_images": super().__call__(items)["pixel_values"]}


_VIDEO = Family(
    name="video_llava",
    architectures=("VideoLlavaForConditionalGeneration",),
    placeholder_keys=("video_token_index", "image_token_index", "video_token_id", "image_token_id"),
    encoder_prefixes=("video_tower.", "image_tower."),
    connector_prefixes=("multi_modal_projector.",),
    kind="video",
    pipeline_tag="video-text-to-text",
    encoder=Encoder(features, ("pixel_values_videos",)),
    preprocessor=VideoPreprocessor,
    tiny={"video_llava": TinySource(
        "VideoLlavaForConditionalGeneration", "VideoLlavaConfig", "vision_config", tiny.clip, ("<image>", "<video>"),
        {"image_token_index": "<image>", "video_token_index": "<video>"}, tiny.clip_processor,
        seed=1, modality="video", in_example=True)},
)

FAMILY = dataclasses.replace(_VIDEO, variants={"image": dataclasses.replace(
    _VIDEO, kind="image", pipeline_tag="image-text-to-text", encoder=Encoder(features, ("pixel_values_images",)),
    preprocessor=ImageTowerPreprocessor, tiny={})})
