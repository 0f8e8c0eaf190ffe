"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Checkpoints: transformers 5.24's `save_pretrained` and the released Hub checkpoints (e.g.
Qwen/Qwen2.5-VL-7B-Instruct) hold the legacy layout `model.layers.*` / `model.embed_tokens` /
`model.norm` (the LLM), `visual.*` (vision tower + `visual.merger`, the connector), `lm_head`;
conversions may hold the transformers-5 layout `model.language_model.*` / `model.visual.*`. Both
are read. One class takes images (`image_token_id`, `<|image_pad|>`) and videos (`video_token_id`,
`<|video_pad|>`): as for LLaVA-OneVision, the modality name decides which (`video...`: video).

Prompts: the source's processor and chat template put `<|vision_start|>` + one `<|image_pad|>` per
merged patch + `<|vision_end|>` where an item goes; the generic `<image>` / `<video>` marker becomes
`<|vision_start|>` + the placeholder + `<|vision_end|>` (`item_text`), a prompt written with those
tokens stays as written, and the composite expands the placeholder into the item's features.

The merged LLM: their language model takes 3-D rotary positions (mrope) and transformers has no
causal-LM class for it (`qwen2_vl_text` is not in MODEL_FOR_CAUSAL_LM_MAPPING), so `load_llm`
builds the source class's own text model (`Qwen2VLTextModel` / `Qwen2_5_VLTextModel`) plus an
output head, from the source's text config (`modalities/<m>/config.json`, with the composite's
vocabulary), and loads the composite's root weights into it with transformers' loader. Its
parameters carry the causal-LM names (`model.layers.*`, `lm_head.weight`), so the routed layers and
route deltas fit it unchanged; it is not the conditional-generation class with its tower left out,
whose LLM sits under `model.language_model.` and whose tower would be random-initialised.
`llm_positions` computes the positions exactly as the source does: its own `get_rope_index` over the
expanded sequence, with each item's `image_grid_thw` / `video_grid_thw` and `mm_token_type_ids`
(and Qwen2.5-VL's `second_per_grid_ts` for videos), left padding included; `generate` continues them
as the source's `generate` does (one more per new token: the source's `rope_deltas`).

Media without torchvision: their image processor runs on its PIL backend as stored. Their video
processor (Qwen2VLVideoProcessor) needs torchvision, which the CPU torch builds we target cannot
load: the composite applies its steps (smart resize to the stored `size` / min and max pixels,
rescale, normalise, frames padded to a multiple of `temporal_patch_size` with the last, patches laid
out as it lays them) with the PIL image processor per frame. PIL's and torchvision's bicubic
resampling differ by rounding (docs/runtime.md). Qwen2.5-VL's `second_per_grid_ts` is
`temporal_patch_size / fps` with the 24 fps the source's processor assumes for frames without
metadata (our video readers give none).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import tiny
from mergekit_multimodal.families.base import Encoder, Family, TinySource
from mergekit_multimodal.format.files import read_json
from mergekit_multimodal.runtime.preprocess import _load, quiet

START, END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
#: the special tokens a Qwen2 tokenizer holds (Qwen2-VL's adds the vision ones), in id order
TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
          "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", START, END, "<|vision_pad|>",
          IMAGE_PAD, VIDEO_PAD)
#: mm_token_type_ids of each kind of item (0: text)
TOKEN_TYPE = {"image": 1, "video": 2}
#: fps the source's processor assumes for frames that carry no metadata (VideoMetadata.sampled_fps)
DEFAULT_FPS = 24
#: Qwen2VLVideoProcessor's defaults for the keys its steps read (its class needs torchvision to import)
VIDEO_DEFAULTS = {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "resample": 3,
                  "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True, "do_normalize": True,
                  "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                  "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 14, "temporal_patch_size": 2,
                  "merge_size": 2}
_VIDEO_KEYS = (*VIDEO_DEFAULTS, "min_pixels", "max_pixels")


# -- encoder ---------------------------------------------------------------------------------------

def features(model, cfg, media):
    """As the source's forward: the vision tower + merger on the patches, split per item."""
    if "pixel_values_videos" in media:
        out = model.model.get_video_features(pixel_values_videos=media["pixel_values_videos"],
                                             video_grid_thw=media["video_grid_thw"])
    else:
        out = model.model.get_image_features(pixel_values=media["pixel_values"], image_grid_thw=media["image_grid_thw"])
    return list(out.pooler_output)


