"""Gemma 3 and MedGemma (`Gemma3ForConditionalGeneration`): SigLIP tower + pooled soft-embedding projector.

As Gemma3Processor lays an image out: `\\n\\n<start_of_image>`, `mm_tokens_per_image` soft tokens
(`<image_soft_token>`, the placeholder), `<end_of_image>\\n\\n`; a prompt's `<start_of_image>` (what
Gemma's chat template writes) and the generic `<image>` both stand for that. The source attends
bidirectionally among one image's soft tokens (and causally elsewhere); the composite's LLM is given
the same masks, built by transformers' own Gemma 3 mask functions. Pan-and-scan (a call option of
Gemma3Processor, `do_pan_and_scan=True`, or the stored image processor config's setting) crops an
image into several; each crop is then its own image sequence after the image's, with Gemma3Processor's
text between them, and its own features.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import torch

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.media import load_image
from mergekit_multimodal.runtime.preprocess import ImagePreprocessor, quiet

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
#: tokenizer attributes Gemma3Processor reads (the stand-in's tokenizer names them); `{}` is the placeholder
NAMED_TOKENS = {"boi_token": BOI, "eoi_token": EOI, "image_token": "{}"}


def features(model, cfg, media):
    return list(model.model.get_image_features(pixel_values=media["pixel_values"]).pooler_output)


#: Gemma3Processor's call options for pan-and-scan (its image processor's settings of that name)
PAN_AND_SCAN = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                "pan_and_scan_min_ratio_to_activate")


class Preprocessor(ImagePreprocessor):
    """Gemma3ImageProcessor as stored -> `pixel_values` (each image, then its pan-and-scan crops) and
    `num_crops` per image. Gemma3Processor passes its own defaults for the pan-and-scan settings
    (`Gemma3Processor.images_kwargs`: off) unless the call names them; here a setting the stored
    image processor config gives (not null) is the default instead, and the call's options override
    both, as they do Gemma3Processor's."""

    options = frozenset(PAN_AND_SCAN)

    def __init__(self, directory: str, num_frames: Optional[int] = None):
        import transformers

        super().__init__(directory)
        defaults = transformers.Gemma3Processor.images_kwargs
        stored = {k: getattr(self.processor, k, None) for k in PAN_AND_SCAN}
        self.kwargs = {k: defaults[k] if stored[k] is None else stored[k] for k in PAN_AND_SCAN}

    def __call__(self, items: Sequence[Any], **options) -> Dict[str, torch.Tensor]:
        out = quiet(self.processor, images=[load_image(i) for i in items], return_tensors="pt",
                    **{**self.kwargs, **options})
        return {"pixel_values": out["pixel_values"], "num_crops": out["num_crops"]}


def item_layout(text: str, media) -> List[str]:
    """Each image's text as Gemma3Processor writes it (its own `replace_image_token`, whose full image
    sequence is `text` here): the image alone, or with crops "Here is the original image ... and here
    are some crops to help you see better ..." and one image sequence per crop."""
    from transformers import Gemma3Processor

    layout = SimpleNamespace(full_image_sequence=text)
    crops = {"num_crops": [int(n) for n in media["num_crops"]]}
    return [Gemma3Processor.replace_image_token(layout, crops, i) for i in range(len(crops["num_crops"]))]


def llm_mask(llm, inputs_embeds, attention_mask, position_ids, cache, media_mask):
    """Gemma3Model's masks: causal, plus bidirectional within each run of image soft tokens (full
    layers), the same within the sliding window (sliding layers)."""
    from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                            get_block_sequence_ids_for_mask)

    blocks = get_block_sequence_ids_for_mask(media_mask, device=inputs_embeds.device)
    return create_masks_for_vision_model(config=llm.config.get_text_config(), inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                         block_sequence_ids=blocks)


def _tiny_encoder(h: int) -> dict:  # 56 px: 4x4 patches, pooled 2x2 into mm_tokens_per_image=4
    return dict(model_type="siglip_vision_model", hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                num_attention_heads=2, image_size=2 * tiny.IMAGE_SIZE, patch_size=tiny.PATCH_SIZE)


def _tiny_processor(tokenizer):
    import transformers

    size = 2 * tiny.IMAGE_SIZE
    images = transformers.Gemma3ImageProcessor(size={"height": size, "width": size}, do_pan_and_scan=False)
    return transformers.Gemma3Processor(images, tokenizer, image_seq_length=4)


_TINY = TinySource(
    "Gemma3ForConditionalGeneration", "Gemma3Config", "vision_config", _tiny_encoder, (BOI, EOI, SOFT),
    {"image_token_index": SOFT, "boi_token_index": BOI, "eoi_token_index": EOI}, _tiny_processor,
    seed=7, modality="image", extra_config={"mm_tokens_per_image": 4},
    # a sliding layer whose window (3) is shorter than an image's 4 soft tokens, then a full one
    text_model=("Gemma3TextConfig", "Gemma3ForCausalLM",
                {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3}),
    named_tokens={k: v.format(SOFT) for k, v in NAMED_TOKENS.items()})

FAMILY = Family(
    name="gemma3",
    architectures=("Gemma3ForConditionalGeneration",),
    placeholder_keys=("image_token_index", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.",),
    kind="image",
    pipeline_tag="image-text-to-text",
    encoder=Encoder(features, ("pixel_values",)),
    preprocessor=Preprocessor,
    item_text=f"\n\n{BOI}{{}}{EOI}\n\n",
    item_layout=item_layout,
    prompt_token=BOI,
    llm_mask=llm_mask,
    # Gemma 3 and a fine-tune of it on a new image task (as MedGemma is): two image routes, the
    # second with its own placeholder (both sources call theirs <image_soft_token>)
    tiny={"gemma3": _TINY, "medgemma": dataclasses.replace(_TINY, seed=8, modality="image_med",
                                                           placeholder="<image_med_soft_token>")},
)
