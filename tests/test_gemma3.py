"""Gemma 3 (`Gemma3ForConditionalGeneration`) against the source class run with its own processor:
the image sequence around the soft tokens, the bidirectional attention within an image, generation,
both key layouts, and two Gemma 3 sources as two image routes (MMER retention: route m = source m)."""

import json

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
