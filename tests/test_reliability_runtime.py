"""Adversarial inputs to loading, pushing and running (docs/reliability.md, "Loading, pushing, running"), table-driven.

Each case damages a copy of a tiny composite (or a media file, or a command line) and asserts the
promise: a CompositionError / one `error:` line naming the file, tensor or key, the documented
exit code, no traceback, and nothing sent or written. Valid composites keep loading (the other
test files check their logits).
"""

import json
import shutil
import socket
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_multimodal import compose
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.evaluation.cli import main as eval_main
from mergekit_multimodal.families import point_cloud as PC
from mergekit_multimodal.hub import upload as hub_upload
from mergekit_multimodal.run import main as run_main
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.runtime import media as media_mod
from tests.helpers import composite_config
from tests.test_processor import write_media


@pytest.fixture(scope="module")
def composite(family, tmp_path_factory):
    """MMER, image + audio, single-file streams (model.safetensors, routes/*.safetensors)."""
    return Path(compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]),
                        str(tmp_path_factory.mktemp("rel") / "c")))


def _copy(composite, tmp_path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(composite, out)
    return out


def _edit(file: Path, fn) -> None:
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _add_affixes(c: Path, data: bytes = None, tensors=None) -> Path:
    """Declare a prefix/suffix file for the image modality (as DAMC writes) and write it."""
    file = c / "modalities" / "image" / "prefix_suffix.safetensors"
    if tensors is not None:
        save_file(tensors, str(file))
    else:
        file.write_bytes(data)
    cfg = json.loads((c / "composite_config.json").read_text())
    cfg["modalities"]["image"]["prefix_suffix"] = "modalities/image/prefix_suffix.safetensors"
    (c / "composite_config.json").write_text(json.dumps(cfg))
    return file


LLM = "model.layers.0.mlp.down_proj.weight"
HIDDEN = 16  # the tiny family's hidden size

# name -> (damage(c), words the error must contain)
LOAD_FAULTS = {
    "LLM tensor missing": (lambda c: _edit(c / "model.safetensors", lambda t: t.pop(LLM)),
                           ["model.safetensors", LLM, "missing"]),
    "LLM tensor unexpected": (lambda c: _edit(c / "model.safetensors", _set("model.extra.weight", torch.zeros(2))),
                              ["model.safetensors", "model.extra.weight", "unexpected"]),
    "LLM tensor mis-shaped": (lambda c: _edit(c / "model.safetensors", _set("model.norm.weight", torch.ones(3))),
                              ["model.safetensors", "model.norm.weight", "(3,)"]),
    "encoder tensor missing": (lambda c: _edit(c / "modalities/image/model.safetensors",
                                               lambda t: t.pop("multi_modal_projector.linear_2.weight")),
                               ["modalities/image/model.safetensors", "multi_modal_projector.linear_2.weight"]),
    "encoder tensor unexpected": (lambda c: _edit(c / "modalities/audio/model.safetensors",
                                                  _set("audio_tower.bogus.weight", torch.zeros(2))),
                                  ["modalities/audio/model.safetensors", "bogus", "unexpected"]),
    "task vector missing": (lambda c: _edit(c / "routes/task_vector.safetensors", lambda t: t.pop(LLM)),
                            ["task_vector.safetensors", LLM, "missing"]),
    "mask half length": (lambda c: _edit(c / "routes/masks.safetensors",
                                         lambda t: t.__setitem__(f"audio/{LLM}", t[f"audio/{LLM}"][:3].clone())),
                         ["masks.safetensors", f"audio/{LLM}"]),
    "mask of another modality": (lambda c: _edit(c / "routes/masks.safetensors",
                                                 _set(f"smell/{LLM}", torch.zeros(1, dtype=torch.uint8))),
                                 ["masks.safetensors", f"smell/{LLM}", "unexpected"]),
    "NaN in the task vector": (lambda c: _edit(c / "routes/task_vector.safetensors",
                                               lambda t: t[LLM].view(-1).__setitem__(0, float("nan"))),
                               ["task_vector.safetensors", LLM, "non-finite"]),
    "scale not a scalar": (lambda c: _edit(c / "routes/masks.safetensors",
                                           _set(f"image/{LLM}:scale", torch.ones(2))),
                           ["masks.safetensors", f"image/{LLM}:scale"]),
    "inf scale": (lambda c: _edit(c / "routes/masks.safetensors",
                                  _set(f"image/{LLM}:scale", torch.tensor(float("inf")))),
                  ["masks.safetensors", f"image/{LLM}:scale", "finite"]),
    "corrupt prefix_suffix": (lambda c: _add_affixes(c, b"\x00garbage"), ["prefix_suffix.safetensors", "unreadable"]),
    "NaN prefix": (lambda c: _add_affixes(c, tensors={"prefix": torch.full((2, HIDDEN), float("nan"))}),
                   ["prefix_suffix.safetensors", "'prefix'", "non-finite"]),
    "prefix of the wrong width": (lambda c: _add_affixes(c, tensors={"prefix": torch.zeros(2, HIDDEN + 1)}),
                                  ["prefix_suffix.safetensors", "'prefix'", f"[n, {HIDDEN}]"]),
    "manifest is a list": (lambda c: (c / "composite_config.json").write_text("[]"),
                           ["composite_config.json", "JSON object"]),
    "manifest lacks modalities": (
        lambda c: (c / "composite_config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((c / "composite_config.json").read_text()).items() if k != "modalities"})),
        ["composite_config.json", "modalities"]),
}


@pytest.mark.parametrize("fault", sorted(LOAD_FAULTS))
def test_a_damaged_composite_is_refused_at_load_naming_the_culprit(composite, tmp_path, fault):
    damage, words = LOAD_FAULTS[fault]
    c = _copy(composite, tmp_path)
    damage(c)
    with pytest.raises(CompositionError) as err:
        CompositeModel.from_pretrained(str(c))
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("fault", ["LLM tensor missing", "mask half length", "corrupt prefix_suffix",
                                   "manifest is a list", "manifest lacks modalities", "encoder tensor missing"])
def test_run_prints_one_error_line_and_exits_1(composite, tmp_path, fault):
    damage, words = LOAD_FAULTS[fault]
    c = _copy(composite, tmp_path)
    damage(c)
    r = CliRunner().invoke(run_main, [str(c), "--device", "cpu", "w1"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output and not isinstance(r.exception, CompositionError)
    assert all(w in errors[0] for w in words), errors


def test_debug_shows_the_traceback(composite, tmp_path, monkeypatch):
    c = _copy(composite, tmp_path)
    (c / "composite_config.json").write_text("[]")
    r = CliRunner().invoke(run_main, [str(c), "--device", "cpu", "--debug", "w1"])
    assert isinstance(r.exception, CompositionError)
    monkeypatch.setenv("MERGEKIT_MM_DEBUG", "1")
    r = CliRunner().invoke(run_main, [str(c), "--device", "cpu", "w1"])
    assert isinstance(r.exception, CompositionError)


def test_an_intact_copy_still_loads(composite, tmp_path):
    """The checks refuse only damage: the undamaged composite loads (its logits: test_runtime.py)."""
    model = CompositeModel.from_pretrained(str(_copy(composite, tmp_path)))
    assert set(model.encoders) == {"image", "audio"}


# -- the point-cloud family's own loader --------------------------------------------------------


def _point_source(d: Path) -> Path:
    cfg = PC.make_config({"hidden_size": HIDDEN}, 5)
    model = PC.PointLlavaForConditionalGeneration(cfg)
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("multi_modal_projector.linear_1.bias"), ["missing", "multi_modal_projector.linear_1.bias"]),
    (_set("point_encoder.extra", torch.zeros(1)), ["unexpected", "point_encoder.extra"]),
    (_set("point_encoder.queries", torch.zeros(3, 3)), ["point_encoder.queries", "(3, 3)"]),
])
def test_point_cloud_loader_is_strict(tmp_path, edit, words):
    d = _point_source(tmp_path / "pc")
    PC.load_encoder(str(d))  # intact: loads
    _edit(d / "model.safetensors", edit)
    with pytest.raises(CompositionError) as err:
        PC.load_encoder(str(d))
    assert "model.safetensors" in str(err.value) and all(w in str(err.value) for w in words)


# -- media --------------------------------------------------------------------------------------


def _wav(path: Path, frames: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(frames, np.int16).tobytes())
    return path


def _npy(path: Path, arr) -> Path:
    np.save(path, arr)
    return path


MEDIA_FAULTS = {
    "0-frame WAV": ("--audio", lambda d: _wav(d / "empty.wav", 0), "empty.wav: the audio is empty"),
    "NaN .npy audio": ("--audio", lambda d: _npy(d / "a.npy", np.array([0.1, np.nan, 0.2], np.float32)),
                       "a.npy: 1 value(s) are NaN or inf"),
    "inf .npy video": ("--media", lambda d: _npy(d / "v.npy", np.full((2, 8, 8, 3), np.inf, np.float32)),
                       "v.npy: 384 value(s) are NaN or inf"),
    "0-frame .npy video": ("--media", lambda d: _npy(d / "v0.npy", np.zeros((0, 8, 8, 3), np.uint8)),
                           "v0.npy: the video has no frames"),
    "empty frame folder": ("--media", lambda d: (d / "frames").mkdir() or d / "frames", "the frame folder is empty"),
}


@pytest.fixture(scope="module")
def video_composite(family, tmp_path_factory):
    return compose(composite_config(family, "naive_mc", ["llava", "video_llava", "qwen2_audio"]),
                   str(tmp_path_factory.mktemp("relv") / "c"))


@pytest.mark.parametrize("fault", sorted(MEDIA_FAULTS))
def test_bad_media_is_one_error_line_naming_the_file(video_composite, tmp_path, fault):
    flag, make, message = MEDIA_FAULTS[fault]
    path = make(tmp_path)
    arg = f"video={path}" if flag == "--media" else str(path)
    r = CliRunner().invoke(run_main, [video_composite, "--device", "cpu", flag, arg, "w1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().startswith("error: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr, r.stderr


def test_media_over_the_budget_are_refused_before_decoding(video_composite, tmp_path, monkeypatch):
    img, _ = write_media("image", tmp_path)  # 33 x 40
    proc = CompositeProcessor.from_pretrained(video_composite)
    monkeypatch.setattr(media_mod, "MAX_IMAGE_PIXELS", 33 * 40 - 1)
    with pytest.raises(CompositionError, match=r"x\.png: image of 33 x 40 .* over the budget"):
        proc("<image> w1", media={"image": [str(img)]})
    monkeypatch.setattr(media_mod, "MAX_VIDEO_FRAMES", 1)
    clip, _ = write_media("video", tmp_path)  # 2 frames
    with pytest.raises(CompositionError, match=r"x\.npy: video of 2 frames .* over the budget"):
        proc("<video> w1", media={"video": [str(clip)]})


def test_the_budget_is_documented():
    doc = (Path(__file__).parents[1] / "docs" / "runtime.md").read_text()
    for name in ("MAX_IMAGE_PIXELS", "MAX_VIDEO_FRAMES", "MAX_VIDEO_PIXELS", "MAX_AUDIO_SECONDS", "MAX_POINTS"):
        assert name in doc


@pytest.mark.parametrize("arr, message", [
    (np.array([[0.0, np.nan, 1.0]] * 4, np.float32), "pc.npy: 4 value(s) are NaN or inf"),
    (np.array([["a", "b", "c"]]), "pc.npy: a point cloud is numbers"),
])
def test_bad_point_arrays_are_named(tmp_path, arr, message):
    d = _point_source(tmp_path / "pc")
    np.save(tmp_path / "pc.npy", arr)
    with pytest.raises(CompositionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PC.preprocess_point_clouds([str(tmp_path / "pc.npy")], str(d))


# -- the command lines' shared error path ------------------------------------------------------


def _write_bench(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    (d / "benchmark.jsonl").write_text(json.dumps({"id": "q", "question": "w1", "choices": ["w1", "w2"],
                                                   "answer": 0, "media": {}}) + "\n")
    return d / "benchmark.jsonl"


CLI_FAULTS = {
    "run --device banana": (run_main, lambda c, d: [c, "--device", "banana", "w1"], "device 'banana': not a device"),
    "run --route-cache lots": (run_main, lambda c, d: [c, "--device", "cpu", "--route-cache", "lots", "w1"],
                               "route cache 'lots': expected auto, all, a number of bytes or a size such as 8GiB"),
    "run empty prompt": (run_main, lambda c, d: [c, "--device", "cpu", "  "], "the prompt is empty"),
    "run non-UTF-8 prompt": (run_main, lambda c, d: [c, "--device", "cpu", "w1 \udcff"], "not valid UTF-8"),
    "eval --device banana": (eval_main, lambda c, d: [c, str(_write_bench(d)), "--device", "banana", "--quiet"],
                             "device 'banana'"),
    "eval --out is a file": (eval_main, lambda c, d: [c, str(_write_bench(d)), "--device", "cpu", "--quiet",
                                                      "--out", str(_touch(d / "f"))], "exists and is not a directory"),
}


def _touch(p: Path) -> Path:
    p.write_text("x")
    return p


@pytest.mark.parametrize("fault", sorted(CLI_FAULTS))
def test_cli_faults_are_one_line_exit_1(composite, tmp_path, fault):
    cli, args, message = CLI_FAULTS[fault]
    r = CliRunner().invoke(cli, args(str(composite), tmp_path))
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr and "Traceback" not in r.output
    if "--out" in fault:
        assert (tmp_path / "f").read_text() == "x"  # the file is left as it was


def test_yaml_non_utf8_config_is_one_line_exit_2(tmp_path):
    from mergekit_multimodal.cli import main as yaml_main

    cfg = tmp_path / "bad.yml"
    cfg.write_bytes(b"merge_method: \xff\xfe\n")
    r = CliRunner().invoke(yaml_main, [str(cfg), str(tmp_path / "out")])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0
    assert "bad.yml: not valid UTF-8" in r.stderr and not (tmp_path / "out").exists()


# -- the network --------------------------------------------------------------------------------


def test_a_hub_that_accepts_and_never_answers_fails_in_bounded_time(composite, monkeypatch):
    """Connections are accepted (the listen backlog) and never answered: every try times out."""
    from mergekit_multimodal.cli import push_main

    monkeypatch.setenv(hub_upload.READ_TIMEOUT_ENV, "0.3")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(hub_upload, "RETRY_BASE_WAIT", 0.01)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        start = time.monotonic()
        r = CliRunner().invoke(push_main, [str(composite), "org/x", "--endpoint",
                                           f"http://127.0.0.1:{s.getsockname()[1]}"])
        took = time.monotonic() - start
    assert r.exit_code == 2 and f"failed after {hub_upload.RETRY_ATTEMPTS} attempts" in r.output
    assert "Timeout" in r.output and took < hub_upload.worst_case_seconds() + 10


def test_bounded_requests_fill_missing_timeouts_only_and_restore_the_factory():
    import httpx2
    from huggingface_hub.utils import _http

    before = _http._GLOBAL_CLIENT_FACTORY
    with hub_upload.bounded_hub_requests():
        client = _http.get_session()
        request = client.build_request("GET", "http://127.0.0.1:9/", timeout=httpx2.Timeout(5.0, connect=None))
        for hook in client.event_hooks["request"]:
            hook(request)
    assert request.extensions["timeout"] == {"connect": hub_upload.CONNECT_TIMEOUT, "read": 5.0, "write": 5.0,
                                             "pool": 5.0}
    assert _http._GLOBAL_CLIENT_FACTORY is before


def test_a_bad_timeout_setting_is_named(monkeypatch):
    monkeypatch.setenv(hub_upload.CONNECT_TIMEOUT_ENV, "soon")
    with pytest.raises(CompositionError, match="MERGEKIT_MM_HUB_CONNECT_TIMEOUT='soon'"):
        hub_upload.hub_timeouts()
