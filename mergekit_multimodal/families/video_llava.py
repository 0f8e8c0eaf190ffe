"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): separate image and video towers, one projector."""

from __future__ import annotations

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import VideoPreprocessor


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


FAMILY = Family(
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
