"""mergekit-mm-export: each route as its source class's checkpoint (loaded by plain transformers) and
as a PEFT LoRA adapter (loaded by peft), against the composite's own `route(m)` on the same inputs.

The exported side never imports the package: it is loaded by transformers / peft from the files,
its inputs built by the source's own processor classes from the exported processor files (as in
tests/test_processor.py). Every family's tiny stand-in is covered (families registry).
"""

import inspect
import json
import os
import re

import pytest
import torch
import transformers
from click.testing import CliRunner

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.export import REPORT, export, main
from mergekit_multimodal.families import tiny_sources
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.testing import SOURCE_KINDS, build_tiny_family
from tests.helpers import MODALITY, PLACEHOLDER_OVERRIDE, composite_config, read_dir, read_json
from tests.test_damc import TARGETS, _cfg
from tests.test_processor import FIXTURE, KIND, PLACEHOLDER, source_inputs, write_media

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
    # the source's own vocabulary: its tokenizer's tokens at its ids, its vocabulary size (padding too)
    own_tok = transformers.AutoTokenizer.from_pretrained(fam.sources[kind])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == own_tok.get_vocab()
    own_cfg = transformers.AutoConfig.from_pretrained(fam.sources[kind])
    assert exported.config.get_text_config().vocab_size == own_cfg.get_text_config().vocab_size
    placeholder = PLACEHOLDER[kind]  # the source's own name for it, whatever the composite calls it

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
        item = (spec.item_text or "{}").format(" ".join(_expanded(kind, exported.config, media, n_features, placeholder)))
        ids = tok("w1 w2 " + item + " w3 w4", return_tensors="pt").input_ids
        if "mm_token_type_ids" in inspect.signature(type(exported).forward).parameters:  # Qwen2-VL's 3-D positions
            cfg = exported.config
            media["mm_token_type_ids"] = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    with torch.no_grad():
        got = exported(input_ids=ids, **media).logits
        got_seq = exported.generate(input_ids=ids, **media, max_new_tokens=4, do_sample=False)
    # exported id -> composite id, by token: the same token (the placeholder: the composite's placeholder of m)
    composite_ids = proc.tokenizer.get_vocab()
    named = {i: t for t, i in own_tok.get_vocab().items() if i < got.shape[-1]}
    to_composite = {i: manifest["modalities"][m]["placeholder_id"] if t == placeholder else composite_ids[t]
                    for i, t in named.items()}
    assert sorted(to_composite) == list(range(len(to_composite)))  # every named row, base ids the same
    assert all(to_composite[i] == i for i in range(V0))
    mine = sorted(to_composite)
    theirs = [to_composite[i] for i in mine]
    assert got.shape[:-1] == want.shape[:-1]
    torch.testing.assert_close(got[..., mine], want[..., theirs], rtol=1e-5, atol=1e-5)
    padding = list(range(len(to_composite), got.shape[-1]))  # rows no token names (LLaVA-1.5 pads to 8)
    assert bool(padding) == (own_cfg.get_text_config().vocab_size > len(own_tok))
    if padding:  # each the mean of the named rows: its logit is their mean
        torch.testing.assert_close(got[..., padding], got[..., mine].mean(-1, keepdim=True).expand_as(got[..., padding]),
                                   rtol=1e-5, atol=1e-5)
    # greedy: the route's, among the tokens the source has (another source's added token is not one of them)
    others = sorted(set(range(want.shape[-1])) - set(theirs))
    with torch.no_grad(), model.route(m):
        want_new = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=others or None)
    assert [to_composite[i] for i in got_seq[0, ids.shape[1]:].tolist()] == want_new[0].tolist()


@pytest.fixture(scope="module")
def mmer(family, tmp_path_factory):
    return _composite(family, ["llava", "qwen2_audio"], tmp_path_factory)


