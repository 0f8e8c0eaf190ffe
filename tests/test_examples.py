"""The example YAMLs in examples/ parse, plan and compose, so they cannot rot.

Each Hub id in an example is replaced by a tiny stand-in of the same transformers class and key
layout (mergekit_multimodal.testing); everything else in the YAML is used exactly as written.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from mergekit.options import MergeOptions

from mergekit_multimodal import compose
from mergekit_multimodal.compose.card import is_hub_id
from mergekit_multimodal.compose.config import load_config
from mergekit_multimodal.hub import validate_for_push
from mergekit_multimodal.compose.plan import build_plan

EXAMPLES = Path(__file__).parents[1] / "examples"

#: example -> (family fixture, {Hub id: stand-in kind ("base" or a source kind)}, {modality: placeholder})
STAND_INS = {
    "vicuna-image-video-mmer.yml": ("family", {
        "lmsys/vicuna-7b-v1.5": "base",
        "llava-hf/llava-1.5-7b-hf": "llava",
        "LanguageBind/Video-LLaVA-7B-hf": "video_llava",
        "llava-hf/LLaVA-NeXT-Video-7B-hf": "llava_next_video",
    }, {"image": "<image>", "video": "<video>", "video_next": "<video_next>"}),
    "vicuna-image-video-naive_mc.yml": ("family", {
        "lmsys/vicuna-7b-v1.5": "base",
        "llava-hf/llava-1.5-7b-hf": "llava",
        "LanguageBind/Video-LLaVA-7B-hf": "video_llava",
        "llava-hf/LLaVA-NeXT-Video-7B-hf": "llava_next_video",
    }, {"image": "<image>", "video": "<video>", "video_next": "<video_next>"}),
    "mistral-small-image-audio-mmer.yml": ("mistral_family", {
        "mistralai/Mistral-Small-3.1-24B-Base-2503": "base",
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503": "mistral3",
        "mistralai/Voxtral-Small-24B-2507": "voxtral",
    }, {"image": "[IMG]", "audio": "[AUDIO]"}),
    "gemma3-image-medical-mmer.yml": ("gemma_family", {
        "google/gemma-3-4b-pt": "base",
        "google/gemma-3-4b-it": "gemma3",
        "google/medgemma-4b-it": "medgemma",
    }, {"image": "<image_soft_token>", "image_med": "<image_med_soft_token>"}),
    "qwen2-image-video-onevision-mmer.yml": ("onevision_family", {
        "Qwen/Qwen2-7B-Instruct": "base",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava_onevision",
        "llava-hf/LLaVA-Video-7B-Qwen2-hf": "llava_video",
    }, {"image": "<image>", "video": "<video>"}),
    "qwen2.5-vl-task-routes-mmer.yml": ("qwen25_vl_family", {
        "Qwen/Qwen2.5-VL-7B-Instruct": "base",
        "ByteDance-Seed/UI-TARS-1.5-7B": "qwen2_5_vl",
        "allenai/olmOCR-7B-0725": "qwen2_5_vl_ocr",
    }, {"image": "<|image_pad|>", "image_ocr": "<|image_ocr_pad|>"}),
}


def with_stand_ins(text: str, ids: dict, fam) -> str:
    """The YAML text with each Hub id (as a whole word) replaced by its stand-in's local path."""
    for hub_id, kind in ids.items():
        path = fam.base if kind == "base" else fam.sources[kind]
        text = re.sub(rf"(?<![\w./-]){re.escape(hub_id)}(?![\w./-])", str(path), text)
    return text


def load_example(name, request):
    """(the YAML text with stand-ins, its parsed config)."""
    fixture, ids, _ = STAND_INS[name]
    text = with_stand_ins((EXAMPLES / name).read_text(), ids, request.getfixturevalue(fixture))
    return text, load_config(yaml.safe_load(text), name)


def test_every_example_has_stand_ins():
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == sorted(STAND_INS)


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_example_names_exactly_the_hub_ids_it_is_tested_with(name):
    """Every model the YAML names is a Hub id with a stand-in (no stray local paths, no untested ids)."""
    data = yaml.safe_load((EXAMPLES / name).read_text())
    refs = [data["base_model"]] + [m["model"] for m in data["models"]]
    assert all(is_hub_id(r) for r in refs), refs
    assert set(refs) == set(STAND_INS[name][1])


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_example_plans_against_stand_ins(name, request):
    _, config = load_example(name, request)
    plan = build_plan(config, MergeOptions(quiet=True))
    placeholders = STAND_INS[name][2]
    assert plan.modalities == list(placeholders)
    assert {m: plan.vocab.placeholders[m].token for m in plan.modalities} == placeholders
    assert plan.method.name == config.merge_method and plan.jobs


def test_vicuna_mmer_example_composes(request, tmp_path):
    name = "vicuna-image-video-mmer.yml"
    text, config = load_example(name, request)
    out = Path(compose(config, str(tmp_path / "vicuna-mm"), MergeOptions(quiet=True, out_shard_size=20000),
                       config_source=text))
    cfg = json.loads((out / "composite_config.json").read_text())
    assert list(cfg["modalities"]) == ["image", "video", "video_next"] and cfg["routes"]["kind"] == "mmer"
    assert cfg["modalities"]["video_next"]["placeholder"] == "<video_next>"
    assert cfg["parameters"]["election"] == "max" and cfg["merge_method"] == "mmer"
    assert (out / "mergekit_config.yml").read_text() == text  # the example as written, comments too
    assert "# Shared base" in text and "lmsys/vicuna-7b-v1.5" not in text.split("base_model:")[1].split("\n")[0]
    assert "mergekit_config.yml" in validate_for_push(str(out))  # complete: ready to push
