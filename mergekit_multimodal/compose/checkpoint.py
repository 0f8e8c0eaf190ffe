"""One input checkpoint, opened lazily through mergekit's loader and split into its parts.

Nothing is read but the safetensors headers until the engine asks for a tensor, and every
failure names the checkpoint and the tensor (mergekit's loader raises bare KeyErrors).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import safetensors
import torch
from mergekit.common import ModelReference
from mergekit.io import LazyTensorLoader, ShardedTensorIndex
from mergekit.options import MergeOptions

from mergekit_multimodal.compose.card import is_hub_id
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import LLM, SplitLayout, layout_for


def resolve_local_path(ref: ModelReference, options: MergeOptions) -> str:
    """A local directory for a model reference: LoRAs merged and Hub ids fetched the way mergekit does."""
    for part, what in ((ref.model, "model"), (ref.lora, "LoRA")):
        if part is not None and not os.path.exists(part.path) and not is_hub_id(part.path):
            raise CompositionError(f"{part.path}: {what} path does not exist (and is not a Hub repo id)")
    try:
        merged = ref.merged(
            cache_dir=options.lora_merge_cache,
            trust_remote_code=options.trust_remote_code,
            lora_merge_dtype=options.lora_merge_dtype,
        )
        path = merged.local_path(cache_dir=options.transformers_cache)
        if ref.lora is not None:
            _carry_side_files(ref.model.path, path)
        return path
    except CompositionError:
        raise
    except Exception as exc:
        raise CompositionError(f"{ref}: cannot open model ({type(exc).__name__}: {exc})") from None


#: files mergekit's LoRA merge does not write but a composite needs (tokenizer, processors)
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "added_tokens.json", "preprocessor_config.json", "processor_config.json",
               "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def _carry_side_files(model_dir: str, merged_dir: str) -> None:
    """Copy tokenizer/processor files from a local model dir into mergekit's merged-LoRA dir."""
    import shutil

    if not os.path.isdir(model_dir):
        return
    for name in _SIDE_FILES:
        src, dst = os.path.join(model_dir, name), os.path.join(merged_dir, name)
        if os.path.exists(src) and not os.path.exists(dst):
            shutil.copy(src, dst)


_INDEXES = ("model.safetensors", "pytorch_model.bin")  # in the order mergekit's ShardedTensorIndex looks


