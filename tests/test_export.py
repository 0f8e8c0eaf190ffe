"""mergekit-mm-export: each route as its source class's checkpoint (loaded by plain transformers) and
as a PEFT LoRA adapter (loaded by peft), against the composite's own `route(m)` on the same inputs.

The exported side never imports the package: it is loaded by transformers / peft from the files,
its inputs built by the source's own processor classes from the exported processor files (as in
tests/test_processor.py). Every family's tiny stand-in is covered (families registry).
"""

import inspect
import json
import os

import pytest
import torch
import transformers
from click.testing import CliRunner

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.export import REPORT, export, main
from mergekit_multimodal.families import tiny_sources
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.testing import SOURCE_KINDS, build_tiny_family
from tests.helpers import MODALITY, composite_config, read_dir, read_json
from tests.test_damc import TARGETS, _cfg, sources  # noqa: F401 - `sources` is the DAMC adapters fixture
from tests.test_processor import FIXTURE, KIND, source_inputs, write_media

V0 = 96
#: stand-ins whose family is not a transformers class (its own loader): no checkpoint can hold them
NOT_TRANSFORMERS = {k for k, (fam, _) in tiny_sources().items() if fam.encoder and fam.encoder.load}
_COMPOSITES = {}


def _composite(fam, kinds, tmp_path_factory, method="mmer"):
    """One composite of every stand-in of a fixture (so other modalities' tokens are in its vocabulary)."""
    key = (str(fam.base), tuple(kinds), method)
    if key not in _COMPOSITES:
        _COMPOSITES[key] = compose(composite_config(fam, method, list(kinds)), str(tmp_path_factory.mktemp("c") / "c"))
    return _COMPOSITES[key]


def _family_of(kind, request, tmp_path_factory):
    if kind in FIXTURE:
        fam = request.getfixturevalue(FIXTURE[kind])
        return fam, [k for k in fam.sources]
    return build_tiny_family(tmp_path_factory.mktemp("fam"), (kind,)), [kind]


def _load_exported(d):
    """The exported checkpoint with transformers alone: the class its config.json names."""
    cls = getattr(transformers, read_json(os.path.join(d, "config.json"))["architectures"][0])
    model, info = cls.from_pretrained(d, output_loading_info=True)
    return model.eval(), info


