"""Each modality's encoder + connector, rebuilt with the source's own transformers class.

The stored `modalities/<m>/config.json` is the source MLLM's config; its language model is
shrunk to zero layers and a one-row vocabulary (we never run it: the composite's merged LLM
replaces it), and `from_pretrained` loads the stored encoder/connector weights through
transformers' own loading code, legacy or transformers-5 layout. One small adapter per family
turns processor outputs into one feature matrix [tokens, hidden] per media item, exactly as the
source model's forward would before scattering them into its embeddings.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
import transformers

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.runtime import point_cloud

LOG = logging.getLogger(__name__)


def _split_batch(features: torch.Tensor, items: int) -> List[torch.Tensor]:
    return list(features.reshape(items, -1, features.shape[-1]))


def _llava(model, cfg, media):
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


def _video_llava(model, cfg, media):
    if "pixel_values_videos" in media:
        videos = media["pixel_values_videos"]
        out = model.model.get_video_features(pixel_values_videos=videos, vision_feature_layer=cfg.vision_feature_layer)
        return _split_batch(out.pooler_output, videos.shape[0])
    out = model.model.get_image_features(
        pixel_values_images=media["pixel_values_images"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return _split_batch(out.pooler_output, media["pixel_values_images"].shape[0])


def _llava_next_video(model, cfg, media):
    videos = media["pixel_values_videos"]
    out = model.model.get_video_features(
        pixel_values_videos=videos, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = out.pooler_output
    return list(feats) if isinstance(feats, (list, tuple)) else _split_batch(feats, videos.shape[0])


def _qwen2_audio(model, cfg, media):
    """Qwen2-Audio has no get_audio_features: this mirrors its forward's audio branch (transformers 5)."""
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


def _voxtral(model, cfg, media):
    feats = media["input_features"]
    out = model.model.get_audio_features(input_features=feats) if hasattr(model, "model") and hasattr(
        model.model, "get_audio_features") else model.get_audio_features(input_features=feats)
    return _split_batch(out.pooler_output, feats.shape[0])


def _mistral3(model, cfg, media):
    out = model.model.get_image_features(pixel_values=media["pixel_values"], image_sizes=media["image_sizes"],
                                         vision_feature_layer=cfg.vision_feature_layer)
    return list(out.pooler_output)


def _mistral3_grid(cfg, media) -> List[Tuple[int, int]]:
    """Each image's (rows, columns) of merged patches: PixtralProcessor puts `[IMG_BREAK]` after
    each row and `[IMG_END]` after the last, and Mistral3 models were trained on that layout."""
    side = cfg.vision_config.patch_size * cfg.spatial_merge_size
    return [(int(h) // side, int(w) // side) for h, w in media["image_sizes"].tolist()]


#: family -> its items' feature grid (rows, columns), for families whose prompts break rows apart
GRIDS: Dict[str, Callable] = {"mistral3": _mistral3_grid}

#: family name -> (adapter, the media keys it needs, in the names the source's processor gives them)
ADAPTERS: Dict[str, tuple] = {
    "llava": (_llava, ("pixel_values",)),
    "video_llava": (_video_llava, ("pixel_values_videos",)),
    "llava_next_video": (_llava_next_video, ("pixel_values_videos",)),
    "qwen2_audio": (_qwen2_audio, ("input_features", "feature_attention_mask")),
    "voxtral": (_voxtral, ("input_features",)),
    "mistral3": (_mistral3, ("pixel_values", "image_sizes")),
    "point_cloud": (point_cloud.adapter, ("point_clouds",), point_cloud.load_encoder),  # ours: docs/zoo.md
}


class ModalityEncoder:
    """A source's encoder + connector, loaded from `modalities/<m>/`, giving per-item features."""

    def __init__(self, name: str, family: str, directory: str, dtype: Optional[torch.dtype], device):
        if family not in ADAPTERS:
            raise CompositionError(
                f"{directory}: the loader cannot run family {family!r} yet (supported: {', '.join(ADAPTERS)})")
        self.name, self.family = name, family
        self.adapter: Callable = ADAPTERS[family][0]
        self.required = ADAPTERS[family][1]
        if len(ADAPTERS[family]) > 2:  # a family of ours, not a transformers class: its own loader
            self.model, self.config = ADAPTERS[family][2](directory, dtype)
            self.model.to(device)
            return
        cfg = transformers.AutoConfig.from_pretrained(directory)
        text = cfg.get_text_config()
        text.num_hidden_layers, text.vocab_size, text.pad_token_id = 0, 1, None
        cls = getattr(transformers, cfg.architectures[0])
        prev = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # the absent LLM weights are expected
        try:
            self.model = cls.from_pretrained(directory, config=cfg, dtype=dtype)
        except Exception as exc:
            raise CompositionError(f"{directory}: cannot load the {name} encoder ({type(exc).__name__}: {exc})") from None
        finally:
            transformers.utils.logging.set_verbosity(prev)
        self.model.to(device).eval()
        self.config = cfg

    def features(self, media: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        missing = [k for k in self.required if k not in media]
        if missing:
            raise CompositionError(f"modality {self.name!r} needs inputs {missing} (from its processor)")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        media = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in media.items()}
        with torch.no_grad():
            return self.adapter(self.model, self.config, media)

    def grids(self, media: Dict[str, torch.Tensor]) -> Optional[List[Tuple[int, int]]]:
        """Each item's (rows, columns) of features where the family's prompt layout breaks rows; else None."""
        grid = GRIDS.get(self.family)
        return grid(self.config, media) if grid is not None else None
