"""LLaVA-1.5 and LLaVA-NeXT (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`)."""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="llava",
    architectures=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
    placeholder_keys=("image_token_index", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.", "image_newline"),
)
