"""LLaVA-OneVision / LLaVA-Video (`LlavaOnevisionForConditionalGeneration`): the composite's video
frames against a hand computation of LlavaOnevisionVideoProcessor's steps (its class needs
torchvision), and an image route + a video route of one composite, each equal under route(m) to
its source class on route m's weights with the same inputs. Single-source composites against the
source class are in tests/test_processor.py."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from tests.helpers import composite_config, load_route_weights

V0 = 96
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def ov(onevision_family):
    return onevision_family


@pytest.fixture(scope="module")
def composite(ov, tmp_path_factory):
    return compose(composite_config(ov, "mmer", ["llava_onevision", "llava_video"]),
                   str(tmp_path_factory.mktemp("c") / "c"))


def frames(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (3, 30, 41, 3), dtype=np.uint8)


def test_video_frames_follow_the_video_processors_steps(composite, tmp_path):
    np.save(tmp_path / "v.npy", frames())
    got = CompositeProcessor.from_pretrained(composite)("<video>", videos=[tmp_path / "v.npy"])
    pixels = got["media"]["video"]["pixel_values_videos"]
    # by hand: bicubic resize to 56 x 56 (no crop), / 255, normalise with CLIP's mean and std
    want = np.stack([((np.asarray(Image.fromarray(f).resize((56, 56), Image.BICUBIC)) / 255 - MEAN) / STD)
                     .transpose(2, 0, 1) for f in frames()])[None]
    np.testing.assert_allclose(pixels.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("route", ["image", "video"])
def test_route_m_is_its_source_class_on_route_m_weights(ov, composite, tmp_path, route):
    """The image route (LLaVA-OneVision) and the video route (LLaVA-Video) of one composite: under
    route(m) a prompt with its media equals the source class with route m's LLM weights, given the
    same processor outputs (anyres tiles and image_sizes; pixel_values_videos)."""
    kind = {"image": "llava_onevision", "video": "llava_video"}[route]
    proc, model = CompositeProcessor.from_pretrained(composite), CompositeModel.from_pretrained(composite)
    if route == "image":
        Image.fromarray(frames()[0]).save(tmp_path / "x.png")
        inputs = proc("w1 <image> w2", images=[tmp_path / "x.png"])
    else:
        np.save(tmp_path / "v.npy", frames())
        inputs = proc("w1 <video> w2", videos=[tmp_path / "v.npy"])
    assert inputs["media"][route].keys() == ({"pixel_values", "image_sizes", "batch_num_images"} if route == "image"
                                             else {"pixel_values_videos"})
    with torch.no_grad(), model.route(route):
        got = model(**inputs).logits
    src = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(ov.sources[kind]).eval()
    load_route_weights(src, composite, route)
    n = model.encoders[route].features(inputs["media"][route])[0].shape[0]
    token = "<image>" if route == "image" else "<video>"
    ids = transformers.AutoTokenizer.from_pretrained(ov.sources[kind])(
        "w1 " + " ".join([token] * n) + " w2", return_tensors="pt").input_ids
    with torch.no_grad():
        want = src(input_ids=ids, **inputs["media"][route]).logits
    assert got.shape[1] == want.shape[1]
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)


def test_a_cropping_video_config_is_refused_naming_the_file(composite, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(composite, out)
    cfg = out / "modalities" / "video" / "video_preprocessor_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "do_center_crop": True}))
    with pytest.raises(CompositionError, match=r"video_preprocessor_config.json: do_center_crop is set"):
        CompositeProcessor.from_pretrained(str(out))
    cfg.write_text(json.dumps({"size": {"shortest_edge": 56}}))
    with pytest.raises(CompositionError, match=r"video_preprocessor_config.json: size must be"):
        CompositeProcessor.from_pretrained(str(out))


def own_processor(src, monkeypatch):
    """The source's own LlavaOnevisionProcessor on its stored image processor and tokenizer. Its
    constructor checks every part's class, and the video processor's lookup needs torchvision; this
    image-only use does without one, so that check is skipped here."""
    monkeypatch.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    cfg = transformers.AutoConfig.from_pretrained(src)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return transformers.LlavaOnevisionProcessor(
        transformers.AutoImageProcessor.from_pretrained(src), transformers.AutoTokenizer.from_pretrained(src), None,
        num_image_tokens=side * side, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_aspect_ratio=cfg.vision_aspect_ratio)


def test_several_images_in_one_prompt_as_the_sources_processor_lays_them_out(ov, tmp_path, monkeypatch):
    """Two images in one prompt are not tiled (each a padded square, its base view and one
    image_newline), a prompt's single image is; one batch holds both. Each row equals the source
    class on its own processor's inputs for that prompt, its images given as the prompt's list (as
    its chat template gives them)."""
    out = compose(composite_config(ov, "mmer", ["llava_onevision"]), str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    arrays = [frames(1)[0], frames(2)[0][:, :20], frames(3)[0]]
    files = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    prompts = ["w1 <image> w2 <image> w3", "w4 <image> w5"]
    inputs = proc(prompts, images=files)
    assert inputs["media"]["image"]["batch_num_images"].tolist() == [2, 1]
    with torch.no_grad():
        got = model(**inputs).logits
    src = ov.sources["llava_onevision"]
    own, source = own_processor(src, monkeypatch), transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(src).eval()
    lengths = []
    for b, (prompt, images) in enumerate(zip(prompts, ([arrays[0], arrays[1]], [arrays[2]]))):
        batch = own(text=prompt, images=[[Image.fromarray(a) for a in images]], return_tensors="pt")
        with torch.no_grad():
            want = source(**batch).logits
        lengths.append(want.shape[1])
        torch.testing.assert_close(got[b, -want.shape[1]:, :V0], want[0, :, :V0], rtol=1e-4, atol=1e-4)
    assert lengths[0] == got.shape[1] == 3 + 2 * (16 + 1)  # w1 w2 w3, two base views and their image_newline
    assert lengths[1] > 2 + 16 + 1  # the single image is tiled
    # media built for other prompts: the grouping does not match, which is an error, not another layout
    apart = proc(["w1 <image>", "w2 <image>"], images=files[:2])
    with pytest.raises(CompositionError, match=r"batch_num_images \[1, 1\] does not match .* \[2\]"):
        model(input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1], media=apart["media"])
