"""Mistral-Small-3.1 vision (`Mistral3ForConditionalGeneration`): Pixtral tower + patch-merger projector."""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="mistral3",
    architectures=("Mistral3ForConditionalGeneration",),
    placeholder_keys=("image_token_index", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.",),
)
