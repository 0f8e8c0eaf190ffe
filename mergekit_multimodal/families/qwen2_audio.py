"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`): Whisper-style audio tower + linear projector."""

from __future__ import annotations

import functools

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import AudioPreprocessor


def features(model, cfg, media):
    """Qwen2-Audio has no get_audio_features: this mirrors its forward's audio branch (transformers 5)."""
    import torch
    from transformers.masking_utils import create_bidirectional_mask

    feats, mask = media["input_features"], media["feature_attention_mask"]
    inner = model.model
    feat_lengths, out_lengths = inner.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))
    batch, _, max_mel = feats.shape
    max_seq = (max_mel - 2) // 2 + 1
    seq = torch.arange(max_seq, dtype=feat_lengths.dtype, device=feat_lengths.device).unsqueeze(0).expand(batch, max_seq)
    valid = (seq < feat_lengths.unsqueeze(1)).long()
    dummy = torch.zeros((batch, max_seq, 1), dtype=feats.dtype, device=feats.device)
    attn = create_bidirectional_mask(config=inner.audio_tower.config, inputs_embeds=dummy, attention_mask=valid)
    hidden = inner.audio_tower(feats, attention_mask=attn).last_hidden_state
    projected = inner.multi_modal_projector(hidden)
    return [projected[i, : int(out_lengths[i])] for i in range(batch)]


def _tiny_encoder(h: int) -> dict:
    return dict(model_type="qwen2_audio_encoder", d_model=h, encoder_layers=1, encoder_attention_heads=2,
                encoder_ffn_dim=2 * h, num_mel_bins=tiny.NUM_MEL_BINS, max_source_positions=16)


FAMILY = Family(
    name="qwen2_audio",
    architectures=("Qwen2AudioForConditionalGeneration",),
    placeholder_keys=("audio_token_index", "audio_token_id"),
    encoder_prefixes=("audio_tower.",),
    connector_prefixes=("multi_modal_projector.",),
    kind="audio",
    pipeline_tag="audio-text-to-text",
    encoder=Encoder(features, ("input_features", "feature_attention_mask")),
    preprocessor=functools.partial(AudioPreprocessor, mask_key="feature_attention_mask"),
    tiny={"qwen2_audio": TinySource(
        "Qwen2AudioForConditionalGeneration", "Qwen2AudioConfig", "audio_config", _tiny_encoder, ("<|AUDIO|>",),
        {"audio_token_index": "<|AUDIO|>"}, tiny.whisper_processor, seed=3, modality="audio", in_example=True)},
)
