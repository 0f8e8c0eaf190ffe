"""Mistral-Small-3.1 vision (`Mistral3ForConditionalGeneration`): Pixtral tower + patch-merger projector.

Its images are laid out as PixtralProcessor lays them out: `[IMG_BREAK]` after each row of merged
patches and `[IMG_END]` after the last (the `grid` below gives the rows and columns).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import ImagePreprocessor


def features(model, cfg, media):
    out = model.model.get_image_features(pixel_values=media["pixel_values"], image_sizes=media["image_sizes"],
                                         vision_feature_layer=cfg.vision_feature_layer)
    return list(out.pooler_output)


def grid(cfg, media) -> List[Tuple[int, int]]:
    """Each image's (rows, columns) of merged patches: PixtralProcessor puts `[IMG_BREAK]` after
    each row and `[IMG_END]` after the last, and Mistral3 models were trained on that layout."""
    side = cfg.vision_config.patch_size * cfg.spatial_merge_size
    return [(int(h) // side, int(w) // side) for h, w in media["image_sizes"].tolist()]


def preprocessor(directory: str, num_frames: Optional[int] = None) -> ImagePreprocessor:
    """As PixtralProcessor does: image sizes rounded to whole merged patches."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(directory)
    side = cfg.vision_config.patch_size * cfg.spatial_merge_size
    return ImagePreprocessor(directory, extra_kwargs={"patch_size": {"height": side, "width": side}})


def _tiny_encoder(h: int) -> dict:  # 56 px: 4x4 patches -> 2x2 merged tokens (1 merged token trips a squeeze)
    return dict(model_type="pixtral", hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                num_attention_heads=2, head_dim=h // 2, image_size=2 * tiny.IMAGE_SIZE, patch_size=tiny.PATCH_SIZE)


def _tiny_processor():
    import transformers

    return transformers.PixtralImageProcessor(size={"longest_edge": 2 * tiny.IMAGE_SIZE}, patch_size=tiny.PATCH_SIZE)


FAMILY = Family(
    name="mistral3",
    architectures=("Mistral3ForConditionalGeneration",),
    placeholder_keys=("image_token_index", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.",),
    kind="image",
    pipeline_tag="image-text-to-text",
    encoder=Encoder(features, ("pixel_values", "image_sizes"), grid=grid),
    preprocessor=preprocessor,
    tiny={"mistral3": TinySource(
        "Mistral3ForConditionalGeneration", "Mistral3Config", "vision_config", _tiny_encoder,
        ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), {"image_token_index": "[IMG]"}, _tiny_processor,
        seed=4, modality="image")},
)
