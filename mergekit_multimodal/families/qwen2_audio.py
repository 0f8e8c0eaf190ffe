"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`): Whisper-style audio tower + linear projector."""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="qwen2_audio",
    architectures=("Qwen2AudioForConditionalGeneration",),
    placeholder_keys=("audio_token_index", "audio_token_id"),
    encoder_prefixes=("audio_tower.",),
    connector_prefixes=("multi_modal_projector.",),
)
