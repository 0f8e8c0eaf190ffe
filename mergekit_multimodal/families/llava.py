"""LLaVA-1.5 and LLaVA-NeXT (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`)."""

from __future__ import annotations

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.runtime.preprocess import ImagePreprocessor


def features(model, cfg, media):
    if cfg.model_type == "llava_next":  # anyres: tiles + base view, packed with image_newline, per image
        if "image_sizes" not in media:
            raise CompositionError("LLaVA-NeXT images need `image_sizes` (its image processor gives them)")
        feats = model.model.get_image_features(
            pixel_values=media["pixel_values"], image_sizes=media["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
        if not isinstance(feats, (list, tuple)) or len(feats) != media["pixel_values"].shape[0]:
            raise CompositionError(f"unexpected LLaVA-NeXT image features ({type(feats).__name__}) from this "
                                   f"transformers version; expected one tensor per image")
        return list(feats)
    out = model.model.get_image_features(
        pixel_values=media["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_sizes=media.get("image_sizes"))
    return list(out.pooler_output)


def _llava_next_processor():  # anyres: a base view plus up to 2x2 tiles of 28 px
    import transformers

    size = tiny.IMAGE_SIZE
    return transformers.LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     image_grid_pinpoints=tiny.GRID)


FAMILY = Family(
    name="llava",
    architectures=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
    placeholder_keys=("image_token_index", "image_token_id"),
    encoder_prefixes=("vision_tower.",),
    connector_prefixes=("multi_modal_projector.", "image_newline"),
    kind="image",
    pipeline_tag="image-text-to-text",
    encoder=Encoder(features, ("pixel_values",)),
    preprocessor=ImagePreprocessor,
    # ModelCompose's mlp2x_gelu projector (Sequential: Linear, GELU, Linear) onto LLaVA's connector
    modelcompose_projector={"0.weight": "multi_modal_projector.linear_1.weight",
                            "0.bias": "multi_modal_projector.linear_1.bias",
                            "2.weight": "multi_modal_projector.linear_2.weight",
                            "2.bias": "multi_modal_projector.linear_2.bias"},
    tiny={
        "llava": TinySource("LlavaForConditionalGeneration", "LlavaConfig", "vision_config", tiny.clip,
                            ("<image>", "<pad>"), {"image_token_index": "<image>"}, tiny.clip_processor,
                            seed=0, modality="image", pad_token="<pad>", vocab_multiple=8, in_example=True),
        "llava_next": TinySource("LlavaNextForConditionalGeneration", "LlavaNextConfig", "vision_config", tiny.clip,
                                 ("<image>",), {"image_token_index": "<image>"}, _llava_next_processor,
                                 seed=6, modality="image", extra_config={"image_grid_pinpoints": tiny.GRID}),
    },
)
