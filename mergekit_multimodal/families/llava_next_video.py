"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`)."""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="llava_next_video",
    architectures=("LlavaNextVideoForConditionalGeneration",),
    placeholder_keys=("video_token_index", "image_token_index", "video_token_id", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.", "image_newline", "vision_resampler."),
)
