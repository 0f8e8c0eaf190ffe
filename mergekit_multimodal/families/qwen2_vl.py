"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: refused for now, with what reading them needs.

Their language model takes 3-D rotary positions (mrope: temporal, height, width per token), which
the source computes from `mm_token_type_ids` and each image's / video's `image_grid_thw` /
`video_grid_thw` (`get_rope_index`), keeping `rope_deltas` for the generated tokens. transformers
has no causal-LM class for their text models (`qwen2_vl_text` ... are not in
MODEL_FOR_CAUSAL_LM_MAPPING), so the composite's merged LLM cannot be loaded as one, and a plain
Qwen2 LLM run on 1-D positions would not compute the source's logits for any prompt with media.
"""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                   "Qwen3VLForConditionalGeneration"),
    kind="image",
    refused=("Qwen2-VL / Qwen2.5-VL / Qwen3-VL run their language model on 3-D rotary positions (mrope) that "
             "the source computes from each image's and video's grid (get_rope_index, rope_deltas), and "
             "transformers has no causal-LM class for their text models, so this version cannot load their merged "
             "LLM or reproduce their positions. Reading them needs a loader for the text model (the source class "
             "with its vision tower left out) and the composite's forward computing positions with the source's "
             "get_rope_index over the expanded sequence"),
)
