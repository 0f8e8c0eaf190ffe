"""Voxtral (`VoxtralForConditionalGeneration`): Whisper-style audio tower + MLP projector."""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="voxtral",
    architectures=("VoxtralForConditionalGeneration",),
    placeholder_keys=("audio_token_id", "audio_token_index"),
    encoder_prefixes=("audio_tower.",),
    connector_prefixes=("multi_modal_projector.",),
)
