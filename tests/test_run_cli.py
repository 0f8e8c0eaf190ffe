"""`mergekit-mm-run`: the printed answer is the source model's own greedy answer; errors exit non-zero."""

import pytest
import torch
import transformers
from click.testing import CliRunner
from PIL import Image

from mergekit_multimodal import compose
from mergekit_multimodal.run import main
from tests.helpers import composite_config
from tests.test_processor import write_media


@pytest.fixture(scope="module")
def llava_composite(family, tmp_path_factory):
    return compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path_factory.mktemp("c") / "c"))


@pytest.mark.parametrize("route", [["--route", "image"], []])  # default auto: an image-only prompt -> image route
def test_answer_equals_the_source_models_greedy_answer(family, llava_composite, tmp_path, route):
    img, arr = write_media("image", tmp_path)
    res = CliRunner().invoke(main, [llava_composite, "--image", str(img), *route, "--device", "cpu",
                                    "--max-new-tokens", "5", "w1 <image> w2 w3"])
    assert res.exit_code == 0, res.output

    src = family.sources["llava"]
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    pixels = transformers.AutoImageProcessor.from_pretrained(src)(images=[Image.fromarray(arr)], return_tensors="pt")
    ids = tok("w1 " + " ".join(["<image>"] * 4) + " w2 w3", return_tensors="pt").input_ids  # 28 px / 14 = 2x2 patches
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels["pixel_values"], max_new_tokens=5, do_sample=False)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert want and res.stdout.strip() == want


def test_placeholders_are_added_when_the_prompt_has_none(llava_composite, tmp_path):
    img, _ = write_media("image", tmp_path)
    wav, _ = write_media("audio", tmp_path)
    bare = CliRunner().invoke(main, [llava_composite, "--image", str(img), "--audio", str(wav), "--device", "cpu",
                                     "--max-new-tokens", "3", "w5 w6"])
    explicit = CliRunner().invoke(main, [llava_composite, "--media", f"image={img}", "--media", f"audio={wav}",
                                         "--device", "cpu", "--max-new-tokens", "3", "<image> <|AUDIO|> w5 w6"])
    assert bare.exit_code == 0 and explicit.exit_code == 0, bare.output + explicit.output
    assert bare.stdout.strip() and bare.stdout == explicit.stdout


def test_auto_route_is_per_token_for_a_two_modality_prompt(llava_composite, tmp_path, monkeypatch):
    """auto picks a whole-input route only when every item is of one modality."""
    from mergekit_multimodal.runtime import CompositeModel

    img, _ = write_media("image", tmp_path)
    wav, _ = write_media("audio", tmp_path)
    entered = []
    real = CompositeModel.route
    monkeypatch.setattr(CompositeModel, "route", lambda self, m: entered.append(m) or real(self, m))
    for args in (["--image", str(img), "--audio", str(wav)], ["--image", str(img)], ["--image", str(img), "--route",
                                                                                     "per-token"]):
        res = CliRunner().invoke(main, [llava_composite, *args, "--device", "cpu", "--max-new-tokens", "2", "w5"])
        assert res.exit_code == 0, res.output
    assert entered == [None, "image", None]


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png", "w1"], "image file not found: missing.png"),
    (["--video", "x.npy", "w1"], "a video given without its modality is ambiguous"),
    (["--media", "image", "w1"], "expected MODALITY=PATH"),
    (["--media", "smell=x.npy", "w1"], "has no modality 'smell'"),
    (["w1 <image>"], "1 '<image>' placeholder(s) but 0 image item(s)"),
    (["--route", "smell", "w1"], "no route 'smell'"),
])
def test_bad_input_exits_non_zero_with_a_clear_message(llava_composite, args, message):
    res = CliRunner().invoke(main, [llava_composite, "--device", "cpu", *args])
    assert res.exit_code != 0
    assert message in res.output, res.output


def test_a_corrupt_composite_part_is_named(family, tmp_path):
    out = compose(composite_config(family, "mmer", ["llava"]), str(tmp_path / "c"))
    (tmp_path / "c" / "routes" / "masks.safetensors").write_bytes(b"broken")
    img, _ = write_media("image", tmp_path)
    res = CliRunner().invoke(main, [out, "--device", "cpu", "--image", str(img), "w1"])
    assert res.exit_code != 0 and "masks" in res.output, res.output


def test_auto_route_picks_a_whole_input_route_only_for_one_modality_on_mmer():
    from mergekit_multimodal.format.manifest import Manifest, RoutesEntry
    from mergekit_multimodal.runtime import auto_route

    def manifest(kind=None):  # only the fields auto_route reads
        return Manifest.model_construct(modalities={"image": {}, "audio": {}},
                                        routes=RoutesEntry(kind=kind, dir="routes") if kind else None)

    assert auto_route(manifest("mmer"), ["image", "image"]) == "image"
    assert auto_route(manifest("mmer"), ["image", "audio"]) is None
    assert auto_route(manifest("mmer"), []) is None  # text only: merged LLM
    assert auto_route(manifest("damc"), ["image"]) is None  # text needs its adapters
    assert auto_route(manifest(), ["image"]) is None  # NaiveMC: one route
