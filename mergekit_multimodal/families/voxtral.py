"""Voxtral (`VoxtralForConditionalGeneration`): Whisper-style audio tower + MLP projector."""

from __future__ import annotations

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import AudioPreprocessor


def features(model, cfg, media):
    feats = media["input_features"]
    out = model.model.get_audio_features(input_features=feats) if hasattr(model, "model") and hasattr(
        model.model, "get_audio_features") else model.get_audio_features(input_features=feats)
    pooled = out.pooler_output
    return list(pooled.reshape(feats.shape[0], -1, pooled.shape[-1]))


def _tiny_encoder(h: int) -> dict:  # the projector reads 4 stacked frames: intermediate_size = 4 * hidden
    return dict(model_type="voxtral_encoder", hidden_size=h, intermediate_size=4 * h, num_hidden_layers=1,
                num_attention_heads=2, head_dim=h // 2, num_mel_bins=tiny.NUM_MEL_BINS, max_source_positions=16)


FAMILY = Family(
    name="voxtral",
    architectures=("VoxtralForConditionalGeneration",),
    placeholder_keys=("audio_token_id", "audio_token_index"),
    encoder_prefixes=("audio_tower.",),
    connector_prefixes=("multi_modal_projector.",),
    kind="audio",
    pipeline_tag="audio-text-to-text",
    encoder=Encoder(features, ("input_features",)),
    preprocessor=AudioPreprocessor,
    tiny={"voxtral": TinySource(
        "VoxtralForConditionalGeneration", "VoxtralConfig", "audio_config", _tiny_encoder, ("[AUDIO]",),
        {"audio_token_id": "[AUDIO]"}, tiny.whisper_processor, seed=5, modality="audio")},
)
