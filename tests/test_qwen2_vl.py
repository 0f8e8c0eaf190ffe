"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`)
against the source class run on its own inputs: its image processor's patches and grids, the prompt
as its processor lays it out (`<|vision_start|>` + one `<|image_pad|>` per merged patch +
`<|vision_end|>`) with `mm_token_type_ids`, and the source's own forward / generate, which compute the
3-D rotary positions (get_rope_index, rope_deltas). Covers two images in a prompt, both key layouts,
a Hub-style legacy config as the base, left-padded batches and greedy generation, video (the same
`pixel_values_videos` on both sides; the composite's frame steps checked against the image
processor's own patches), and two task fine-tunes of one base as two image routes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.testing import _rewrite_checkpoint
from tests.helpers import composite_config, load_route_weights, read_dir

V0 = 96
ITEM = "<|vision_start|>{}<|vision_end|>"
#: two images in one prompt (different sizes: 6x4 and 4x6 patches); the second prompt is shorter
PROMPTS = ["w1 w2 <image> w3 <image> w4", "w5 <image> w6"]
CLASSES = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}


@pytest.fixture(scope="module")
def fams(qwen2_vl_family, qwen25_vl_family):
    return {"qwen2_vl": qwen2_vl_family, "qwen2_5_vl": qwen25_vl_family}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((40, 33, 3), (30, 50, 3), (60, 60, 3))]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(d / f"{i}.png")
    return [str(d / f"{i}.png") for i in range(len(arrays))], [Image.fromarray(a) for a in arrays]


def own_tokens(prompt, token="<|image_pad|>", marker="<image>"):
    return prompt.replace(marker, ITEM.format(token))


