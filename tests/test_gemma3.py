"""Gemma 3 (`Gemma3ForConditionalGeneration`) against the source class run with its own processor:
the image sequence around the soft tokens, the bidirectional attention within an image, generation,
both key layouts, and two Gemma 3 sources as two image routes (MMER retention: route m = source m)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.testing import build_tiny_family
from tests.helpers import composite_config, load_route_weights, read_dir, released

V0 = 96
#: two images: the second image's soft tokens must see each other both ways, and not the first's
OWN_PROMPT = "w1 w2 <start_of_image> w3 w4 <start_of_image> w5"


@pytest.fixture(scope="module")
def gemma(gemma_family):
    return gemma_family


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 33, 3), dtype=np.uint8), rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)]
    paths = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(d / f"{i}.png")
        paths.append(str(d / f"{i}.png"))
    return paths, [Image.fromarray(a) for a in arrays]


def source_run(path, pil, load_weights=None):
    """The source class on its own processor's inputs for OWN_PROMPT (its LLM weights replaced first
    by `load_weights`, if given)."""
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(path).eval()
    if load_weights:
        load_weights(model)
    batch = transformers.AutoProcessor.from_pretrained(path)(text=OWN_PROMPT, images=[pil], return_tensors="pt")
    return model, batch


@pytest.mark.parametrize("layout", ["legacy", "hf5", "released"])  # released: vision_tower.vision_model.*
@pytest.mark.parametrize("marker", ["<image>", "<start_of_image>"])
def test_two_images_reproduce_the_source_with_its_bidirectional_attention(gemma, images, tmp_path, layout, marker):
    fam = {"legacy": lambda: gemma, "hf5": lambda: build_tiny_family(tmp_path / "f", ("gemma3",), layout="hf5"),
           "released": lambda: released(gemma, ["gemma3"], ("vision_tower.", "vision_tower.vision_model."),
                                        tmp_path / "f")}[layout]()
    out = compose(composite_config(fam, "mmer", ["gemma3"]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    inputs = proc(OWN_PROMPT.replace("<start_of_image>", marker), images=images[0])
    with torch.no_grad():
        got = model(**inputs).logits
    source, batch = source_run(fam.sources["gemma3"], images[1])
    with torch.no_grad():
        want = source(**batch).logits
        causal = source(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)
    assert (causal - want).abs().max() > 1e-2  # the bidirectional mask matters here: this test can fail


def test_generation_equals_the_sources_greedy_decoding(gemma, images, tmp_path):
    out = compose(composite_config(gemma, "mmer", ["gemma3"]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    greedy = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    got = model.generate(**proc(OWN_PROMPT, images=images[0]), suppress_tokens=list(range(V0, 99)), **greedy)
    source, batch = source_run(gemma.sources["gemma3"], images[1])
    want = source.generate(**batch, suppress_tokens=list(range(V0, 99)), **greedy)
    assert torch.equal(got.sequences[0, -4:], want.sequences[0, -4:])
    torch.testing.assert_close(got.scores[0][..., :V0], want.scores[0][..., :V0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("route", ["image", "image_med"])
def test_route_m_of_two_gemma3_sources_is_source_m(gemma, images, tmp_path, route):
    """Gemma 3 and its fine-tune on a new task as two image routes: under route(m), an image prompt
    runs as the source class whose LLM weights are route m's (iter_route)."""
    out = compose(composite_config(gemma, "mmer", ["gemma3", "medgemma"]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    kind = {"image": "gemma3", "image_med": "medgemma"}[route]

    def route_weights(src):
        load_route_weights(src, out, route)

    prompt = OWN_PROMPT.replace("<start_of_image>", f"<{route}>")
    with pytest.raises(CompositionError, match="ambiguous: 2 modalities take images"):
        proc(OWN_PROMPT.replace("<start_of_image>", "<image>"), images=images[0])  # which image route?
    # the marker <image> names the modality called `image` (a name before a kind); `<image_med>` the other
    assert proc.expand_markers("<image> <image_med>") == (
        "\n\n<start_of_image><image_soft_token><end_of_image>\n\n \n\n<start_of_image><image_med_soft_token>"
        "<end_of_image>\n\n")
    with torch.no_grad(), model.route(route):
        got = model(**proc(prompt, media={route: images[0]})).logits
    source, batch = source_run(gemma.sources[kind], images[1], route_weights)
    with torch.no_grad():
        want = source(**batch).logits
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)


#: pan-and-scan on, with crops small enough for the tiny 56-px images (Gemma3Processor's default minimum is 256 px)
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A wide image (130 x 40: three crops) and a square one (no crops)."""
    d = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (40, 130, 3), dtype=np.uint8), rng.integers(0, 256, (33, 33, 3), dtype=np.uint8)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(d / f"{i}.png")
    return [str(d / f"{i}.png") for i in range(2)], [Image.fromarray(a) for a in arrays]


def test_pan_and_scan_lays_out_and_runs_as_the_sources_processor(gemma, wide, tmp_path):
    """Gemma3Processor called with do_pan_and_scan=True: the wide image's crops each get their own
    image sequence after "Here is the original image ... and here are some crops ...", the square
    image none. The composite's ids (each placeholder standing for 4 soft tokens), logits and greedy
    decoding equal the source class's on its own processor's inputs."""
    out = compose(composite_config(gemma, "mmer", ["gemma3"]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    prompt = OWN_PROMPT.replace("<start_of_image>", "<image>")
    inputs = proc(prompt, images=wide[0], **PAN_AND_SCAN)
    source = transformers.Gemma3ForConditionalGeneration.from_pretrained(gemma.sources["gemma3"]).eval()
    own = transformers.AutoProcessor.from_pretrained(gemma.sources["gemma3"])
    batch = own(text=OWN_PROMPT, images=wide[1], return_tensors="pt", **PAN_AND_SCAN)
    assert batch["pixel_values"].shape[0] == 5 and inputs["media"]["image"]["num_crops"].tolist() == [3, 0]
    soft = proc.placeholder_ids["image"]
    expanded = [t for t in inputs["input_ids"][0].tolist() for _ in range(4 if t == soft else 1)]
    assert expanded == batch["input_ids"][0].tolist()
    with torch.no_grad():
        got = model(**inputs).logits
        want = source(**batch).logits
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)
    greedy = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  suppress_tokens=list(range(V0, 99)))
    got = model.generate(**inputs, **greedy)
    want = source.generate(**batch, **greedy)
    assert torch.equal(got.sequences[0, -4:], want.sequences[0, -4:])
    torch.testing.assert_close(got.scores[0][..., :V0], want.scores[0][..., :V0], rtol=1e-4, atol=1e-4)
    # off (Gemma3Processor's default): one image sequence per image
    assert proc(prompt, images=wide[0])["media"]["image"]["pixel_values"].shape[0] == 2


def test_pan_and_scan_from_the_stored_config_and_its_errors(gemma, wide, tmp_path):
    """A stored image processor config that turns pan-and-scan on is the default of every call (the
    source's processor takes the settings only from the call: here, the same settings given there);
    a bare placeholder cannot stand for an image with crops; an option no modality takes is named."""
    out = compose(composite_config(gemma, "mmer", ["gemma3"]), str(tmp_path / "c"))
    cfg = tmp_path / "c" / "modalities" / "image" / "processor_config.json"
    stored = json.loads(cfg.read_text())
    stored["image_processor"].update({"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16,
                                      "pan_and_scan_max_num_crops": 2})
    cfg.write_text(json.dumps(stored))
    proc = CompositeProcessor.from_pretrained(out)
    inputs = proc("w1 <start_of_image> w2", images=wide[0][:1])
    own = transformers.AutoProcessor.from_pretrained(gemma.sources["gemma3"])
    batch = own(text="w1 <start_of_image> w2", images=wide[1][:1], return_tensors="pt",
                **PAN_AND_SCAN, pan_and_scan_max_num_crops=2)
    assert inputs["media"]["image"]["num_crops"].tolist() == [2]
    torch.testing.assert_close(inputs["media"]["image"]["pixel_values"], batch["pixel_values"])
    soft = proc.placeholder_ids["image"]
    assert [t for t in inputs["input_ids"][0].tolist() for _ in range(4 if t == soft else 1)] == \
        batch["input_ids"][0].tolist()
    assert proc("w1 <image>", images=wide[0][:1], do_pan_and_scan=False)["media"]["image"]["num_crops"].tolist() == [0]
    with pytest.raises(CompositionError, match=r"bare placeholder '<image_soft_token>' for an item .* crops"):
        proc("w1 <image_soft_token>", images=wide[0][:1])
    assert proc("w1 <image_soft_token>", images=wide[0][1:])["input_ids"].shape[1] == 2  # no crops: as written
    with pytest.raises(CompositionError, match=r"processor option\(s\) do_pan_and_scn .*image: do_pan_and_scan"):
        proc("w1 <image>", images=wide[0][:1], do_pan_and_scn=True)


def test_cli_route_choice_and_prepended_item_text(gemma, images, tmp_path):
    """`mergekit-mm-run --route image_med`: a prompt without a marker gets the modality's whole item
    text (Gemma's <start_of_image> ... <end_of_image>), the same answer as the marker written out;
    the answer is route image_med's greedy decoding as the Python API gives it."""
    from click.testing import CliRunner

    from mergekit_multimodal.run import main

    out = compose(composite_config(gemma, "mmer", ["gemma3", "medgemma"]), str(tmp_path / "c"))
    common = [out, "--media", f"image_med={images[0][0]}", "--route", "image_med", "--device", "cpu",
              "--max-new-tokens", "3"]
    bare = CliRunner().invoke(main, [*common, "w5 w6"])
    marked = CliRunner().invoke(main, [*common, "<image_med> w5 w6"])
    assert bare.exit_code == 0 and marked.exit_code == 0, bare.output + marked.output
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    with model.route("image_med"):
        new = model.generate(**proc("<image_med> w5 w6", media={"image_med": [images[0][0]]}), max_new_tokens=3,
                             do_sample=False)
    want = proc.decode(new[0], skip_special_tokens=True).strip()
    assert want and bare.stdout.strip() == marked.stdout.strip() == want
    ambiguous = CliRunner().invoke(main, [out, "--image", images[0][0], "--device", "cpu", "w5"])
    assert ambiguous.exit_code != 0 and "2 modalities take images" in ambiguous.output
    assert "image (image), image_med (image)" in ambiguous.output


def test_tied_embeddings_and_left_padding(images, tmp_path):
    """Gemma 3 ships tied embeddings: route(m) of a tied two-source composite is still source m (its
    head follows the embedding's delta, unscaled, while the input rows are scaled); and a left-padded
    row of a batch scores as it does alone (the padding enters Gemma's own masks)."""
    fam = build_tiny_family(tmp_path / "f", ("gemma3", "medgemma"), tie_word_embeddings=True)
    assert not any("lm_head" in k for k in read_dir(fam.sources["gemma3"]))
    out = compose(composite_config(fam, "mmer", ["gemma3", "medgemma"]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)

    def route_weights(src):  # tied: the head is the embedding
        load_route_weights(src, out, "image_med", head=False)

    with torch.no_grad(), model.route("image_med"):
        got = model(**proc(OWN_PROMPT.replace("<start_of_image>", "<image_med>"),
                           media={"image_med": images[0]})).logits
    source, batch = source_run(fam.sources["medgemma"], images[1], route_weights)
    with torch.no_grad():
        want = source(**batch).logits
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)

    one = "w1 <image_med> w2 w3 <image_med> w4"
    batch = proc([one, "w5 <image_med>"], media={"image_med": images[0] + images[0][:1]})
    alone = proc(one, media={"image_med": images[0]})
    assert batch["attention_mask"][1, 0] == 0  # the short row is left-padded
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[0], model(**alone).logits[0], rtol=1e-4, atol=1e-4)
        short = model(**proc("w5 <image_med>", media={"image_med": images[0][:1]})).logits[0]
        torch.testing.assert_close(model(**batch).logits[1, -short.shape[0]:], short, rtol=1e-4, atol=1e-4)


# -- a base whose embedding is padded past its tokenizer, as the real checkpoints' are ---------------
#
# google/gemma-3-4b-pt, -it and medgemma-4b-it hold 262208 embedding rows (Gemma3TextConfig's default
# vocab_size) while their tokenizer names 262145 ids (262144 + <image_soft_token>, Gemma3Config's default
# image_token_index 262144). The stand-ins: a Gemma 3 text base whose tokenizer is Gemma 3's own (96
# words + <start_of_image>, <end_of_image>, <image_soft_token>: 99 ids) with 99 + PAD rows, and the two
# sources padded alike. MedGemma's `placeholder: <image_med_soft_token>` adds a token: the composite's
# tokenizer gives it id 99, one of the base's unnamed rows.

PAD = 6
NAMED = V0 + 3  # ids the base's tokenizer names
SOFT_ID = V0 + 2  # <image_soft_token> in every input
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ADDED = "<image_med_soft_token>"


def _pad_rows(directory, keys, rows, seed):
    """Pad `keys` (embedding / head) to `rows` rows with seeded random rows of the tensor's own scale."""
    from mergekit_multimodal.testing import _rewrite_checkpoint

    gen = torch.Generator().manual_seed(seed)

    def pad(key, t):
        if key not in keys:
            return key, t
        extra = torch.randn(rows - t.shape[0], t.shape[1], generator=gen) * t.std()
        return key, torch.cat([t, extra.to(t.dtype)])

    _rewrite_checkpoint(directory, pad)


def padded_family(root, tie=False):
    import shutil

    from mergekit_multimodal.testing import TinyFamily

    fam = build_tiny_family(root, ("gemma3", "medgemma"), tie_word_embeddings=tie)
    rows = NAMED + PAD
    for seed, (kind, src) in enumerate(fam.sources.items(), 1):
        _pad_rows(src, {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}, rows, seed)
        cfg = json.loads((src / "config.json").read_text())
        cfg["text_config"]["vocab_size"] = rows
        (src / "config.json").write_text(json.dumps(cfg))
    base = fam.base  # Gemma 3's tokenizer (its image tokens are base tokens), rows past it random
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fam.sources["gemma3"] / name, base / name)
    _pad_rows(base, {EMBED, HEAD}, rows, 0)
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] = rows
    (base / "config.json").write_text(json.dumps(cfg))
    return TinyFamily(base=base, sources=fam.sources, vocab_size=rows)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    return padded_family(tmp_path_factory.mktemp("padded"))


