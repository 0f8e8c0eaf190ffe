"""Sizes and pieces shared by the families' tiny stand-ins (`Family.tiny`; built by `testing.py`).

Tiny encoders take 28 px images (14 px patches) and a 1 s audio window of 32 mel frames at 16 kHz.
"""

from __future__ import annotations

IMAGE_SIZE, PATCH_SIZE, NUM_MEL_BINS, AUDIO_RATE = 28, 14, 8, 16000
#: LLaVA-NeXT's anyres grid: a base view plus up to 2x2 tiles of 28 px
GRID = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
        [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def clip(h: int) -> dict:  # LLaVA's default vision_feature_layer=-2 needs >= 2 layers
    import transformers

    return transformers.CLIPVisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=h).to_dict()


def clip_processor():
    import transformers

    size = IMAGE_SIZE
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def whisper_processor():  # a 1 s window of 32 mel frames: what the tiny encoders' 16 positions take
    import transformers

    return transformers.WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=AUDIO_RATE, hop_length=AUDIO_RATE // 32,
                                     n_fft=2 * (AUDIO_RATE // 32), chunk_length=1)