def source_inputs(src, prompts, pils, token="<|image_pad|>", kind="image", media=None):
    """The source's own inputs: its image processor (or the given media), each pad repeated once per
    merged patch as Qwen2VLProcessor.replace_image_token does, left padding, mm_token_type_ids."""
    cfg = transformers.AutoConfig.from_pretrained(src)
    if media is None:
        media = dict(transformers.AutoImageProcessor.from_pretrained(src)(images=pils, return_tensors="pt"))
    grids = iter(media[f"{kind}_grid_thw"].tolist())
    merge = cfg.vision_config.spatial_merge_size ** 2
    tok = transformers.AutoTokenizer.from_pretrained(src)
    rows = []
    for p in prompts:
        parts = own_tokens(p, token, f"<{kind}>").split(token)
        text = parts[0] + "".join(token * (int(np.prod(next(grids))) // merge) + rest for rest in parts[1:])
        rows.append(tok(text, return_tensors="pt").input_ids[0])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **media}


def hf5(fam, kind, root):
    """A copy of the stand-in in the transformers-5 layout (model.language_model.*, model.visual.*)."""
    out = root / kind
    shutil.copytree(fam.sources[kind], out)
    _rewrite_checkpoint(out, lambda k, t: ("model.language_model." + k[len("model."):] if k.startswith("model.")
                                           else "model." + k if k.startswith("visual.") else k, t))
    return type(fam)(base=fam.base, sources={kind: out}, vocab_size=fam.vocab_size)


@pytest.mark.parametrize("cls", sorted(CLASSES))
@pytest.mark.parametrize("layout", ["legacy", "hf5"])
@pytest.mark.parametrize("marker", ["generic", "own"])
def test_two_images_reproduce_the_source(fams, images, tmp_path, cls, layout, marker):
    fam = fams[cls] if layout == "legacy" else hf5(fams[cls], cls, tmp_path / "src")
    if layout == "hf5":
        assert {k.split(".")[1] for k in read_dir(fam.sources[cls]) if k.startswith("model.")} == {"language_model",
                                                                                                  "visual"}
    out = compose(composite_config(fam, "mmer", [cls]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    prompt = PROMPTS[0] if marker == "generic" else own_tokens(PROMPTS[0])
    inputs = proc(prompt, images=images[0][:2])
    with torch.no_grad():
        got = model(**inputs).logits
    src = CLASSES[cls].from_pretrained(fam.sources[cls]).eval()
    batch = source_inputs(fam.sources[cls], PROMPTS[:1], images[1][:2])
    with torch.no_grad():
        want = src(**batch).logits
    assert got.shape == want.shape and batch["image_grid_thw"].tolist() == [[1, 6, 4], [1, 4, 6]]
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)
    if layout == "legacy" and marker == "generic":  # 1-D positions give logits this tolerance tells apart
        plain = torch.arange(batch["input_ids"].shape[1])[None]
        with torch.no_grad():
            flat = src(**batch, position_ids=plain).logits
        with pytest.raises(AssertionError):
            torch.testing.assert_close(flat[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_left_padded_batch_and_greedy_generation_equal_the_source(fams, images, tmp_path, cls):
    """Two prompts of different lengths (left padding), three images: the forward's logits at every
    real position, and greedy generation (the decode steps continue the 3-D positions: rope_deltas)."""
    fam = fams[cls]
    out = compose(composite_config(fam, "mmer", [cls]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    inputs = proc(PROMPTS, images=images[0])
    assert inputs["attention_mask"][1, 0] == 0  # left-padded
    src = CLASSES[cls].from_pretrained(fam.sources[cls]).eval()
    batch = source_inputs(fam.sources[cls], PROMPTS, images[1])
    with torch.no_grad():
        got, want = model(**inputs).logits, src(**batch).logits
    real = batch["attention_mask"].bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[real][:, :V0], want[real][:, :V0], rtol=1e-4, atol=1e-4)
    opts = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert_generates_like(model.generate(**inputs, **opts, output_logits=True, return_dict_in_generate=True),
                          src, batch, opts)
    alone = model.generate(**proc(PROMPTS[1], images=images[0][2:]), **opts)
    assert torch.equal(alone[0], model.generate(**inputs, **opts)[1])


def assert_generates_like(ours, src, batch, opts):
    """Greedy tokens equal the source's generate, and so do the logits of every step (the decode
    steps' logits depend on the positions they continue from, within this tolerance)."""
    with torch.no_grad():
        theirs = src.generate(**batch, **opts, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs.sequences[:, batch["input_ids"].shape[1]:])
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a[:, :V0], b[:, :V0], rtol=1e-4, atol=1e-4)


def write_video(path, frames=3, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (frames, 30, 41, 3), dtype=np.uint8)
    np.save(path, arr)
    return arr


def test_video_frames_follow_the_video_processors_layout(qwen2_vl_family, tmp_path):
    """The composite's `pixel_values_videos` against the image processor's own patches: an image's
    patch repeats its frame temporal_patch_size times, so frame t of each video patch must equal that
    frame's image patch; an odd frame count repeats the last frame."""
    src = qwen2_vl_family.sources["qwen2_vl_video"]
    out = compose(composite_config(qwen2_vl_family, "mmer", ["qwen2_vl_video"]), str(tmp_path / "c"))
    arr = write_video(tmp_path / "v.npy")
    got = CompositeProcessor.from_pretrained(out)("<video>", videos=[tmp_path / "v.npy"])["media"]["video"]
    assert got["video_grid_thw"].tolist() == [[2, 4, 6]] and "second_per_grid_ts" not in got
    image = transformers.AutoImageProcessor.from_pretrained(src)
    pixels = got["pixel_values_videos"].reshape(2, 24, 3, 2, 14, 14)  # [t, patches, C, frames, P, P]
    for f, frame in enumerate([*arr, arr[-1]]):
        want = image(images=[Image.fromarray(frame)], return_tensors="pt")["pixel_values"].reshape(24, 3, 2, 14, 14)
        torch.testing.assert_close(pixels[f // 2, :, :, f % 2], want[:, :, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_video_reproduces_the_source(fams, tmp_path, cls):
    """A video route: the same pixel_values_videos (and Qwen2.5-VL's second_per_grid_ts, which spaces
    the video's temporal positions) on both sides; the source's own forward and generate."""
    fam = fams[cls]
    kind = "qwen2_vl_video" if cls == "qwen2_vl" else cls
    cfg = {"merge_method": "mmer", "base_model": str(fam.base), "models": [{"model": str(fam.sources[kind]),
                                                                             "modality": "video"}]}
    out = compose(cfg, str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    write_video(tmp_path / "v.npy", frames=4)
    prompts = ["w1 <video> w2 w3", "w4 <video>"]
    inputs = proc(prompts, videos=[tmp_path / "v.npy"] * 2)
    media = inputs["media"]["video"]
    assert ("second_per_grid_ts" in media) == (cls == "qwen2_5_vl")
    src = CLASSES[cls].from_pretrained(fam.sources[kind]).eval()
    batch = source_inputs(fam.sources[kind], prompts, None, "<|video_pad|>", "video", dict(media))
    with torch.no_grad():
        got, want = model(**inputs).logits, src(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real][:, :V0], want[real][:, :V0], rtol=1e-4, atol=1e-4)
    opts = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert_generates_like(model.generate(**inputs, **opts, output_logits=True, return_dict_in_generate=True),
                          src, batch, opts)


@pytest.fixture(scope="module")
def routes(qwen25_vl_family, tmp_path_factory):
    return compose(composite_config(qwen25_vl_family, "mmer", ["qwen2_5_vl", "qwen2_5_vl_ocr"]),
                   str(tmp_path_factory.mktemp("c") / "c"))


@pytest.mark.parametrize("route", ["image", "image_ocr"])
def test_route_m_is_its_source_class_on_route_m_weights(qwen25_vl_family, routes, images, route):
    """Two task fine-tunes of one Qwen2.5-VL as two image routes (`<image>` and `<image_ocr>`, its own
    placeholder): under route(m), logits and greedy generation equal the source class on route m's
    LLM weights with its own inputs."""
    kind = {"image": "qwen2_5_vl", "image_ocr": "qwen2_5_vl_ocr"}[route]
    proc, model = CompositeProcessor.from_pretrained(routes), CompositeModel.from_pretrained(routes)
    assert proc.placeholders == {"image": "<|image_pad|>", "image_ocr": "<|image_ocr_pad|>"}
    inputs = proc(PROMPTS[0].replace("<image>", f"<{route}>"), media={route: images[0][:2]})
    src = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen25_vl_family.sources[kind]).eval()
    load_route_weights(src, routes, route)
    batch = source_inputs(qwen25_vl_family.sources[kind], PROMPTS[:1], images[1][:2])
    opts = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), model.route(route):
        got = model(**inputs).logits
        new = model.generate(**inputs, **opts, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = src(**batch).logits
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)
    assert_generates_like(new, src, batch, opts)


def hub_style_copy(src, out):
    """A copy of a stand-in whose config.json is laid out as the Hub's Qwen2-VL-7B-Instruct /
    Qwen2.5-VL-7B-Instruct ones are: the LLM's fields at the top level (no text_config),
    `rope_theta` + `rope_scaling: {type: mrope}`, vision_config nested; tensors as saved (legacy keys)."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    (out / "config.json").write_text(json.dumps({**cfg, **text, "rope_theta": rope["rope_theta"], "rope_scaling": {
        "type": "mrope", "mrope_section": rope["mrope_section"]}}))
    return out


def test_a_hub_style_legacy_config_as_the_base(qwen25_vl_family, images, tmp_path):
    """The base a Hub user names (Qwen/Qwen2.5-VL-7B-Instruct): an MLLM whose config.json keeps the
    LLM's fields at the top level (no text_config) and `rope_scaling: {type: mrope}`; its text config
    comes from its transformers class, and the composite still equals its source."""
    fam = qwen25_vl_family
    base = hub_style_copy(fam.sources["qwen2_5_vl"], tmp_path / "base")
    out = compose({"merge_method": "mmer", "base_model": str(base),
                   "models": [{"model": str(fam.sources["qwen2_5_vl_ocr"]), "modality": "image"}]}, str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "qwen2_5_vl_text"
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    with torch.no_grad():
        got = model(**proc(PROMPTS[0], images=images[0][:2])).logits
    src = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(fam.sources["qwen2_5_vl_ocr"]).eval()
    with torch.no_grad():
        want = src(**source_inputs(fam.sources["qwen2_5_vl_ocr"], PROMPTS[:1], images[1][:2])).logits
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)


def test_sources_with_different_language_models_are_refused(fams, tmp_path):
    out = compose(composite_config(fams["qwen2_5_vl"], "mmer", ["qwen2_5_vl", "qwen2_5_vl_ocr"]), str(tmp_path / "c"))
    cfg = tmp_path / "c" / "modalities" / "image_ocr" / "config.json"
    data = json.loads(cfg.read_text())
    data["text_config"]["rope_parameters"]["mrope_section"] = [1, 2, 1]
    cfg.write_text(json.dumps(data))
    with pytest.raises(CompositionError, match=r"image_ocr/config.json and .*image/config.json: their language "
                                               r"models differ \(rope_parameters\)"):
        CompositeModel.from_pretrained(out)


def test_the_merged_llm_builds_from_its_config_for_hub_validation(routes):
    """The composite's config.json names the source's text model (`qwen2_5_vl_text`), which
    AutoModelForCausalLM does not know: Hub validation builds the family's class (`Family.causal_lms`)
    and checks the merged LLM's tensors against it."""
    from mergekit_multimodal.hub import validate_for_push

    assert json.loads((Path(routes) / "config.json").read_text())["model_type"] == "qwen2_5_vl_text"
    assert "model.safetensors" in validate_for_push(routes)
