"""Qwen3-VL (dense, `Qwen3VLForConditionalGeneration`): refused, with what reading it needs.

Unlike Qwen2-VL / Qwen2.5-VL (families/qwen2_vl.py), its vision tower does not only replace the
image / video placeholders in the LLM's input: "DeepStack" (`vision_config.deepstack_visual_indexes`)
adds features taken from several tower layers to the hidden states of the first LLM layers at the
visual positions (`Qwen3VLTextModel(visual_pos_masks=..., deepstack_visual_embeds=...)`). The
composite's loader hands the merged LLM input embeddings only.
"""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="qwen3_vl",
    architectures=("Qwen3VLForConditionalGeneration",),
    kind="image",
    refused=("Qwen3-VL's vision tower also feeds its language model inside: DeepStack adds features from several "
             "tower layers (vision_config.deepstack_visual_indexes) to the hidden states of the first LLM layers at "
             "the image and video positions, and this version's loader gives the merged LLM input embeddings only. "
             "Reading it needs the encoder to return those per-layer features and the loader to pass them with the "
             "visual positions to the merged LLM (Qwen3VLTextModel's visual_pos_masks and deepstack_visual_embeds), "
             "besides Qwen2-VL's 3-D positions"),
)