def test_checkpoint_files_and_card(mmer, family, tmp_path):
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
    # the source's own ids: <image> 96, <pad> 97 (pad_token_id restored), rows padded to 104 as LLaVA-1.5 pads
    own = read_json(os.path.join(family.sources["llava"], "config.json"))
    assert (cfg["image_token_index"], cfg["text_config"]["pad_token_id"], cfg["text_config"]["vocab_size"]) == (
        own["image_token_index"], own["text_config"]["pad_token_id"], own["text_config"]["vocab_size"]) == (96, 97, 104)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token, tok.pad_token_id, tok.convert_ids_to_tokens(96)) == ("<pad>", 97, "<image>")
    # <pad>'s rows: the source's own (the composite carried them, route image leaves them as they are)
    tensors, source = read_dir(out), read_dir(family.sources["llava"])
    for mine, theirs in (("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                         ("lm_head.weight", "language_model.lm_head.weight")):
        torch.testing.assert_close(tensors[mine][97], source[theirs][97], rtol=0, atol=0)
        torch.testing.assert_close(tensors[mine][98:], tensors[mine][:98].mean(0).expand(6, -1))  # padding: the mean
    assert "ids 98-103: padding rows no token names" in card
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
    assert read_json(os.path.join(out, REPORT))["vllm"]["rejected"] == []  # linears only: vLLM's forms
    assert_vllm_takes(out, read_json(os.path.join(c, "config.json"))["vocab_size"])
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


def test_rows_another_source_brought_are_declared(family, tmp_path_factory, tmp_path):
    """Video-LLaVA's <image> (its image tower's placeholder): the composite keeps one <image> row, the
    LLaVA source's (first), so the exported video route holds that row and its card says so."""
    c = _composite(family, ["llava", "video_llava"], tmp_path_factory)
    out = export(c, str(tmp_path / "e"), "video")
    cfg, own = read_json(os.path.join(out, "config.json")), read_json(os.path.join(family.sources["video_llava"], "config.json"))
    assert (cfg["image_token_index"], cfg["video_token_index"]) == (own["image_token_index"], own["video_token_index"])
    head = read_dir(out)["lm_head.weight"]
    torch.testing.assert_close(head[own["image_token_index"]], read_dir(family.sources["llava"])["language_model.lm_head.weight"][96],
                               rtol=0, atol=0)
    card = open(os.path.join(out, "README.md")).read()
    assert "`<image>`: the composite keeps one row per token and took this one from modality `image`'s source" in card
    assert "`<video>` (id 97): the composite's row 98, moved to the source's id" in card


def test_refused_without_the_source_tokenizer(mmer, tmp_path):
    """A composite written before sources' tokenizers were stored: the source's vocabulary is unknown."""
    import shutil

    c = tmp_path / "c"
    shutil.copytree(mmer, c)
    for f in os.listdir(c / "modalities" / "image"):
        if f.startswith("tokenizer"):
            os.remove(c / "modalities" / "image" / f)
    with pytest.raises(CompositionError, match=r"modality 'image': .*modalities/image holds no tokenizer of the source "
                                               r"\(composed by an earlier version, or the source ships none\)"):
        export(str(c), str(tmp_path / "e"), "image")
    assert not (tmp_path / "e").exists()


def _image_prompt(composite, exported_dir, tmp_path):
    """One LLaVA image prompt both ways: the composite's processor, and the exported files' own."""
    proc = CompositeProcessor.from_pretrained(composite)
    file, decoded = write_media("image", tmp_path)
    inputs = proc("w1 w2 <image> w3 w4", media={"image": [str(file)]})
    media = source_inputs(exported_dir, "image", decoded)
    n = CompositeModel.from_pretrained(composite).encoders["image"].features(inputs["media"]["image"])[0].shape[0]
    ids = transformers.AutoTokenizer.from_pretrained(exported_dir)("w1 w2 " + " ".join(["<image>"] * n) + " w3 w4",
                                                                   return_tensors="pt").input_ids
    return inputs, ids, media


def _base_with_adapter(out, ids, media):
    """OUT/base (its class) with OUT/lora applied by PEFT, on its own inputs; and the base alone."""
    from peft import PeftModel

    cls = getattr(transformers, read_json(os.path.join(out, "base", "config.json"))["architectures"][0])
    base, info = cls.from_pretrained(os.path.join(out, "base"), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    with torch.no_grad():
        plain = base.eval()(input_ids=ids, **media).logits
        got = PeftModel.from_pretrained(base, os.path.join(out, "lora")).eval()(input_ids=ids, **media).logits
    return got, plain


def _route_of(composite, m, inputs):
    model = CompositeModel.from_pretrained(composite)
    with torch.no_grad(), model.route(m):
        return model(**inputs).logits


def test_damc_base_and_adapter_reproduce_the_route(family, sources, tmp_path):  # noqa: F811 - the imported fixture
    """`--lora --base`: LLaVA's class holding the merged LLM, plus the exact DAMC adapter laid out for
    that class, loaded by transformers + PEFT, is route image on the same image prompt."""
    import shutil

    c = compose(_cfg(family, sources), str(tmp_path / "c"))
    # a source that learned no prefix/suffix (none of the class's places holds them)
    manifest = read_json(os.path.join(c, "composite_config.json"))
    os.remove(os.path.join(c, manifest["modalities"]["image"].pop("prefix_suffix")))
    with open(os.path.join(c, "composite_config.json"), "w") as f:
        json.dump(manifest, f)
    out = export(c, str(tmp_path / "e"), "image", lora=True, base=True)
    assert sorted(os.listdir(out)) == ["base", "lora"]
    cfg = read_json(os.path.join(out, "lora", "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == os.path.join(out, "base")
    assert all(t.startswith("model.language_model.layers.") for t in cfg["target_modules"])
    assert read_json(os.path.join(out, "lora", REPORT))["exact"] is True
    # the base's LLM is the merged one (the composite's root), not the route
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(read_dir(os.path.join(out, "base"))["model.language_model." + name[len("model."):]],
                               read_dir(c)[name], rtol=0, atol=0)
    inputs, ids, media = _image_prompt(c, os.path.join(out, "base"), tmp_path)
    want = _route_of(c, "image", inputs)
    got, plain = _base_with_adapter(out, ids, media)
    assert (plain[..., :V0] - want[..., :V0]).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-5, atol=1e-5)
    shutil.rmtree(c)


def test_mmer_base_and_low_rank_adapter(mmer, tmp_path):
    """MMER's route over the merged LLM in LLaVA's class: at full rank it is the route (vocabulary rows
    gathered as the base's); at rank 1 the reported probe error is the measured one."""
    full = export(mmer, str(tmp_path / "full"), "image", lora=True, rank=10_000, base=True)
    report = read_json(os.path.join(full, "lora", REPORT))
    assert max(report["relative_error"].values()) < 1e-5 and report["whole_weights"]
    assert {"model.language_model.embed_tokens", "lm_head"} <= set(read_json(
        os.path.join(full, "lora", "adapter_config.json"))["target_modules"])
    inputs, ids, media = _image_prompt(mmer, os.path.join(full, "base"), tmp_path)
    want = _route_of(mmer, "image", inputs)
    got, _ = _base_with_adapter(full, ids, media)
    named = list(range(98))  # the LLaVA source's tokens: base rows, <image> 96 and <pad> 97, at the composite's ids too
    torch.testing.assert_close(got[..., named], want[..., named], rtol=1e-4, atol=1e-4)
    # the checkpoint export of the route is the base plus this adapter, padding rows included
    route = _load_exported(export(mmer, str(tmp_path / "route"), "image"))[0]
    with torch.no_grad():
        torch.testing.assert_close(got, route(input_ids=ids, **media).logits, rtol=1e-4, atol=1e-4)

    result = CliRunner().invoke(main, [mmer, str(tmp_path / "low"), "--route", "image", "--lora", "--rank", "1", "--base"])
    assert result.exit_code == 0, result.output
    low = read_json(tmp_path / "low" / "lora" / REPORT)
    got, _ = _base_with_adapter(str(tmp_path / "low"), IDS, {})
    want = _route_logits(mmer, "image", IDS)[..., named]
    err = float((got[..., named] - want).norm() / want.norm())
    assert err > 1e-3 and low["probe"]["relative_error"] > 1e-3  # lossy, and says so
    with pytest.raises(CompositionError, match=r"^--base is for --lora"):
        export(mmer, str(tmp_path / "x"), "image", base=True)


def test_tied_embeddings_adapter_adapts_the_head(tied_family, tmp_path):
    """A tied composite's route changes the embedding, which is also the head: the adapter's
    embedding factors must reach the head too (PEFT's ensure_weight_tying), so full rank is the route
    (the reported probe error; without the tying it is 4% on this composite)."""
    c = compose({"merge_method": "mmer", "base_model": str(tied_family.base),
                 "models": [{"model": str(tied_family.sources["mistral3"]), "modality": "image"},
                            {"model": str(tied_family.sources["llava"]), "modality": "image2", "placeholder": "<image2>"}]},
                str(tmp_path / "c"))
    causal = export(c, str(tmp_path / "a"), "image", lora=True, rank=10_000)
    assert read_json(os.path.join(causal, "adapter_config.json"))["ensure_weight_tying"] is True
    assert any("(`ensure_weight_tying`), a field vLLM's PEFTHelper does not read" in n
               for n in read_json(os.path.join(causal, REPORT))["vllm"]["notes"])  # said, not silently lost
    torch.testing.assert_close(_peft_logits(c, causal, IDS), _route_logits(c, "image", IDS), rtol=1e-4, atol=1e-4)
    pair = export(c, str(tmp_path / "b"), "image", lora=True, rank=10_000, base=True)
    assert read_json(os.path.join(pair, "lora", REPORT))["probe"]["relative_error"] < 1e-5


# -- Qwen2-VL / Qwen2.5-VL: a merged LLM transformers has no causal-LM class for, biased q/k/v_proj ---

def _qwen_damc_source(fam, out, modality, seed):
    """A decoupled source trained on the Qwen base: its text model + head (the family's causal LM, as
    the composite's merged LLM loads), the item's features random (the training helper takes any)."""
    from mergekit_multimodal.families import causal_lm_class
    from mergekit_multimodal.methods.damc.train import save_decoupled, train_decoupled

    llm = causal_lm_class(transformers.AutoConfig.from_pretrained(fam.base)).from_pretrained(fam.base)
    g = torch.Generator().manual_seed(seed)
    batches = [{"prompt_ids": torch.randint(3, V0, (4,), generator=g), "features": torch.randn(4, 16, generator=g),
                "target_ids": torch.randint(3, V0, (5,), generator=g)}]
    trained = train_decoupled(llm, batches, modality=modality, rank=4, alpha=8, steps=6, lr=5e-2,
                              target_modules=TARGETS, seed=seed)
    assert trained.losses[-1] < trained.losses[0]
    return save_decoupled(trained, str(out))


#: (family fixture, its stand-ins, the exported route): the second source's route where the composite
#: names its placeholder its own way (Qwen2.5-VL's OCR fine-tune: <|image_ocr_pad|>, the source's <|image_pad|>)
QWEN = {"qwen2_vl": ("qwen2_vl_family", ("qwen2_vl", "qwen2_vl_video"), "image"),
        "qwen2_5_vl": ("qwen25_vl_family", ("qwen2_5_vl", "qwen2_5_vl_ocr"), "image_ocr")}


@pytest.mark.parametrize("cls,method", [("qwen2_vl", "mmer"), ("qwen2_5_vl", "mmer"), ("qwen2_5_vl", "damc")])
def test_qwen_route_as_lora_over_the_merged_llm_and_over_its_class(cls, method, request, tmp_path):
    """Qwen2-VL's LLM has biased q/k/v_proj, which MMER routes too: the adapter keeps the route's biases
    where PEFT's bias="lora_only" keeps them (`<module>.base_layer.bias`). `--lora`: the composite's root
    as the family's causal LM (transformers has none for `qwen2*_vl_text`) with the adapter, by PEFT, is
    route(m) on text. `--lora --base`: the source class holding the merged LLM with the adapter, by
    transformers + PEFT on the source processor's own inputs (pixels, grids, 3-D positions), is route(m)
    on an image prompt. MMER at full rank, DAMC exact (its prefix/suffix left out for the class, as
    for LLaVA: the class has no place for them)."""
    from peft import PeftModel

    from mergekit_multimodal.families import causal_lm_class
    from tests.test_qwen2_vl import CLASSES, PROMPTS
    from tests.test_qwen2_vl import source_inputs as qwen_inputs

    fixture, kinds, m = QWEN[cls]
    fam = request.getfixturevalue(fixture)
    if method == "mmer":
        config, rank = composite_config(fam, "mmer", list(kinds)), 10_000
    else:
        models = [{"model": str(fam.sources[k]), "modality": MODALITY[k],
                   "adapters": _qwen_damc_source(fam, tmp_path / f"src_{k}", MODALITY[k], seed)}
                  for seed, k in enumerate(kinds, 1)]
        models[1]["placeholder"] = PLACEHOLDER_OVERRIDE[kinds[1]]
        config, rank = {"merge_method": "damc", "base_model": str(fam.base), "models": models}, None
    c = compose(config, str(tmp_path / "c"))

    out = export(c, str(tmp_path / "a"), m, lora=True, rank=rank)
    adapter = read_json(os.path.join(out, "adapter_config.json"))
    biases = {k for k in read_dir(out) if k.endswith(".base_layer.bias")}
    if method == "mmer":  # every q/k/v_proj bias of the route, on its LoRA layer
        assert adapter["bias"] == "lora_only" and len(biases) == 3 * 2
    else:  # DAMC routes the weights it has factors for, no bias
        assert adapter["bias"] == "none" and not biases
    base = causal_lm_class(transformers.AutoConfig.from_pretrained(c)).from_pretrained(c).eval()
    assert f"`{type(base).__name__}`, from `mergekit_multimodal.families.causal_lm_class`" in open(
        os.path.join(out, "README.md")).read()  # the card names the class that loads its base
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        got = PeftModel.from_pretrained(base, out).eval()(input_ids=IDS).logits
    want = _route_logits(c, m, IDS)
    assert (want - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    view = read_json(os.path.join(out, REPORT))["vllm"]
    assert any("Qwen2ForCausalLM" in n for n in view["notes"]) == (method == "mmer")  # embedding / head factors
    if method == "mmer":  # the biases (and norms), which vLLM refuses: said, and left out with --vllm
        assert any("routed biases kept whole" in why for why in view["rejected"])
        v = export(c, str(tmp_path / "v"), m, lora=True, rank=rank, vllm=True)
        assert_vllm_takes(v, read_json(os.path.join(c, "config.json"))["vocab_size"])
        assert {n for n in read_json(os.path.join(v, REPORT))["left_out"] if n.endswith(".bias")} == {
            k[len("base_model.model."):-len(".base_layer.bias")] + ".bias" for k in biases}

    if method == "damc":  # a source that learned no prefix/suffix: the class can hold its route
        manifest = read_json(os.path.join(c, "composite_config.json"))
        os.remove(os.path.join(c, manifest["modalities"][m].pop("prefix_suffix")))
        with open(os.path.join(c, "composite_config.json"), "w") as f:
            json.dump(manifest, f)
    pair = export(c, str(tmp_path / "e"), m, lora=True, rank=rank, base=True)
    assert read_json(os.path.join(pair, "lora", "adapter_config.json"))["base_model_name_or_path"] == \
        os.path.join(pair, "base")
    from PIL import Image

    pngs = _two_pngs(tmp_path)
    inputs = CompositeProcessor.from_pretrained(c)(PROMPTS[0].replace("<image>", f"<{m}>"), media={m: pngs})
    want = _route_of(c, m, inputs)
    # the exported side: the source's class and its own processor files, as the source runs them
    batch = qwen_inputs(os.path.join(pair, "base"), PROMPTS[:1], [Image.open(p) for p in pngs])
    klass = CLASSES[cls]
    assert read_json(os.path.join(pair, "base", "config.json"))["architectures"] == [klass.__name__]
    base, info = klass.from_pretrained(os.path.join(pair, "base"), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    with torch.no_grad():
        plain = base.eval()(**batch).logits
        got = PeftModel.from_pretrained(base, os.path.join(pair, "lora")).eval()(**batch).logits
    assert got.shape[:-1] == want.shape[:-1]  # (vocabularies: the source's own, the composite's)
    assert (plain[..., :V0] - want[..., :V0]).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)


#: run by a plain interpreter on an exported checkpoint: transformers alone loads it (the package never
#: imported) and computes its logits on inputs the test built from the exported files
def _two_pngs(d):
    """Two random PNGs of different sizes (a Qwen prompt's two images) under directory d: their paths."""
    from PIL import Image

    paths = []
    for i, size in enumerate(((40, 33, 3), (30, 50, 3))):
        Image.fromarray(torch.randint(0, 256, size, generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
                        .numpy()).save(d / f"{i}.png")
        paths.append(str(d / f"{i}.png"))
    return paths


PLAIN_LOGITS = """
import sys, torch, transformers
model = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
assert type(model).__name__ == sys.argv[4], type(model).__name__
assert not [k for k in sys.modules if k.startswith("mergekit")]
with torch.no_grad():
    torch.save(model(**torch.load(sys.argv[2])).logits, sys.argv[3])
"""


@pytest.mark.parametrize("cls", ["qwen2_vl", "qwen2_5_vl"])
def test_checkpoint_of_a_source_with_a_hub_style_flat_config(cls, request, tmp_path):
    """A Qwen source whose config.json is the Hub's flat layout (Qwen2-VL-7B-Instruct: text fields at
    the top level, no text_config; legacy tensor keys): its route's checkpoint keeps that layout (a
    `text_config` holding only the tying flag would make the class build its default 7B text model),
    loads with plain transformers in a fresh interpreter, and gives route(m)'s logits on the inputs
    the exported processor files give."""
    import subprocess
    import sys

    from PIL import Image

    from tests.test_qwen2_vl import CLASSES, PROMPTS, hub_style_copy
    from tests.test_qwen2_vl import source_inputs as qwen_inputs

    fixture, kinds, _ = QWEN[cls]
    fam = request.getfixturevalue(fixture)
    flat = hub_style_copy(fam.sources[kinds[0]], tmp_path / "flat")
    assert "text_config" not in read_json(flat / "config.json")
    assert transformers.AutoConfig.from_pretrained(flat).get_text_config().hidden_size == 16  # read as flat
    assert {k.split(".")[0] for k in read_dir(flat)} == {"model", "visual", "lm_head"}  # legacy keys
    assert any(k.startswith("model.layers.") for k in read_dir(flat))
    other = {"model": str(fam.sources[kinds[1]]), "modality": MODALITY[kinds[1]]}
    if kinds[1] in PLACEHOLDER_OVERRIDE:
        other["placeholder"] = PLACEHOLDER_OVERRIDE[kinds[1]]
    c = compose({"merge_method": "mmer", "base_model": str(fam.base),
                 "models": [{"model": str(flat), "modality": "image"}, other]}, str(tmp_path / "c"))
    out = export(c, str(tmp_path / "e"), "image")
    cfg = read_json(os.path.join(out, "config.json"))
    assert "text_config" not in cfg and cfg["hidden_size"] == 16 and cfg["vocab_size"] == read_json(
        flat / "config.json")["vocab_size"]

    pngs = _two_pngs(tmp_path)
    torch.save(qwen_inputs(out, PROMPTS[:1], [Image.open(p) for p in pngs]), tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", PLAIN_LOGITS, out, str(tmp_path / "inputs.pt"),
                          str(tmp_path / "logits.pt"), CLASSES[cls].__name__],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    want = _route_of(c, "image", CompositeProcessor.from_pretrained(c)(PROMPTS[0], media={"image": pngs}))
    assert got.shape[:-1] == want.shape[:-1]
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-5, atol=1e-5)


#: the forms vLLM's LoRA loader takes, read from its source (docs/serving.md: files, commits, lines):
#: vllm/lora/utils.py parse_fine_tuned_lora_name takes `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` /
#: `.lora_embedding_A` / `.lora_embedding_B` and raises "... is unsupported LoRA weight" on any other tensor;
#: vllm/lora/peft_helper.py PEFTHelper refuses a non-empty `modules_to_save` ("vLLM only supports modules_to_save
#: being None") and a `bias` other than "none" (without bias_enabled, which later versions dropped);
#: vllm/lora/lora_model.py from_lora_tensors refuses a `lora_embedding_A` whose columns are not the base's vocabulary
VLLM_TENSOR = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def assert_vllm_takes(adapter, vocab_size):
    cfg = read_json(os.path.join(adapter, "adapter_config.json"))
    assert not cfg["modules_to_save"] and cfg["bias"] == "none"
    tensors = read_dir(adapter)
    assert [k for k in tensors if not VLLM_TENSOR.match(k)] == []
    assert {v.shape[1] for k, v in tensors.items() if k.endswith(".lora_embedding_A")} <= {vocab_size}


def test_vllm_form_of_an_mmer_adapter(mmer, tmp_path):
    """An MMER route changes the norms, which a LoRA adapter keeps whole (modules_to_save): vLLM refuses
    that, and the export says so (report, card, a warning). `--vllm` leaves them out: the files take
    vLLM's forms, and the probe error it reports is the one PEFT gives on the same probe ids."""
    from peft import PeftModel

    from mergekit_multimodal.export import PROBE_LENGTH, PROBE_SEED

    full = export(mmer, str(tmp_path / "full"), "audio", lora=True, rank=10_000)
    report = read_json(os.path.join(full, REPORT))
    assert len(report["vllm"]["rejected"]) == 1 and "modules_to_save" in report["vllm"]["rejected"][0]
    assert "vLLM would refuse this adapter: adapter_config.json lists modules_to_save" in open(
        os.path.join(full, "README.md")).read()

    result = CliRunner().invoke(main, [mmer, str(tmp_path / "v"), "--route", "audio", "--lora", "--rank", "10000",
                                       "--vllm"])
    assert result.exit_code == 0, result.output
    assert "warning: vLLM would refuse" not in result.output
    assert f"{len(report['whole_weights'])} whole weights left out for vLLM" in result.output
    v = str(tmp_path / "v")
    vocab = read_json(os.path.join(mmer, "config.json"))["vocab_size"]
    assert_vllm_takes(v, vocab)
    ours = read_json(os.path.join(v, REPORT))
    assert ours["left_out"] == report["whole_weights"] and ours["exact"] is False and ours["vllm"]["rejected"] == []
    ids = torch.randint(0, V0, (1, PROBE_LENGTH), generator=torch.Generator().manual_seed(PROBE_SEED))
    want = _route_logits(mmer, "audio", ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(mmer)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, v).eval()(input_ids=ids).logits
    measured = float((got - want).norm() / want.norm())
    assert measured > 1e-4  # the norms left out matter, and the report says by how much
    assert ours["probe"]["relative_error"] == pytest.approx(measured, rel=1e-3)
    # the --base pair in vLLM's form: the adapter's embedding rows are the base's vocabulary
    pair = export(mmer, str(tmp_path / "p"), "image", lora=True, rank=10_000, base=True, vllm=True)
    assert_vllm_takes(os.path.join(pair, "lora"), read_json(os.path.join(pair, "base", "config.json"))["text_config"][
        "vocab_size"])
    with pytest.raises(CompositionError, match=r"^--vllm is for --lora"):
        export(mmer, str(tmp_path / "x"), "image", vllm=True)
