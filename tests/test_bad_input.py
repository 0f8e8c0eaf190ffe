"""Bad input: a clear error naming the file/tensor/key, a non-zero exit, and no output directory."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
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


def test_a_tokenizer_that_does_not_fit_its_embedding_is_named(family, tmp_path):
    """The base's tokenizer holding ids past its embedding's rows (another model's tokenizer), or a
    source's placeholder id outside its embedding: refused before anything is written."""
    base = tmp_path / "base"
    shutil.copytree(family.base, base)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # LLaVA's: the base's 96 ids + <image>, <pad>
        shutil.copy(family.sources["llava"] / f, base / f)
    cfg = composite_config(family, "mmer", KINDS)
    cfg["base_model"] = str(base)
    assert_fails_cleanly(cfg, tmp_path, f"base ({base})", "tokenizer.json", "2 id(s) >= 96 (up to 97)",
                         "model.embed_tokens.weight has 96 rows")
    src = copy_source(family, "llava", tmp_path)
    conf = json.loads((src / "config.json").read_text())
    conf["image_token_index"] = 500
    (src / "config.json").write_text(json.dumps(conf))
    assert_fails_cleanly(config_with(family, "llava", src), tmp_path, str(src / "config.json"),
                         "image_token_index = 500", "outside its model.embed_tokens.weight's 104 rows")


def test_a_placeholder_in_unnamed_padding_rows(family, tmp_path):
    """A source whose placeholder id is one of its vocabulary's unnamed padding rows (LLaVA pads 98
    named ids to 104 rows): the composite names it after the modality (`<image_b>`), its row copied
    from that source row; where that name is taken (LLaVA's own `<image>`), an error asks for
    `placeholder:`, and an explicit one is used as given."""
    src = copy_source(family, "llava", tmp_path)
    conf = json.loads((src / "config.json").read_text())
    conf["image_token_index"] = 100
    (src / "config.json").write_text(json.dumps(conf))
    assert_fails_cleanly(config_with(family, "llava", src), tmp_path, "placeholder id 100", "unnamed padding row",
                         "'<image>' already names id 96", "placeholder:")
    for modality, placeholder in (("image_b", None), ("image", "<picture>")):
        cfg = {"merge_method": "mmer", "base_model": str(family.base), "dtype": "float32",
               "models": [{"model": str(src), "modality": modality, **({"placeholder": placeholder} if placeholder else {})}]}
        out = compose(cfg, str(tmp_path / modality))
        entry = json.loads((Path(out) / "composite_config.json").read_text())["modalities"][modality]
        assert entry["placeholder"] == (placeholder or "<image_b>")
        assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(entry["placeholder"]) == \
            entry["placeholder_id"]
        row = read_dir(out)["model.embed_tokens.weight"][entry["placeholder_id"]]
        torch.testing.assert_close(row, read_dir(src)["language_model.model.embed_tokens.weight"][100])


def padded_base(family, tmp_path, rows=104) -> Path:
    """The tiny base with its embedding and head padded past its tokenizer's 96 ids (as Qwen2's are)."""
    base = tmp_path / "padded-base"
    shutil.copytree(family.base, base)

    def pad(sd):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], torch.zeros(rows - sd[k].shape[0], sd[k].shape[1])])

    rewrite(base, pad)
    conf = json.loads((base / "config.json").read_text())
    conf["vocab_size"] = rows
    (base / "config.json").write_text(json.dumps(conf))
    return base


def test_a_placeholder_in_the_bases_unnamed_rows_is_named_there(family, tmp_path):
    """A base whose embedding is padded past its tokenizer (Qwen2: 151646 ids named of 152064 rows) and a
    source whose placeholder is one of those rows (LLaVA-OneVision's <image> at 151646): the composite's
    tokenizer names that row as the source does, and the processor's placeholder is that id."""
    from mergekit_multimodal.runtime import CompositeProcessor

    base = padded_base(family, tmp_path)
    cfg = {"merge_method": "mmer", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(family.sources["llava"]), "modality": "image"}]}
    out = compose(cfg, str(tmp_path / "c"))
    proc = CompositeProcessor.from_pretrained(out)
    assert proc.placeholders["image"] == "<image>" and proc.placeholder_ids["image"] == 96
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == 96 and len(proc.tokenizer) == 97


@pytest.mark.parametrize("method", ["mmer", "naive_mc", "damc"])
def test_a_token_added_on_a_padded_base_takes_its_next_unnamed_row(family, request, tmp_path, method):
    """The same padded base with `placeholder: <picture>` (a token the composite adds): the composite's
    tokenizer gives it the next id after those it names (96), one of the base's unnamed rows, which holds
    the source's placeholder row on every route; padding to a multiple of 64 pads past the base's rows."""
    from mergekit_multimodal.methods.routes import iter_route
    from tests import reference

    base = padded_base(family, tmp_path)
    ids, merged_rows, rows = reference.composite_vocabulary(96, 104, 1, pad_to=64)
    model = {"model": str(family.sources["llava"]), "modality": "image", "placeholder": "<picture>",
             **({"adapters": request.getfixturevalue("sources")["image"]} if method == "damc" else {})}
    out = compose({"merge_method": method, "base_model": str(base), "dtype": "float32", "models": [model],
                   "pad_vocab_to_multiple_of": 64}, str(tmp_path / "c"))
    manifest = json.loads((Path(out) / "composite_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<picture>") == ids[0] == manifest["modalities"]["image"]["placeholder_id"] == 96
    assert manifest["added_tokens"] == [{"token": "<picture>", "id": 96, "from": "image"}]
    assert manifest["llm"]["vocab_size"] == rows == 128
    merged, src, b = read_dir(out), read_dir(family.sources["llava"]), read_dir(base)
    for name, key in (("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                      ("lm_head.weight", "language_model.lm_head.weight")):
        assert merged[name].shape[0] == 128 and not merged[name][104:].any()
        if method == "naive_mc":  # one source: the merge is that source, on the rows merged
            assert torch.equal(merged[name][merged_rows], src[key][merged_rows])
        elif method == "damc":  # no adapter on vocabulary rows: the base's own
            assert torch.equal(merged[name][merged_rows], b[name][merged_rows])
        assert torch.equal(merged[name][96], src[key][96]), (method, name)
        assert torch.equal(dict(iter_route(out, "image"))[name][96], src[key][96]), (method, name)
