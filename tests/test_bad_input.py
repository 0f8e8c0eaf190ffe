"""Bad input: a clear error naming the file/tensor/key, a non-zero exit, and no output directory."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.cli import main as mergekit_mm_yaml
from tests.helpers import composite_config, read_dir

KINDS = ["llava", "qwen2_audio"]


def copy_source(family, kind, tmp_path) -> Path:
    dst = tmp_path / f"{kind}-copy"
    shutil.copytree(family.sources[kind], dst)
    return dst


def config_with(family, kind, path, **extra):
    cfg = composite_config(family, "mmer", KINDS, **extra)
    for m in cfg["models"]:
        if m["model"] == str(family.sources[kind]):
            m["model"] = str(path)
    return cfg


def assert_fails_cleanly(cfg, tmp_path, *needles):
    """Through the CLI: exit code 2, every needle in the message, nothing left next to OUT."""
    cfg_path = tmp_path / "bad.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    r = CliRunner().invoke(mergekit_mm_yaml, [str(cfg_path), str(out), "--quiet"])
    assert r.exit_code == 2, r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before, "no partial directory is left behind"
    return r.output


def rewrite(path: Path, fn):
    sd = read_dir(path)
    fn(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_llm_shape_differs_from_base(family, tmp_path):
    src = copy_source(family, "llava", tmp_path)
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    rewrite(src, lambda sd: sd.__setitem__(name, torch.zeros(7, 16)))
    assert_fails_cleanly(config_with(family, "llava", src), tmp_path, name, str(src), "shape")


def test_missing_llm_tensor(family, tmp_path):
    src = copy_source(family, "qwen2_audio", tmp_path)
    rewrite(src, lambda sd: sd.pop("language_model.model.layers.1.self_attn.k_proj.weight"))
    assert_fails_cleanly(config_with(family, "qwen2_audio", src), tmp_path,
                         "model.layers.1.self_attn.k_proj.weight", "missing", str(src))


def test_unknown_architecture_without_override_then_with_override(family, tmp_path):
    src = copy_source(family, "llava", tmp_path)
    cfg_file = src / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["FancyVLMForConditionalGeneration"]
    cfg_file.write_text(json.dumps(cfg))
    bad = config_with(family, "llava", src)
    assert_fails_cleanly(bad, tmp_path, "FancyVLMForConditionalGeneration", str(cfg_file), "layout")
    for m in bad["models"]:
        if m["model"] == str(src):
            m["layout"] = {"llm_prefix": "language_model.model.", "lm_head": "language_model.lm_head.weight",
                           "modality_prefixes": ["vision_tower.", "multi_modal_projector."],
                           "placeholder_config_key": "image_token_index"}
    out = compose(bad, str(tmp_path / "ok"))
    assert set(read_dir(Path(out) / "modalities" / "image")) == {
        n for n in read_dir(src) if not n.startswith("language_model.")}
    # the loader runs its LLM (a layout override has no family file, so no encoder to load)
    from mergekit_multimodal.runtime import CompositeModel

    model = CompositeModel.from_pretrained(out, modalities=[])
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.llm(input_ids=ids).logits)


def test_two_sources_with_one_modality(family, tmp_path):
    cfg = composite_config(family, "mmer", KINDS)
    cfg["models"][1]["modality"] = cfg["models"][0]["modality"]
    assert_fails_cleanly(cfg, tmp_path, "modality 'image' is brought by two sources")


def test_two_sources_with_one_placeholder(family, tmp_path):
    cfg = composite_config(family, "mmer", ["video_llava", "llava_next_video"])
    for m in cfg["models"]:
        m.pop("placeholder", None)
    assert_fails_cleanly(cfg, tmp_path, "'<video>'", "placeholder:")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_or_truncated_safetensors(family, tmp_path, damage):
    src = copy_source(family, "qwen2_audio", tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[17:])
    assert_fails_cleanly(config_with(family, "qwen2_audio", src), tmp_path, str(f))


def test_nan_weights(family, tmp_path):
    src = copy_source(family, "llava", tmp_path)
    name = "language_model.model.layers.1.self_attn.o_proj.weight"

    def poison(sd):
        sd[name] = sd[name].clone()
        sd[name][0, 0] = math.nan

    rewrite(src, poison)
    assert_fails_cleanly(config_with(family, "llava", src), tmp_path, name, "NaN")


def test_unknown_key_and_bad_value_name_the_key(family, tmp_path):
    cfg = composite_config(family, "mmer", KINDS)
    cfg["models"][0]["modalty"] = "image"
    assert_fails_cleanly(cfg, tmp_path, "models.0.modalty", "Extra inputs")
    cfg = composite_config(family, "mmer", KINDS, parameters={"mask": "l2"})
    assert_fails_cleanly(cfg, tmp_path, "mask", "l2")
    cfg = composite_config(family, "mmer", KINDS, parameters={"lamda": 1.0})
    assert_fails_cleanly(cfg, tmp_path, "lamda", "lambda")
    cfg = composite_config(family, "no_such_method", KINDS)
    assert_fails_cleanly(cfg, tmp_path, "merge_method", "no_such_method")


def test_damc_without_adapters_fails_cleanly(family, tmp_path):
    assert_fails_cleanly(composite_config(family, "damc", KINDS), tmp_path, "damc", "adapters")


def test_existing_output_is_refused_then_replaced_with_overwrite(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CompositionError, match="already exists"):
        compose(composite_config(family, "mmer", KINDS), str(out))
    assert (out / "keep.txt").exists()
    compose(composite_config(family, "mmer", KINDS), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "composite_config.json").exists()


def test_failure_mid_merge_leaves_nothing(family, tmp_path):
    """A NaN in the last LLM tensor is only seen late: the partial output must still vanish."""
    src = copy_source(family, "qwen2_audio", tmp_path)

    def poison(sd):
        sd["language_model.lm_head.weight"] = sd["language_model.lm_head.weight"].clone()
        sd["language_model.lm_head.weight"][-1, -1] = math.inf

    rewrite(src, poison)
    with pytest.raises(CompositionError, match="lm_head"):
        compose(config_with(family, "qwen2_audio", src), str(tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


def test_installed_entry_point_exits_nonzero(family, tmp_path):
    cfg_path = tmp_path / "bad.yml"
    cfg_path.write_text("merge_method: mmer\nbase_model: " + str(family.base) + "\nmodels: []\n")
    r = subprocess.run([str(Path(sys.executable).parent / "mergekit-mm-yaml"), str(cfg_path), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "models" in r.stderr and not (tmp_path / "o").exists()
