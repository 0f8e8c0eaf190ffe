"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): separate image and video towers, one projector."""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="video_llava",
    architectures=("VideoLlavaForConditionalGeneration",),
    placeholder_keys=("video_token_index", "image_token_index", "video_token_id", "image_token_id"),
    encoder_prefixes=("video_tower.", "image_tower."),
    connector_prefixes=("multi_modal_projector.",),
)