# -- processors ------------------------------------------------------------------------------------

class ImagePreprocessor:
    """Images -> `pixel_values` (patches of all images) + `image_grid_thw`, by the stored image processor."""

    def __init__(self, directory: str, num_frames: Optional[int] = None):
        import transformers

        self.processor = _load(transformers.AutoImageProcessor, directory, "image")

    def __call__(self, items: Sequence) -> Dict[str, "object"]:
        from mergekit_multimodal.runtime.media import load_image

        out = quiet(self.processor, images=[load_image(i) for i in items], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


class VideoPreprocessor:
    """Videos -> `pixel_values_videos` + `video_grid_thw` (+ `second_per_grid_ts` for Qwen2.5-VL), by
    Qwen2VLVideoProcessor's steps without torchvision (see the module docstring)."""

    def __init__(self, directory: str, num_frames: Optional[int] = None):
        import transformers

        # as transformers loads a video processor: its own file, else the image processor's
        path = next((os.path.join(directory, n) for n in ("video_preprocessor_config.json", "preprocessor_config.json")
                     if os.path.isfile(os.path.join(directory, n))), None)
        stored = read_json(path) if path else {}
        if stored.get("do_sample_frames") and not num_frames:
            raise CompositionError(f"{path}: do_sample_frames is set; the composite does not sample frames by fps "
                                   f"(its video readers give no fps). Pass num_frames= to CompositeProcessor")
        if stored.get("cap_pixels_per_frame"):
            raise CompositionError(f"{path}: cap_pixels_per_frame is set; the composite's frame steps do not "
                                   f"apply the total-video pixel cap")
        settings = {**VIDEO_DEFAULTS, **{k: stored[k] for k in _VIDEO_KEYS if k in stored}}
        self.temporal = int(settings["temporal_patch_size"])
        self.num_frames = num_frames or stored.get("num_frames")
        # one frame at a time, as an image of temporal size 1 (its patches in the video's spatial order)
        self.processor = quiet(transformers.Qwen2VLImageProcessorPil, **{**settings, "temporal_patch_size": 1})
        config = os.path.join(directory, "config.json")
        model_type = read_json(config).get("model_type") if os.path.isfile(config) else None
        self.seconds = model_type == "qwen2_5_vl"  # Qwen2.5-VL spaces video positions in time

    def __call__(self, items: Sequence) -> Dict[str, "object"]:
        import torch

        from mergekit_multimodal.runtime.media import load_video

        pixels, grids = [], []
        for item in items:
            frames = load_video(item)
            if self.num_frames:  # Qwen2VLVideoProcessor.sample_frames with num_frames
                n = max(self.temporal, round(self.num_frames / self.temporal) * self.temporal)
                if n > len(frames):
                    raise CompositionError(f"video: {n} frames asked, it has {len(frames)}")
                frames = frames[torch.arange(0, len(frames), len(frames) / n).int().numpy()]
            out = quiet(self.processor, images=list(frames), return_tensors="pt")
            grid = out["image_grid_thw"]  # [frames, 3]: 1, h, w each
            f, (_, h, w) = len(frames), grid[0].tolist()
            patches = out["pixel_values"].reshape(f, h * w, -1)
            pad = -f % self.temporal
            if pad:  # the last frame repeated, as the video processor pads
                patches = torch.cat([patches, patches[-1:].expand(pad, -1, -1)])
            t = patches.shape[0] // self.temporal
            # [t, temporal, hw, C, P, P] -> [t, hw, C, temporal, P, P]: each patch's channels, then its frames
            channels = 3
            side = int((patches.shape[-1] // channels) ** 0.5)
            p = patches.reshape(t, self.temporal, h * w, channels, side, side).permute(0, 2, 3, 1, 4, 5)
            pixels.append(p.reshape(t * h * w, -1))
            grids.append([t, h, w])
        media = {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)}
        if self.seconds:
            media["second_per_grid_ts"] = torch.tensor([self.temporal / DEFAULT_FPS] * len(items))
        return media


# -- the merged LLM --------------------------------------------------------------------------------

_CLASSES: Dict[str, type] = {}


def causal_lm_class(model_type: str):
    """The source's text model + output head as a causal LM (transformers has none for it): the
    text model is the source class's own (`Qwen2VLTextModel` ...), so it runs its 3-D positions."""
    if model_type in _CLASSES:
        return _CLASSES[model_type]
    import torch
    import transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {"qwen2_vl": ("Qwen2VLPreTrainedModel", "Qwen2VLTextModel", "Qwen2VLTextConfig"),
             "qwen2_5_vl": ("Qwen2_5_VLPreTrainedModel", "Qwen2_5_VLTextModel", "Qwen2_5_VLTextConfig")}[model_type]
    pretrained, text_model, text_config = (getattr(transformers, n) for n in names)

    class TextForCausalLM(pretrained, transformers.GenerationMixin):
        config_class = text_config  # (no `config:` annotation: it would not resolve here)
        base_model_prefix = "model"
        input_modalities = ("text",)
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.model = text_model(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    labels=None, use_cache=None, logits_to_keep=0, **kwargs):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            hidden = out.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
            # as transformers' causal LMs: the shifted cross-entropy (what trains DAMC sources on it, damc/train.py)
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    TextForCausalLM.__name__ = TextForCausalLM.__qualname__ = f"{text_model.__name__}ForCausalLM"
    _CLASSES[model_type] = TextForCausalLM
    return TextForCausalLM


#: text-config fields that must agree between the sources and with the composite's merged LLM
_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _field(text, key):
    """A text-config field as the text model reads it: a Hub config's legacy `rope_scaling: {type: mrope}`
    leaves `type` beside the `rope_type` transformers derives from it, which the model reads instead."""
    value = getattr(text, key, None)
    if key == "rope_parameters" and isinstance(value, dict) and "rope_type" in value:
        return {k: v for k, v in value.items() if k != "type"}
    return value


def load_llm(path: str, sources: Sequence[str], dtype):
    """The merged LLM at `path` as the sources' text model (mrope) + head: (model, loading info)."""
    import transformers

    composite = read_json(os.path.join(path, "config.json"))
    texts = []
    for d in sources:
        cfg = transformers.AutoConfig.from_pretrained(d)
        text = cfg.get_text_config()
        texts.append((d, cfg.model_type, text))
    (first, model_type, text), rest = texts[0], texts[1:]
    for d, mt, other in rest:
        diff = [k for k in (*_SHAPE, "rope_parameters") if _field(other, k) != _field(text, k)]
        if mt != model_type or diff:
            raise CompositionError(f"{d}/config.json and {first}/config.json: their language models differ "
                                   f"({', '.join(diff) or 'model_type'}); one composite runs one of them")
    merged = composite.get("text_config", composite)
    diff = [k for k in _SHAPE if k in merged and merged[k] != getattr(text, k, None)]
    if diff:
        raise CompositionError(f"{path}/config.json: the merged LLM's {', '.join(diff)} differ from its source's "
                               f"language model ({first}/config.json); the composite does not fit its sources")
    cls = causal_lm_class(model_type)
    config = cls.config_class(**{k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures")})
    config.vocab_size = merged["vocab_size"]
    config.tie_word_embeddings = bool(merged.get("tie_word_embeddings", False))
    return cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                               ignore_mismatched_sizes=True)


def llm_positions(encoders, media, items, attention_mask):
    """The source's 3-D positions of the expanded sequence, by its own `get_rope_index`: `items` are
    (row, start, end, modality, index) of this family's items, `media` their processor outputs.
    Returns (position_ids [3, batch, positions], rope_deltas [batch, 1])."""
    import inspect

    import torch

    from mergekit_multimodal.families import get_family

    model = next(iter(encoders.values())).model.model
    types = torch.zeros_like(attention_mask)
    grids: Dict[str, List] = {"image": [], "video": []}
    seconds = []
    for row, start, end, m, i in sorted(items):  # the order get_rope_index takes them: row by row
        kind = get_family(encoders[m].family, modality=m).kind
        types[row, start:end] = TOKEN_TYPE[kind]
        grids[kind].append(media[m][f"{kind}_grid_thw"][i])
        if kind == "video":
            s = media[m].get("second_per_grid_ts")
            seconds.append(float(s[i]) if s is not None else 1.0)
    kwargs = {}
    if "second_per_grid_ts" in inspect.signature(model.get_rope_index).parameters and seconds:
        kwargs["second_per_grid_ts"] = torch.tensor(seconds)
    stack = {k: torch.stack(v).to(types.device) if v else None for k, v in grids.items()}
    return model.get_rope_index(torch.zeros_like(attention_mask), mm_token_type_ids=types,
                                image_grid_thw=stack["image"], video_grid_thw=stack["video"],
                                attention_mask=attention_mask, **kwargs)


# -- tiny stand-ins ----------------------------------------------------------------------------------

#: head_dim 8 (hidden 16, 2 heads): 4 rotary frequencies, split temporal 2, height 1, width 1
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
#: 56x56 .. 112x112 px: the 40x33 test image is resized to 84x56 (6x4 patches, 3x2 merged)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def _tiny_vision_2(h: int) -> dict:
    return dict(depth=1, embed_dim=h, hidden_size=h, num_heads=2, mlp_ratio=2,
                patch_size=tiny.PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2)


def _tiny_vision_25(h: int) -> dict:  # a window block, then a full one; 2x2 merged patches per window
    return dict(depth=2, hidden_size=h, intermediate_size=2 * h, num_heads=2,
                out_hidden_size=h, patch_size=tiny.PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
                window_size=4 * tiny.PATCH_SIZE, fullatt_block_indexes=[1], tokens_per_second=2)


class _TinyProcessor:
    """The image processor, plus a video processor config (its class needs torchvision)."""

    def save_pretrained(self, d):
        import transformers

        quiet(transformers.Qwen2VLImageProcessorPil, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(d)
        video = {"video_processor_type": "Qwen2VLVideoProcessor",
                 **{k: v for k, v in VIDEO_DEFAULTS.items() if k != "size"},
                 "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}
        with open(os.path.join(d, "video_preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(video, f, indent=2)


_TINY = TinySource(
    "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "vision_config", _tiny_vision_2, TOKENS,
    {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "vision_start_token_id": START,
     "vision_end_token_id": END}, _TinyProcessor, seed=11, modality="image",
    # the base: the source class's own text model (what Qwen2-VL's LLM is), so its tokenizer loads as
    # saved (transformers loads a `qwen2` checkpoint's tokenizer as Qwen2Tokenizer, whatever it holds)
    text_model=("Qwen2VLTextConfig", lambda: causal_lm_class("qwen2_vl"), {"rope_parameters": MROPE}))
_TINY_25 = dataclasses.replace(_TINY, model_class="Qwen2_5_VLForConditionalGeneration",
                               config_class="Qwen2_5_VLConfig", encoder_config=_tiny_vision_25, seed=12,
                               text_model=("Qwen2_5_VLTextConfig", lambda: causal_lm_class("qwen2_5_vl"),
                                           {"rope_parameters": MROPE}))

_IMAGE = Family(
    name="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    placeholder_keys=("image_token_id", "video_token_id"),
    encoder_prefixes=("visual.patch_embed.", "visual.blocks."),
    connector_prefixes=("visual.merger.",),
    # legacy (`model.layers` beside `visual.`) and transformers-5 (`model.language_model.`) layouts
    llm_prefixes=(("model.language_model.", "model."), ("model.embed_tokens.", "model.embed_tokens."),
                  ("model.layers.", "model.layers."), ("model.norm.", "model.norm."), ("lm_head.", "lm_head.")),
    kind="image",
    pipeline_tag="image-text-to-text",
    encoder=Encoder(features, ("pixel_values", "image_grid_thw")),
    preprocessor=ImagePreprocessor,
    item_text=f"{START}{{}}{END}",
    load_llm=load_llm,
    causal_lms={"qwen2_vl_text": lambda: causal_lm_class("qwen2_vl"),
                "qwen2_5_vl_text": lambda: causal_lm_class("qwen2_5_vl")},
    llm_positions=llm_positions,
    tiny={"qwen2_vl": _TINY, "qwen2_5_vl": _TINY_25,
          # a second task fine-tune of the same base (OptMerge's experts): a second image route with its own token
          "qwen2_5_vl_ocr": dataclasses.replace(_TINY_25, seed=13, modality="image_ocr", placeholder="<|image_ocr_pad|>"),
          "qwen2_vl_video": dataclasses.replace(_TINY, seed=14, modality="video")},
)

FAMILY = dataclasses.replace(_IMAGE, variants={"video": dataclasses.replace(
    _IMAGE, kind="video", pipeline_tag="video-text-to-text",
    encoder=Encoder(features, ("pixel_values_videos", "video_grid_thw")), preprocessor=VideoPreprocessor, tiny={})})