def check_index(path: str) -> None:
    """The shard index mergekit will follow, checked first: valid JSON, a `weight_map` of names to
    files, every file inside the checkpoint directory (never an absolute path or `..`)."""
    for name in _INDEXES:
        weights, index = os.path.join(path, name), os.path.join(path, name + ".index.json")
        if not (os.path.exists(weights) or os.path.exists(index)):
            continue
        if not os.path.exists(index):
            return
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
            raise CompositionError(f"{index}: unreadable shard index ({type(exc).__name__}: {exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CompositionError(f"{index}: no `weight_map` object mapping tensor names to shard files")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CompositionError(f"{index}: tensor {tensor!r} maps to {shard!r}, not a shard file name")
            norm = os.path.normpath(shard)
            if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
                raise CompositionError(f"{index}: tensor {tensor!r} points at {shard!r}, outside the checkpoint "
                                       f"directory {path}; refused")
        return


def _read_shapes(index: ShardedTensorIndex) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes from the shard headers; also catches corrupt and truncated files early."""
    out = {}
    for shard in index.shards:
        path = os.path.join(index.base_path, shard.filename)
        try:
            if index.is_safetensors:
                # safe_open validates the header against the file size (truncation, corruption)
                with safetensors.safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        out[key] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
            else:
                sd = torch.load(path, map_location="meta", weights_only=True, mmap=True)
                out.update({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
        except CompositionError:
            raise
        except Exception as exc:
            raise CompositionError(f"{path}: unreadable checkpoint shard ({type(exc).__name__}: {exc})") from None
    missing = [k for k in index.tensor_paths if k not in out]
    if missing:
        raise CompositionError(
            f"{index.base_path}: the index names tensor {missing[0]!r} (and {len(missing) - 1} more) "
            f"that its shard {index.tensor_paths[missing[0]]} does not hold"
        )
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _st_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES.get(name, torch.float32)


@dataclass
class Checkpoint:
    """A base or source checkpoint: config, layout, and its tensors grouped by part."""

    label: str
    path: str
    config: dict
    layout: SplitLayout
    loader: LazyTensorLoader
    shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
    llm: Dict[str, str] = field(default_factory=dict)  # causal-LM name -> checkpoint name
    parts: Dict[str, List[str]] = field(default_factory=dict)  # part -> checkpoint names

    @classmethod
    def open(cls, label: str, ref: ModelReference, options: MergeOptions, override=None) -> "Checkpoint":
        path = resolve_local_path(ref, options)
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise CompositionError(f"{label} ({ref}): no config.json in {path}") from None
        except UnicodeDecodeError as exc:
            raise CompositionError(f"{cfg_path}: not UTF-8 text ({exc})") from None
        except json.JSONDecodeError as exc:
            raise CompositionError(f"{cfg_path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise CompositionError(f"{cfg_path}: unreadable ({exc.strerror or exc})") from None
        if not isinstance(config, dict):
            raise CompositionError(f"{cfg_path}: expected a JSON object, found a {type(config).__name__}")
        layout = layout_for(config, f"{label} ({cfg_path})", override)
        check_index(path)
        try:
            index = ShardedTensorIndex.from_disk(path)
        except Exception as exc:
            # an unsharded checkpoint's file is opened while indexing: name it
            single = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))]
            where = os.path.join(path, single[0]) if single else path
            raise CompositionError(f"{label}: {where}: no readable weights ({exc})") from None
        shapes = _read_shapes(index)
        ckpt = cls(label, path, config, layout, LazyTensorLoader(index, lazy_unpickle=options.lazy_unpickle), shapes)
        for name in index.tensor_paths:
            part, mapped = layout.classify(name)
            if part == LLM:
                if mapped in ckpt.llm:
                    raise CompositionError(f"{path}: LLM tensor {mapped!r} appears twice ({ckpt.llm[mapped]!r}, {name!r})")
                ckpt.llm[mapped] = name
            else:
                ckpt.parts.setdefault(part, []).append(name)
        if not ckpt.llm:
            raise CompositionError(
                f"{label} ({path}): no language-model tensors found with layout {layout.family.name!r}; "
                "check the checkpoint or give a `layout:` override"
            )
        if ckpt.tied and ckpt.declares_untied():
            raise CompositionError(
                f"{label}: {cfg_path} says tie_word_embeddings: false, but {path} holds no output head "
                "(lm_head) tensor; the input embedding is not taken as the head in its place. Add the head, "
                "or set tie_word_embeddings: true if the model really ties them"
            )
        return ckpt

    def declares_untied(self) -> bool:
        """config.json says the head is separate: `tie_word_embeddings: false` in the text config, or at
        the top level when the text config does not say (transformers reads the text config's)."""
        text = self.config if self.layout.family.text_only else self.config.get("text_config")
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            return text["tie_word_embeddings"] is False
        return self.config.get("tie_word_embeddings") is False

    @property
    def tied(self) -> bool:
        """No separate output head in the checkpoint: the head is the input embedding."""
        return "lm_head.weight" not in self.llm

    def llm_shape(self, name: str) -> Tuple[int, ...]:
        return self.shapes[self.llm[self._head_alias(name)]][0]

    def _head_alias(self, name: str) -> str:
        if name == "lm_head.weight" and self.tied:
            return "model.embed_tokens.weight"
        return name

    def text_config(self) -> dict:
        """The LLM's config: the whole config for a causal LM, else its `text_config`."""
        if self.layout.family.text_only:
            return dict(self.config)
        text = self.config.get("text_config")
        if isinstance(text, dict):
            return dict(text)
        # a legacy config keeps its LLM's fields at the top level (Qwen/Qwen2.5-VL-7B-Instruct on the
        # Hub): its transformers config class builds the text config from them
        import transformers

        fields = {k: v for k, v in self.config.items() if k != "model_type"}
        try:
            cfg = transformers.AutoConfig.for_model(self.config.get("model_type"), **fields)
            text = cfg.get_text_config()
        except Exception:  # noqa: BLE001 - no model_type, an unknown one, bad values
            text = None
        if text is None or text is cfg:
            raise CompositionError(f"{self.path}/config.json: no text_config for the language model")
        return text.to_dict()

    def key(self, name: str) -> str:
        """The checkpoint's own name of an LLM tensor given by its causal-LM name."""
        return self.llm[self._head_alias(name)]

    def get(self, name: str, *, llm: bool = True, check_finite: bool = True) -> torch.Tensor:
        """One tensor (an LLM tensor by its causal-LM name), by default checked to be finite."""
        key = self.key(name) if llm else name
        try:
            t = self.loader.get_tensor(key)
        except Exception as exc:
            raise CompositionError(f"{self.path}: cannot read tensor {key!r} ({type(exc).__name__}: {exc})") from None
        if check_finite:
            self.check_finite(t, key)
        return t

    def check_finite(self, t: torch.Tensor, key: str) -> None:
        # A NaN or inf anywhere makes the sum non-finite, so a finite sum proves the tensor finite at
        # ~1/20 the cost of isfinite(); only a non-finite sum (or an overflowing one) is scanned exactly.
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise CompositionError(f"{self.path}: tensor {key!r} holds NaN or inf values")
