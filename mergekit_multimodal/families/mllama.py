"""Llama-3.2-Vision (`MllamaForConditionalGeneration`): refused, with the reason.

Its language model is Llama 3.1's with cross-attention layers inserted among the self-attention
layers (`text_config.cross_attention_layers`; the 11B has 40 layers: Llama 3.1 8B's 32 plus 8), so
its layer i is not Llama 3.1's layer i, and its LLM cannot be merged tensor by tensor with a Llama
3.1 base or with sources that lack those layers.
"""

from mergekit_multimodal.families.base import Family

FAMILY = Family(
    name="mllama",
    architectures=("MllamaForConditionalGeneration",),
    kind="image",
    refused=("Llama-3.2-Vision inserts cross-attention layers among its language model's layers "
             "(text_config.cross_attention_layers), so its LLM's layers do not line up with Llama 3.1's "
             "and cannot be merged with them tensor by tensor. Composing it would need a layer map (its "
             "self-attention layers onto the base's, its cross-attention layers kept with its modality) and a "
             "runtime that runs those cross-attention layers on the image states; this version has neither"),
)