#: MMER with a TIES election (whole-tensor trim thresholds) and rescaled routes: both must not see the carried row
PADDED_METHODS = {"mmer": {"election": "ties", "density": 0.7, "rescale": True}, "naive_mc": None}
_PADDED = {}


def _padded_composite(fam, method, tmp_path_factory):
    key = (str(fam.base), method)
    if key not in _PADDED:
        cfg = composite_config(fam, method, ["gemma3", "medgemma"], parameters=PADDED_METHODS[method], dtype="float32")
        _PADDED[key] = compose(cfg, str(tmp_path_factory.mktemp("c") / method))
    return _PADDED[key]


@pytest.mark.parametrize("method", list(PADDED_METHODS))
def test_padded_base_added_token_takes_the_next_unnamed_row(padded, method, tmp_path_factory):
    """The added placeholder gets the id the composite's tokenizer gives it (the base's first unnamed row),
    its rows (embedding and head, every route) are MedGemma's own placeholder rows, and every other row
    is the method's merge of the base's other rows, as the float64 reference computes it."""
    from mergekit_multimodal.methods.mmer.masks import unpack_mask
    from mergekit_multimodal.methods.routes import iter_route
    from tests import reference
    from tests.helpers import f64, llm_of

    out = _padded_composite(padded, method, tmp_path_factory)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    base_tok = transformers.AutoTokenizer.from_pretrained(padded.base)
    base_rows = read_dir(padded.base)[EMBED].shape[0]
    ids, merged_rows, rows = reference.composite_vocabulary(len(base_tok), base_rows, 1)
    assert ids == [NAMED] and rows == NAMED + PAD  # inside the base's rows: nothing appended
    manifest = json.loads((Path(out) / "composite_config.json").read_text())
    assert tok.convert_tokens_to_ids(ADDED) == ids[0] == manifest["modalities"]["image_med"]["placeholder_id"]
    assert manifest["modalities"]["image"]["placeholder_id"] == SOFT_ID
    assert manifest["added_tokens"] == [{"token": ADDED, "id": ids[0], "from": "image_med"}]
    assert manifest["llm"]["vocab_size"] == rows == json.loads((Path(out) / "config.json").read_text())["vocab_size"]
    assert len(tok) == NAMED + 1

    base = read_dir(padded.base)
    sources = [llm_of(read_dir(padded.sources[k])) for k in ("gemma3", "medgemma")]
    merged, routes = read_dir(out), read_dir(Path(out) / "routes") if method == "mmer" else {}
    assert set(merged) == set(base)
    for name, b in base.items():
        got = f64(merged[name])
        if name not in (EMBED, HEAD):
            keep = slice(None)
        else:
            keep = merged_rows
            assert got.shape[0] == rows
            # the carried row: MedGemma's own <image_soft_token> row, exactly
            assert torch.equal(merged[name][ids[0]], sources[1][name][SOFT_ID]), name
        srcs = [f64(s[name])[keep] for s in sources]
        if method == "naive_mc":
            np.testing.assert_allclose(got[keep], reference.naive_mc(srcs), rtol=1e-6, atol=1e-7, err_msg=name)
            continue
        p = PADDED_METHODS["mmer"]
        want, tau, masks, scales = reference.mmer(f64(b)[keep], srcs, election=p["election"], density=p["density"],
                                                  rescale=p["rescale"])
        np.testing.assert_allclose(got[keep], want, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(f64(routes[name])[keep], tau, rtol=1e-6, atol=1e-6, err_msg=name)
        for m, want_mask, scale in zip(("image", "image_med"), masks, scales):
            mask = unpack_mask(routes[f"{m}/{name}"], merged[name].shape).numpy()
            assert (mask[keep] != want_mask).mean() < 1e-3, (m, name)  # float32 vs float64: exact ties only
            assert routes[f"{m}/{name}:scale"].item() == pytest.approx(scale, rel=1e-5), (m, name)
            if name in (EMBED, HEAD):
                assert not mask[ids[0]].any(), (m, name)
        if name in (EMBED, HEAD):
            assert not routes[name][ids[0]].any(), name  # no tau_* on the carried row
    for m in ("image", "image_med"):  # every route keeps the carried rows as they are
        route = dict(iter_route(out, m))
        for name in (EMBED, HEAD):
            assert torch.equal(route[name][ids[0]], sources[1][name][SOFT_ID].float()), (m, name)


@pytest.mark.parametrize("route", ["image", "image_med"])
def test_padded_base_route_m_is_source_m(padded, images, route, tmp_path_factory):
    """route(m) of the padded composite runs an image prompt as source m's class does through its own
    processor with route m's weights: every logit (the placeholder rows' inputs are the image features)."""
    out = _padded_composite(padded, "mmer", tmp_path_factory)
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    kind = {"image": "gemma3", "image_med": "medgemma"}[route]
    soft = {"image": SOFT_ID, "image_med": NAMED}[route]
    assert proc.placeholder_ids[route] == soft
    inputs = proc(OWN_PROMPT.replace("<start_of_image>", f"<{route}>"), media={route: images[0]})
    assert int((inputs["input_ids"] == soft).sum()) == 2
    with torch.no_grad(), model.route(route):
        got = model(**inputs).logits
    source, batch = source_run(padded.sources[kind], images[1], lambda src: load_route_weights(src, out, route))
    with torch.no_grad():
        want = source(**batch).logits
    assert got.shape == want.shape == (1, batch["input_ids"].shape[1], NAMED + PAD)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_padded_base_export_of_the_added_placeholders_route(padded, images, tmp_path, tmp_path_factory):
    """Route image_med exported as a Gemma3ForConditionalGeneration checkpoint holds MedGemma's own
    vocabulary (its `<image_soft_token>` at its own id, its padded size): that token's rows are the ones
    the composite carried for `<image_med_soft_token>` (MedGemma's), and through its own processor it gives
    route image_med's logits, the composite's column of `<image_med_soft_token>` standing for its placeholder."""
    from mergekit_multimodal.export import export

    out = _padded_composite(padded, "mmer", tmp_path_factory)
    exported = export(out, str(tmp_path / "e"), "image_med")
    cfg = json.loads((Path(exported) / "config.json").read_text())
    assert cfg["image_token_index"] == SOFT_ID and cfg["text_config"]["vocab_size"] == NAMED + PAD
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(exported).eval()
    src = transformers.Gemma3ForConditionalGeneration.from_pretrained(padded.sources["medgemma"])
    for mine, theirs in ((model.get_input_embeddings(), src.get_input_embeddings()),
                         (model.get_output_embeddings(), src.get_output_embeddings())):
        assert torch.equal(mine.weight[SOFT_ID], theirs.weight[SOFT_ID])
    batch = transformers.AutoProcessor.from_pretrained(exported)(text=OWN_PROMPT, images=images[1],
                                                                return_tensors="pt")
    assert int((batch["input_ids"] == SOFT_ID).sum()) == 2 * 4  # its processor writes its own placeholder
    proc, composite = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    inputs = proc(OWN_PROMPT.replace("<start_of_image>", "<image_med>"), media={"image_med": images[0]})
    with torch.no_grad(), composite.route("image_med"):
        want = composite(**inputs).logits
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got[..., :SOFT_ID], want[..., :SOFT_ID], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[..., SOFT_ID], want[..., NAMED], rtol=1e-4, atol=1e-4)
