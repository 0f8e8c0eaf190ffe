"""Architectures we cannot compose are refused before anything is read, naming the file and class."""

import json
import shutil

import pytest

from mergekit_multimodal import CompositionError, compose
from tests.helpers import composite_config


def _as_architecture(family, tmp_path, arch):
    src = tmp_path / "src"
    shutil.copytree(family.sources["llava"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    fam = type(family)(base=family.base, sources={"llava": src}, vocab_size=family.vocab_size)
    return composite_config(fam, "mmer", ["llava"]), src


def test_llama_3_2_vision_is_refused_with_the_reason(family, tmp_path):
    config, src = _as_architecture(family, tmp_path, "MllamaForConditionalGeneration")
    with pytest.raises(CompositionError) as err:
        compose(config, str(tmp_path / "out"))
    assert str(err.value) == (
        f"models[0] (image) ({src}/config.json): MllamaForConditionalGeneration cannot be composed: Llama-3.2-Vision "
        "inserts cross-attention layers among its language model's layers (text_config.cross_attention_layers), "
        "so its LLM's layers do not line up with Llama 3.1's and cannot be merged with them tensor by tensor. "
        "Composing it would need a layer map (its self-attention layers onto the base's, its cross-attention "
        "layers kept with its modality) and a runtime that runs those cross-attention layers on the image "
        "states; this version has neither.")
    assert not (tmp_path / "out").exists()
    layout = {"llm_prefix": "language_model.model.", "modality_prefixes": ["vision_model."]}
    config["models"][0]["layout"] = layout
    with pytest.raises(CompositionError, match="MllamaForConditionalGeneration cannot be composed"):
        compose(config, str(tmp_path / "out"))


def test_an_unknown_architecture_names_the_file_and_class(family, tmp_path):
    config, src = _as_architecture(family, tmp_path, "FooForConditionalGeneration")
    with pytest.raises(CompositionError, match=rf"\({src}/config.json\): unknown architecture "
                                               r"'FooForConditionalGeneration'\. Known: .*Gemma3ForConditional"):
        compose(config, str(tmp_path / "out"))


def test_qwen3_vl_is_refused_saying_what_reading_it_needs(family, tmp_path):
    """Qwen2-VL and Qwen2.5-VL are read (tests/test_qwen2_vl.py); Qwen3-VL's DeepStack is not."""
    config, src = _as_architecture(family, tmp_path, "Qwen3VLForConditionalGeneration")
    with pytest.raises(CompositionError, match=rf"\({src}/config.json\): Qwen3VLForConditionalGeneration cannot be "
                                               r"composed: .*DeepStack.*Reading it needs .*deepstack_visual_embeds"):
        compose(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