def _expanded(kind, model_cfg, media, n_features, placeholder):
    """The placeholder repeated once per feature, as the source's processor expands it."""
    if model_cfg.model_type == "mistral3":  # PixtralProcessor: [IMG_BREAK] after each row, [IMG_END] last
        h, w = (int(v) for v in media["image_sizes"][0])
        side = model_cfg.vision_config.patch_size * model_cfg.spatial_merge_size
        rows, cols = h // side, w // side
        assert rows * cols == n_features
        out = ([placeholder] * cols + ["[IMG_BREAK]"]) * rows
        out[-1] = "[IMG_END]"
        return out
    return [placeholder] * n_features


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_exported_checkpoint_reproduces_the_route(kind, request, tmp_path, tmp_path_factory):
    fam, kinds = _family_of(kind, request, tmp_path_factory)
    c = _composite(fam, kinds, tmp_path_factory)
    m = MODALITY[kind]
    if kind in NOT_TRANSFORMERS:
        with pytest.raises(CompositionError, match=rf"modality '{m}': its source class .* is not a transformers class, "
                                                   r"so no checkpoint plain transformers loads can hold this route"):
            export(c, str(tmp_path / "e"), m)
        assert not (tmp_path / "e").exists()
        return
    out = export(c, str(tmp_path / "e"), m)
    exported, info = _load_exported(out)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    manifest = read_json(os.path.join(c, "composite_config.json"))
    placeholder = manifest["modalities"][m]["placeholder"]
    assert exported.config.get_text_config().vocab_size == manifest["llm"]["vocab_size"]

    proc = CompositeProcessor.from_pretrained(c)
    model = CompositeModel.from_pretrained(c)
    file, decoded = write_media(KIND[kind], tmp_path)
    spec = tiny_sources()[kind][0]
    # a family that wraps each item in special tokens (Gemma 3) takes the generic marker, which becomes them
    ph = f"<{m}>" if spec.item_text else proc.placeholders[m]
    inputs = proc(f"w1 w2 {ph} w3 w4", media={m: [str(file)]})
    n_features = model.encoders[m].features(inputs["media"][m])[0].shape[0]
    with torch.no_grad(), model.route(m):
        want = model(**inputs).logits
        want_new = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    # the exported side: its own files only (tokenizer, processor config, config.json)
    if spec.prompt_token:  # the family's own processor lays the prompt out (Gemma 3: token types for its mask)
        from PIL import Image

        batch = dict(transformers.AutoProcessor.from_pretrained(out)(
            text=f"w1 w2 {spec.prompt_token} w3 w4", images=[Image.fromarray(decoded)], return_tensors="pt"))
        ids = batch.pop("input_ids")
        media = {k: v for k, v in batch.items() if k != "attention_mask"}
    else:
        media = source_inputs(out, KIND[kind], decoded)
        if KIND[kind] == "video" and exported.config.model_type in ("llava_onevision", "qwen2_vl", "qwen2_5_vl"):
            # their video processors need torchvision: both sides take the composite's frames (whose steps
            # tests/test_llava_onevision.py and tests/test_qwen2_vl.py check against independent computations)
            media = dict(inputs["media"][m])
        tok = transformers.AutoTokenizer.from_pretrained(out)
        item = (spec.item_text or "{}").format(" ".join(_expanded(kind, exported.config, media, n_features, placeholder)))
        ids = tok("w1 w2 " + item + " w3 w4", return_tensors="pt").input_ids
        if "mm_token_type_ids" in inspect.signature(type(exported).forward).parameters:  # Qwen2-VL's 3-D positions
            cfg = exported.config
            media["mm_token_type_ids"] = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    with torch.no_grad():
        got = exported(input_ids=ids, **media).logits
        got_seq = exported.generate(input_ids=ids, **media, max_new_tokens=4, do_sample=False)
    assert got.shape[-1] == want.shape[-1] == manifest["llm"]["vocab_size"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_seq[0, ids.shape[1]:].tolist() == want_new[0].tolist()


@pytest.fixture(scope="module")
def mmer(family, tmp_path_factory):
    return _composite(family, ["llava", "qwen2_audio"], tmp_path_factory)


def test_checkpoint_files_and_card(mmer, tmp_path):
    out = export(mmer, str(tmp_path / "e"), "image", shard_size=20_000)
    files = sorted(os.listdir(out))
    index = read_json(os.path.join(out, "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(f in files for f in shards)
    assert set(index["weight_map"]) == set(read_dir(out))
    for f in ("config.json", "tokenizer.json", "preprocessor_config.json", "README.md", "generation_config.json"):
        assert f in files
    card = open(os.path.join(out, "README.md")).read()
    entries = read_json(os.path.join(mmer, "composite_config.json"))["modalities"]
    for entry in entries.values():  # local paths: named in the body (the Hub's base_model takes Hub ids only)
        assert f"`{entry['source']}`" in card
    cfg = read_json(os.path.join(out, "config.json"))
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["image_token_index"] == entries["image"]["placeholder_id"]
    assert cfg["text_config"]["pad_token_id"] is None  # the source's own <pad> id: not a composite id
    assert "text_config.pad_token_id" in card
    # plain transformers loads it, the package never imported
    import subprocess
    import sys

    code = ("import sys, transformers; m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1]); "
            "assert type(m).__name__ == 'LlavaForConditionalGeneration'; "
            "assert not [k for k in sys.modules if k.startswith('mergekit')]; print('ok')")
    run = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]
    # the LLM is route image's, not the merged LLM (which the composite's root holds)
    name = "model.layers.0.self_attn.q_proj.weight"
    exported, merged = read_dir(out)["model.language_model." + name[len("model."):]], read_dir(mmer)[name]
    assert (exported - merged).abs().max() > 1e-4


def test_card_base_model_names_hub_sources(mmer, tmp_path):
    """A composite whose manifest names Hub ids: they are the exported card's base_model."""
    import shutil

    from huggingface_hub import ModelCard

    c = tmp_path / "c"
    shutil.copytree(mmer, c)
    manifest = read_json(c / "composite_config.json")
    manifest["base_model"] = "org/base-7b"
    manifest["modalities"]["image"]["source"] = "org/llava-7b"
    (c / "composite_config.json").write_text(json.dumps(manifest))
    out = export(str(c), str(tmp_path / "e"), "image")
    assert ModelCard.load(os.path.join(out, "README.md")).data.base_model == ["org/base-7b", "org/llava-7b"]


def test_refusals_name_what_to_fix(mmer, tmp_path):
    with pytest.raises(CompositionError, match=r"c: no modality 'video'; it has image, audio$"):
        export(mmer, str(tmp_path / "e"), "video")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CompositionError, match=r"taken: output already exists; remove it or pass --overwrite$"):
        export(mmer, str(tmp_path / "taken"), "image")
    assert os.listdir(tmp_path / "taken") == []
    with pytest.raises(CompositionError, match=r"route 'image' of this mmer composite is not low-rank \(tensor "
                                               r"'lm_head\.weight'\); a LoRA adapter can only "
                                               r"approximate it: pass --rank R"):
        export(mmer, str(tmp_path / "e"), "image", lora=True)
    with pytest.raises(CompositionError, match=r"^--rank is for --lora"):
        export(mmer, str(tmp_path / "e"), "image", rank=4)
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # nothing half-written, no lock left
    out = export(mmer, str(tmp_path / "taken"), "image", overwrite=True)
    assert "config.json" in os.listdir(out)


def test_refused_overwrite_of_the_composite_itself(mmer):
    with pytest.raises(CompositionError, match="refusing --overwrite: the output is the input directory"):
        export(mmer, mmer, "image", overwrite=True)
    assert os.path.exists(os.path.join(mmer, "composite_config.json"))


def test_cli(mmer, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, [mmer, str(tmp_path / "e"), "--route", "image"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().endswith(str(tmp_path / "e"))
    bad = runner.invoke(main, [mmer, str(tmp_path / "f"), "--route", "nope"])
    assert bad.exit_code == 1
    assert bad.output.strip() == f"error: {mmer}: no modality 'nope'; it has image, audio"
    assert not (tmp_path / "f").exists()


def _peft_logits(composite, adapter, ids):
    """The merged LLM (the composite's root, a plain causal LM) with the adapter, by transformers + peft."""
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(composite)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits


def _route_logits(composite, m, ids):
    model = CompositeModel.from_pretrained(composite, modalities=[])
    with torch.no_grad(), model.route(m):
        return model(ids).logits


IDS = torch.tensor([[1, 5, 17, 33, 60, 7, 90, 12]])


def test_damc_route_as_exact_lora_adapter(family, sources, tmp_path):  # noqa: F811 - the imported fixture
    c = compose(_cfg(family, sources), str(tmp_path / "c"))
    out = export(c, str(tmp_path / "a"), "image", lora=True)
    cfg = read_json(os.path.join(out, "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == c
    assert {t.rsplit(".", 1)[1] for t in cfg["target_modules"]} == set(TARGETS)
    assert read_json(os.path.join(out, REPORT))["exact"] is True
    merged = transformers.AutoModelForCausalLM.from_pretrained(c)
    with torch.no_grad():
        plain = merged(input_ids=IDS).logits
    got, want = _peft_logits(c, out, IDS), _route_logits(c, "image", IDS)
    assert (want - plain).abs().max() > 1e-3  # the route differs from the merged LLM: the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a checkpoint cannot hold DAMC's learned prefix/suffix embeddings
    with pytest.raises(CompositionError, match=r"modality 'image': its items are wrapped in learned prefix/suffix "
                                               r"embeddings \(modalities/image/prefix_suffix\.safetensors\), which "
                                               r"LlavaForConditionalGeneration has no place for"):
        export(c, str(tmp_path / "e"), "image")


def test_mmer_low_rank_adapter_reports_its_error(mmer, tmp_path):
    full = export(mmer, str(tmp_path / "full"), "audio", lora=True, rank=10_000)  # every tensor at full rank
    report = read_json(os.path.join(full, REPORT))
    assert report["exact"] is False and max(report["relative_error"].values()) < 1e-5
    assert report["whole_weights"]  # the norms' route weights, kept whole
    want = _route_logits(mmer, "audio", IDS)
    torch.testing.assert_close(_peft_logits(mmer, full, IDS), want, rtol=1e-4, atol=1e-4)
    assert report["probe"]["relative_error"] < 1e-5

    result = CliRunner().invoke(main, [mmer, str(tmp_path / "low"), "--route", "audio", "--lora", "--rank", "1"])
    assert result.exit_code == 0, result.output
    assert "probe logit relative error" in result.output
    low = read_json(tmp_path / "low" / REPORT)
    assert low["rank"] == 1 and min(low["relative_error"].values()) > 0.01
    err = (_peft_logits(mmer, str(tmp_path / "low"), IDS) - want).norm() / want.norm()
    assert err > 1e-3  # lossy, and says so
