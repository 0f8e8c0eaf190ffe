"""End-to-end composition of tiny real-layout checkpoints, checked against independent expectations."""

import json

import numpy as np
import pytest
import torch
import transformers

from mergekit_multimodal import compose
from mergekit_multimodal.methods.mmer.masks import unpack_mask
from tests import reference
from tests.helpers import MODALITY, PLACEHOLDER_OVERRIDE, composite_config, f64, llm_of, read_dir, read_json

V0 = 96  # base vocabulary of the tiny family


@pytest.fixture(scope="module")
def mmer_out(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "mmer"
    compose(composite_config(family, "mmer"), str(out))
    return out


def _inputs(family):
    base = read_dir(family.base)
    sources = {k: read_dir(p) for k, p in family.sources.items()}
    return base, sources


def test_mmer_llm_tensors_match_numpy_reference(family, mmer_out):
    base, sources = _inputs(family)
    merged = read_dir(mmer_out)
    tau = read_dir(mmer_out / "routes")
    kinds = list(family.sources)
    src_llm = [llm_of(sources[k]) for k in kinds]
    assert set(merged) == set(base), "every LLM tensor of the base (and no other) is in the merged LLM"
    for name, b in base.items():
        rows = slice(0, V0) if name in ("model.embed_tokens.weight", "lm_head.weight") else slice(None)
        want, want_tau, want_masks, _ = reference.mmer(f64(b), [f64(s[name][rows]) for s in src_llm])
        got = f64(merged[name])[rows]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(f64(tau[name])[rows], want_tau, rtol=1e-6, atol=1e-6, err_msg=name)
        for k, want_mask in zip(kinds, want_masks):
            packed = tau[f"{MODALITY[k]}/{name}"]
            mask = unpack_mask(packed, merged[name].shape).numpy()[rows]
            # the float32 engine and float64 reference may disagree on exact ties only
            assert (mask != want_mask).mean() < 1e-3, (k, name)
            assert packed.dtype == torch.uint8 and packed.numel() == (merged[name].numel() + 7) // 8


def test_every_source_llm_tensor_reaches_the_output(family, mmer_out):
    """mergekit alone drops LLaVA's `language_model.*` tensors; here each is merged into the output."""
    _, sources = _inputs(family)
    merged = read_dir(mmer_out)
    for k, tensors in sources.items():
        llm = llm_of(tensors)
        assert llm, k
        for name in llm:
            assert name in merged, (k, name)


def test_modality_parts_are_carried_unchanged(family, mmer_out):
    _, sources = _inputs(family)
    for k, tensors in sources.items():
        carried = read_dir(mmer_out / "modalities" / MODALITY[k])
        want = {n: t for n, t in tensors.items() if not n.startswith("language_model.")}
        assert set(carried) == set(want), k
        for n, t in want.items():
            assert torch.equal(carried[n], t), (k, n)
        assert read_json(mmer_out / "modalities" / MODALITY[k] / "config.json")["architectures"] == \
            read_json(family.sources[k] / "config.json")["architectures"]


def test_vocabulary_rows_and_placeholders(family, mmer_out):
    _, sources = _inputs(family)
    merged = read_dir(mmer_out)
    tok = transformers.AutoTokenizer.from_pretrained(mmer_out)
    cfg = read_json(mmer_out / "composite_config.json")
    ids = {}
    for k in family.sources:
        m = MODALITY[k]
        src_tok = transformers.AutoTokenizer.from_pretrained(family.sources[k])
        src_cfg = read_json(family.sources[k] / "config.json")
        key = next(x for x in ("video_token_index", "image_token_index", "audio_token_index") if x in src_cfg)
        src_id = src_cfg[key]
        token = PLACEHOLDER_OVERRIDE.get(k, src_tok.convert_ids_to_tokens(src_id))
        new_id = tok.convert_tokens_to_ids(token)
        assert cfg["modalities"][m]["placeholder"] == token
        assert cfg["modalities"][m]["placeholder_id"] == new_id
        # the placeholder's embedding row is the source's own row
        src_embed = llm_of(sources[k])["model.embed_tokens.weight"]
        assert torch.equal(merged["model.embed_tokens.weight"][new_id], src_embed[src_id])
        ids[m] = new_id
    assert len(set(ids.values())) == len(ids), "each modality has its own placeholder id"
    assert min(ids.values()) >= V0
    rows = merged["model.embed_tokens.weight"].shape[0]
    assert rows == len(tok) == read_json(mmer_out / "config.json")["vocab_size"]
    # LLaVA pads its vocabulary to a multiple of 8 with unnamed rows: those are not carried
    assert rows < V0 + sum(llm_of(s)["model.embed_tokens.weight"].shape[0] - V0 for s in sources.values())


def test_merged_llm_loads_in_transformers_as_a_causal_lm(mmer_out):
    model = transformers.AutoModelForCausalLM.from_pretrained(mmer_out)
    assert isinstance(model, transformers.LlamaForCausalLM)
    merged = read_dir(mmer_out)
    sd = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(sd[name], t), name
    tok = transformers.AutoTokenizer.from_pretrained(mmer_out)
    ids = tok("w1 w2 <image> w3", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_card_and_config_files(mmer_out, family):
    card = (mmer_out / "README.md").read_text()
    assert "mergekit-multimodal" in card and "| image |" in card and "merge_method: mmer" in card
    assert (mmer_out / "mergekit_config.yml").read_text().startswith("merge_method: mmer")
    cfg = read_json(mmer_out / "composite_config.json")
    assert cfg["merge_method"] == "mmer" and set(cfg["modalities"]) == {MODALITY[k] for k in family.sources}
    assert cfg["parameters"]["election"] == "max" and cfg["parameters"]["lambda"] == 1.0


def test_naive_mc_is_the_mean_and_has_no_routes(family, tmp_path):
    out = tmp_path / "naive"
    compose(composite_config(family, "naive_mc"), str(out))
    base, sources = _inputs(family)
    merged = read_dir(out)
    for name in base:
        rows = slice(0, V0) if name in ("model.embed_tokens.weight", "lm_head.weight") else slice(None)
        want = reference.naive_mc([f64(llm_of(s)[name][rows]) for s in sources.values()])
        np.testing.assert_allclose(f64(merged[name])[rows], want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert not (out / "routes").exists()
    assert read_json(out / "composite_config.json")["routes"] is None


def test_any_mergekit_method_merges_the_llm_while_encoders_are_reused(family, tmp_path):
    out = tmp_path / "ta"
    kinds = ["llava", "qwen2_audio"]
    compose(composite_config(family, "task_arithmetic", kinds, parameters={"weight": 0.5}), str(out))
    base, sources = _inputs(family)
    merged = read_dir(out)
    name = "model.layers.1.mlp.down_proj.weight"
    want = f64(base[name]) + 0.5 * sum(f64(llm_of(sources[k])[name]) - f64(base[name]) for k in kinds)
    np.testing.assert_allclose(f64(merged[name]), want, rtol=1e-5, atol=1e-6)
    assert set(read_dir(out / "modalities" / "image")) == {
        n for n in sources["llava"] if not n.startswith("language_model.")}


def test_single_source_mmer_composite_is_the_source(family, tmp_path):
    out = tmp_path / "one"
    compose(composite_config(family, "mmer", ["llava"]), str(out))
    src = llm_of(read_dir(family.sources["llava"]))
    merged = read_dir(out)
    for name, t in merged.items():
        n = min(t.shape[0], src[name].shape[0])
        np.testing.assert_allclose(f64(t)[:n] if t.ndim else f64(t), f64(src[name])[:n] if t.ndim else f64(src[name]),
                                   atol=1e-6, err_msg=name)


def test_transformers5_layout_sharded_bf16_inputs_compose_like_legacy(family, tmp_path):
    """The same weights in `model.language_model.*` layout, sharded, compose to the same composite."""
    from mergekit_multimodal.testing import build_tiny_family

    kinds = ["llava", "qwen2_audio"]
    new = build_tiny_family(tmp_path / "hf5", kinds, layout="hf5", shard_size=20_000)
    assert (new.sources["llava"] / "model.safetensors.index.json").exists()
    assert any(k.startswith("model.language_model.") for k in read_dir(new.sources["llava"]))
    compose(composite_config(new, "mmer", kinds), str(tmp_path / "a"))
    compose(composite_config(family, "mmer", kinds), str(tmp_path / "b"))
    a, b = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert set(read_dir(tmp_path / "a" / "modalities" / "image")) == {
        "model." + n for n in read_dir(tmp_path / "b" / "modalities" / "image")}


def test_bf16_output_and_sharded_output(family, tmp_path):
    from mergekit.options import MergeOptions

    out = tmp_path / "bf16"
    compose(composite_config(family, "mmer", ["llava", "qwen2_audio"], out_dtype="bfloat16"), str(out),
            MergeOptions(out_shard_size=4000, quiet=True))
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "routes" / "masks.safetensors.index.json").exists() or (out / "routes" / "masks.safetensors").exists()
    merged = read_dir(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == merged["model.embed_tokens.weight"].shape[0]


def test_mistral3_and_voxtral_compose(mistral_family, tmp_path):
    out = tmp_path / "mv"
    cfg = {"merge_method": "mmer", "base_model": str(mistral_family.base),
           "models": [{"model": str(mistral_family.sources["mistral3"]), "modality": "image"},
                      {"model": str(mistral_family.sources["voxtral"]), "modality": "audio"}]}
    compose(cfg, str(out))
    cfg = read_json(out / "composite_config.json")
    assert cfg["modalities"]["image"]["placeholder"] == "[IMG]" and cfg["modalities"]["audio"]["placeholder"] == "[AUDIO]"
    assert cfg["modalities"]["audio"]["parts"]["encoder"] > 0 and cfg["modalities"]["audio"]["parts"]["connector"] > 0
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(out), transformers.MistralForCausalLM)


def test_tied_sources_give_a_tied_composite(tied_family, tmp_path):
    out = tmp_path / "tied"
    cfg = {"merge_method": "mmer", "base_model": str(tied_family.base),
           "models": [{"model": str(tied_family.sources["mistral3"]), "modality": "image"},
                      {"model": str(tied_family.sources["llava"]), "modality": "image2", "placeholder": "<image2>"}]}
    compose(cfg, str(out))
    merged = read_dir(out)
    assert "lm_head.weight" not in merged
    assert read_json(out / "config.json")["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tied_and_untied_sources_compose_untied(family, tmp_path):
    """A source with tied embeddings contributes its embedding as its output head."""
    import shutil

    from safetensors.torch import save_file

    tied = tmp_path / "llava_tied"
    shutil.copytree(family.sources["llava"], tied)
    sd = read_dir(tied)
    del sd["language_model.lm_head.weight"]
    save_file(sd, str(tied / "model.safetensors"), metadata={"format": "pt"})
    config = read_json(tied / "config.json")  # a tied checkpoint says so (an untied one without a head is refused)
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    cfg = {"merge_method": "naive_mc", "base_model": str(family.base),
           "models": [{"model": str(tied), "modality": "image"},
                      {"model": str(family.sources["qwen2_audio"]), "modality": "audio"}]}
    out = tmp_path / "mixed"
    compose(cfg, str(out))
    merged = read_dir(out)
    audio = llm_of(read_dir(family.sources["qwen2_audio"]))
    want = (f64(sd["language_model.model.embed_tokens.weight"][:V0]) + f64(audio["lm_head.weight"][:V0])) / 2
    np.testing.assert_allclose(f64(merged["lm_head.weight"][:V0]), want, rtol=1e-6, atol=1e-7)
    assert read_json(out / "config.json")["tie_word_embeddings"] is False


def test_routes_rebuilt_from_disk_match_the_reference(family, mmer_out):
    """What the loader will run: theta_base + s_i * m_i * tau_*, rebuilt from the composite's files."""
    from mergekit_multimodal.methods.routes import iter_route

    base, sources = _inputs(family)
    kinds = list(family.sources)
    src_llm = [llm_of(sources[k]) for k in kinds]
    for i, k in enumerate(kinds):
        route = dict(iter_route(str(mmer_out), MODALITY[k], torch.float64))
        assert set(route) == set(base)
        closer = 0
        for name, b in base.items():
            rows = slice(0, V0) if name in ("model.embed_tokens.weight", "lm_head.weight") else slice(None)
            _, tau, masks, scales = reference.mmer(f64(b), [f64(s[name][rows]) for s in src_llm])
            want = f64(b) + scales[i] * masks[i] * tau
            got = route[name].numpy()[rows]
            bad = ~np.isclose(got, want, rtol=1e-5, atol=1e-5)
            assert bad.mean() < 1e-3, (k, name)  # exact up to float32 ties in the mask
            merged = reference.mmer(f64(b), [f64(s[name][rows]) for s in src_llm])[0]
            src = f64(src_llm[i][name][rows])
            closer += np.abs(got - src).sum() <= np.abs(merged - src).sum()
        assert closer == len(base), f"{k}: its route is nearer its source than the merge, tensor by tensor"


def test_builtin_example_runs_and_reports_mmer_closer_than_naive(tmp_path):
    from click.testing import CliRunner

    from mergekit_multimodal.example import main

    r = CliRunner().invoke(main, [str(tmp_path / "ex")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if line.strip().startswith(("image ", "audio "))]
    assert len(rows) == 2
    for row in rows:
        assert float(row[-2]) < float(row[-1])  # mmer route distance < naive_mc distance
    assert (tmp_path / "ex" / "composite-mmer" / "composite_config.json").exists()


def test_builtin_example_never_deletes_a_directory_it_did_not_make(tmp_path):
    from click.testing import CliRunner

    from mergekit_multimodal.example import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = CliRunner().invoke(main, [str(mine)])
    assert r.exit_code == 1 and "not an earlier mergekit-mm-example output" in r.output
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
