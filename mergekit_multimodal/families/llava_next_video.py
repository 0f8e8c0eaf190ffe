"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`)."""

from __future__ import annotations

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import VideoPreprocessor


def features(model, cfg, media):
    videos = media["pixel_values_videos"]
    out = model.model.get_video_features(
        pixel_values_videos=videos, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = out.pooler_output
    if isinstance(feats, (list, tuple)):
        return list(feats)
    return list(feats.reshape(videos.shape[0], -1, feats.shape[-1]))


FAMILY = Family(
    name="llava_next_video",
    architectures=("LlavaNextVideoForConditionalGeneration",),
    placeholder_keys=("video_token_index", "image_token_index", "video_token_id", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.", "image_newline", "vision_resampler."),
    kind="video",
    pipeline_tag="video-text-to-text",
    encoder=Encoder(features, ("pixel_values_videos",)),
    preprocessor=VideoPreprocessor,
    # Video-LLaVA already uses <video>: tests and the example give this one its own placeholder
    tiny={"llava_next_video": TinySource(
        "LlavaNextVideoForConditionalGeneration", "LlavaNextVideoConfig", "vision_config", tiny.clip,
        ("<image>", "<video>"), {"image_token_index": "<image>", "video_token_index": "<video>"}, tiny.clip_processor,
        seed=2, modality="video_next", placeholder="<video_next>", in_example=True)},
)
