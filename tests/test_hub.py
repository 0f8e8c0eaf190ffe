"""Pushing to the Hub, for real: huggingface_hub's own client against a local Hub server.

The server is `tests.hub_server.FakeHub` (create repo, branch, README validation, preupload, the
LFS batch API with basic and multipart transfers, the ndjson commit); every pushed file is
compared byte for byte with the local one. Nothing of huggingface_hub is mocked; only its
constants are pointed at the server (HF_ENDPOINT) and Xet is switched off. The model card's
tests are here too.
"""

import importlib
import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard
from mergekit.options import MergeOptions

from mergekit_multimodal import compose, hub
from mergekit_multimodal.compose.card import CardSource, build_card, hub_ids, pipeline_tag
from mergekit_multimodal.cli import main as mergekit_mm_yaml
from mergekit_multimodal.cli import push_main as mergekit_mm_push
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.testing import build_tiny_family, perturb_like
from tests.helpers import composite_config
from tests.hub_server import LFS_THRESHOLD, PART_SIZE, UPLOAD_ROUTES, FakeHub, api_auth, point_huggingface_hub_at

# the module the retries read RETRY_BASE_WAIT from
hub_upload = importlib.import_module("mergekit_multimodal.hub.upload")

# huggingface_hub's own LFS PUT passes a file object as `data=`, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running FakeHub, with huggingface_hub pointed at it (env and constants) and Xet off."""
    server = FakeHub(tmp_path / "hub")
    point_huggingface_hub_at(server, monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    monkeypatch.setattr(hub_upload, "RETRY_BASE_WAIT", 0.01)
    yield server
    server.close()


@pytest.fixture(scope="module")
def composite(family, tmp_path_factory):
    """An MMER composite (image + audio) with sharded merged LLM, routes and modality weights."""
    out = tmp_path_factory.mktemp("push") / "comp"
    return Path(compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(out),
                        MergeOptions(out_shard_size=4000, quiet=True)))


def run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_same_files(local: Path, remote: dict):
    want = sorted(hub.list_upload_files(str(local)))
    assert sorted(remote) == want
    for rel in want:
        assert remote[rel] == (local / rel).read_bytes(), rel


# -- pushing ----------------------------------------------------------------------------------


def test_push_sends_every_file_byte_identical(fake_hub, composite):
    assert len(list(composite.glob("model-*.safetensors"))) > 1  # sharded, with an index
    r = run(mergekit_mm_push, composite, "org/comp", "--token", "hf_explicit")
    assert r.exit_code == 0, r.output
    assert_same_files(composite, fake_hub.files("org/comp"))
    assert not fake_hub.repos["org/comp"]["private"]
    # safetensors went through LFS (binary), JSON/markdown/YAML as regular blobs, as on the Hub
    assert {p for p, mode in fake_hub.modes.items() if mode == "lfsFile"} == {
        p for p in fake_hub.files("org/comp") if p.endswith(".safetensors")}
    assert any(p.startswith("routes/") for p in fake_hub.modes)
    assert api_auth(fake_hub) == {"Bearer hf_explicit"}
    assert "model.safetensors.index.json" in r.output and "Pushed" in r.output
    assert fake_hub.routes().count("commit") == 1
    # and huggingface_hub sees the repo as pushed
    info = huggingface_hub.HfApi(endpoint=fake_hub.url).model_info("org/comp")
    assert sorted(s.rfilename for s in info.siblings) == hub.list_upload_files(str(composite))


def test_token_comes_from_huggingface_hub_lookup(fake_hub, composite):
    r = run(mergekit_mm_push, composite, "org/comp")
    assert r.exit_code == 0, r.output
    assert api_auth(fake_hub) == {"Bearer hf_from_env"}


def test_yaml_push_to_a_private_branch(fake_hub, family, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(composite_config(family, "naive_mc", ["llava", "video_llava"])))
    r = run(mergekit_mm_yaml, cfg, tmp_path / "out", "--push-to-hub", "org/nmc", "--private", "--revision", "dev",
            "--quiet")
    assert r.exit_code == 0, r.output
    repo = fake_hub.repos["org/nmc"]
    assert repo["private"] and repo["branches"]["main"] == {}
    assert_same_files(tmp_path / "out", repo["branches"]["dev"])
    assert fake_hub.routes()[:2] == ["create-repo", "branch"]


def test_push_to_an_existing_repo_and_branch(fake_hub, composite):
    for _ in range(2):
        r = run(mergekit_mm_push, composite, "org/comp", "--revision", "dev")
        assert r.exit_code == 0, r.output
    assert_same_files(composite, fake_hub.files("org/comp", "dev"))
    # the second push found every LFS object stored: no object was sent twice
    assert fake_hub.routes().count("lfs-put") + fake_hub.routes().count("lfs-complete") == len(fake_hub.lfs)


def test_a_name_without_namespace_goes_to_the_users_namespace(fake_hub, composite):
    assert hub.push(str(composite), "comp", endpoint=fake_hub.url, echo=lambda s: None).startswith(fake_hub.url)
    assert_same_files(composite, fake_hub.files("user/comp"))


def test_push_plain_mergekit_merge(fake_hub, family, tmp_path):
    models = [perturb_like(family.base, tmp_path / f"ft{i}", seed=i) for i in range(2)]
    cfg = tmp_path / "plain.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                   "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in models]}))
    r = run(mergekit_mm_yaml, cfg, tmp_path / "out", "--push-to-hub", "org/plain", "--out-shard-size", "20K")
    assert r.exit_code == 0, r.output
    assert_same_files(tmp_path / "out", fake_hub.files("org/plain"))


def test_files_over_the_lfs_threshold_go_through_multipart_lfs(fake_hub, tmp_path):
    """A merged LLM of >10 MB: the server asks for LFS multipart; the bytes still arrive intact."""
    fam = build_tiny_family(tmp_path / "big", ("llava",), hidden_size=448)
    out = Path(compose(composite_config(fam, "naive_mc", ["llava"]), str(tmp_path / "big-comp"),
                       MergeOptions(quiet=True)))
    big = out / "model.safetensors"
    assert big.stat().st_size > LFS_THRESHOLD
    hub.push(str(out), "org/big", endpoint=fake_hub.url, echo=lambda s: None)
    assert_same_files(out, fake_hub.files("org/big"))
    assert fake_hub.routes().count("lfs-part") >= -(-big.stat().st_size // PART_SIZE)
    assert "lfs-complete" in fake_hub.routes()


def test_a_transient_commit_failure_is_retried(fake_hub, composite):
    fake_hub.fail("commit", 503)
    r = run(mergekit_mm_push, composite, "org/comp")
    assert r.exit_code == 0, r.output
    assert "retrying" in r.output and "503" in r.output
    assert fake_hub.routes().count("commit") == 2
    assert_same_files(composite, fake_hub.files("org/comp"))


def test_transient_failures_of_create_repo_and_rate_limits_are_retried(fake_hub, composite):
    fake_hub.fail("create-repo", 502, 429)
    r = run(mergekit_mm_push, composite, "org/comp")
    assert r.exit_code == 0, r.output
    assert fake_hub.routes().count("create-repo") == 3


def test_a_persistent_failure_is_an_error_after_the_retries(fake_hub, composite):
    fake_hub.fail("commit", *[503] * hub.RETRY_ATTEMPTS)
    r = run(mergekit_mm_push, composite, "org/comp")
    assert r.exit_code == 2
    assert "error: push of" in r.output and "503" in r.output
    assert fake_hub.routes().count("commit") == hub.RETRY_ATTEMPTS
    assert fake_hub.files("org/comp") == {}


def test_a_failed_push_after_a_merge_keeps_the_merge_and_says_how_to_retry(fake_hub, family, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(composite_config(family, "naive_mc", ["llava"])))
    fake_hub.fail("create-repo", 401)
    r = run(mergekit_mm_yaml, cfg, tmp_path / "out", "--push-to-hub", "org/x", "--quiet")
    assert r.exit_code == 2 and "401" in r.output and f"mergekit-mm-push {tmp_path / 'out'} org/x" in r.output
    assert hub.validate_for_push(str(tmp_path / "out"))
    assert fake_hub.routes() == ["create-repo", "model-info"]  # on 401 huggingface_hub checks whether it exists


def test_an_unreachable_hub_is_retried_then_an_error(fake_hub, composite):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = run(mergekit_mm_push, composite, "org/comp", "--endpoint", dead)
    assert r.exit_code == 2 and f"failed after {hub.RETRY_ATTEMPTS} attempts" in r.output
    assert r.output.count("create_repo: ") == hub.RETRY_ATTEMPTS - 1  # one line per retry


def test_a_refusal_is_not_retried(fake_hub, composite):
    fake_hub.fail("preupload", 403)
    r = run(mergekit_mm_push, composite, "org/comp")
    assert r.exit_code == 2 and "403" in r.output
    assert fake_hub.routes().count("preupload") == 1 and "commit" not in fake_hub.routes()


# -- refusing incomplete composites -------------------------------------------------------------


def _rm(p):
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _first(root, pattern):
    return sorted(root.glob(pattern))[0]


def _drop_from_index(root):
    index = root / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"]["not.a.tensor"] = data["weight_map"][name]
    index.write_text(json.dumps(data))
    return index


def _rewrite(file, edit):
    """Rewrite a safetensors file with `edit(tensors)` applied (a tensor dropped, shortened, poisoned)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _drop_llm_tensor(root):
    """A tensor gone from its shard AND the index: only the config says it should be there."""
    index = root / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(root / data["weight_map"].pop(name), lambda t: t.pop(name))
    index.write_text(json.dumps(data))


def _poison_llm(root):
    data = json.loads((root / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(root / data["weight_map"][name], lambda t: t[name].view(-1).__setitem__(3, float("inf")))


def _halve_mask(root):
    def edit(t):
        key = "image/model.layers.0.mlp.down_proj.weight"
        t[key] = t[key][: t[key].numel() // 2].clone()

    _rewrite(_first(root / "routes", "masks*.safetensors"), edit)


def _drop_encoder_tensor(root):
    """From its shard and (when sharded) the index."""
    name, d = "multi_modal_projector.linear_2.weight", root / "modalities" / "image"
    index = d / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        _rewrite(d / data["weight_map"].pop(name), lambda t: t.pop(name))
        index.write_text(json.dumps(data))
    else:
        _rewrite(d / "model.safetensors", lambda t: t.pop(name))


CORRUPTIONS = {
    "LLM tensor missing from shard and index": (_drop_llm_tensor, "model.layers.0.mlp.down_proj.weight"),
    "inf in the merged LLM": (_poison_llm, "model.layers.1.self_attn.q_proj.weight"),
    "half-length mask": (_halve_mask, "image/model.layers.0.mlp.down_proj.weight"),
    "encoder tensor missing": (_drop_encoder_tensor, "multi_modal_projector.linear_2.weight"),
    "no composite_config.json": (lambda c: _rm(c / "composite_config.json"), "composite_config.json"),
    "composite_config.json not JSON": (lambda c: (c / "composite_config.json").write_text("{"), "composite_config.json"),
    "modality dir missing": (lambda c: _rm(c / "modalities" / "audio"), "modalities/audio"),
    "modality config missing": (lambda c: _rm(c / "modalities" / "image" / "config.json"), "image/config.json"),
    "modality weights missing": (lambda c: [_rm(p) for p in (c / "modalities" / "image").glob("model*")], "image"),
    "shard missing": (lambda c: _rm(_first(c, "model-*.safetensors")), "model.safetensors.index.json"),
    "shard truncated": (lambda c: _truncate(_first(c, "model-*.safetensors")), "model-0000"),
    "route masks truncated": (lambda c: _truncate(_first(c / "routes", "masks*.safetensors")), "masks"),
    "routes missing": (lambda c: _rm(c / "routes"), "routes"),
    "index names a tensor its shard lacks": (_drop_from_index, "not.a.tensor"),
    "no model card": (lambda c: _rm(c / "README.md"), "README.md"),
    "merged LLM config missing": (lambda c: _rm(c / "config.json"), "config.json"),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_an_incomplete_composite_is_refused_before_any_request(fake_hub, composite, tmp_path, what):
    broken = tmp_path / "broken"
    shutil.copytree(composite, broken)
    corrupt, named = CORRUPTIONS[what]
    corrupt(broken)
    with pytest.raises(CompositionError, match=re.escape(named)):
        hub.validate_for_push(str(broken))
    r = run(mergekit_mm_push, broken, "org/comp")
    assert r.exit_code == 2 and r.output.startswith("error: ") and named in r.output
    assert fake_hub.log == []  # not one request: no repo created, nothing uploaded
    assert not any(route in UPLOAD_ROUTES for route in fake_hub.routes())


def test_push_to_hub_needs_the_model_card(fake_hub, family, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(composite_config(family, "naive_mc", ["llava"])))
    r = run(mergekit_mm_yaml, cfg, tmp_path / "out", "--push-to-hub", "org/x", "--no-write-model-card")
    assert r.exit_code == 2 and "model card" in r.output
    assert not (tmp_path / "out").exists() and fake_hub.log == []


def test_push_options_need_push_to_hub(family, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(composite_config(family, "naive_mc", ["llava"])))
    r = run(mergekit_mm_yaml, cfg, tmp_path / "out", "--private")
    assert r.exit_code == 2 and "--push-to-hub" in r.output


def test_transient_errors_are_told_apart():
    class Response:
        def __init__(self, status):
            self.status_code, self.headers = status, {}

    def http_error(status):  # what matters of huggingface_hub's HfHubHTTPError: .response.status_code
        err = OSError(f"HTTP {status}")
        err.response = Response(status)
        return err

    assert hub.is_transient(ConnectionError()) and hub.is_transient(TimeoutError())
    assert all(hub.is_transient(http_error(s)) for s in (408, 429, 500, 502, 503, 504))
    assert not any(hub.is_transient(http_error(s)) for s in (400, 401, 403, 404, 409, 422))
    assert not hub.is_transient(ValueError("bad repo id"))


def test_console_scripts_are_declared():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("mergekit-mm-yaml", "mergekit-mm-push"):
        module, attr = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), attr))


# -- the model card -----------------------------------------------------------------------------

HUB_SOURCES = [
    CardSource("image", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", "<image>", "llava"),
    CardSource("video", "LanguageBind/Video-LLaVA-7B-hf@main", "VideoLlavaForConditionalGeneration", "<video>",
               "video_llava"),
    CardSource("video_next", "llava-hf/LLaVA-NeXT-Video-7B-hf+someone/a-lora", "LlavaNextVideoForConditionalGeneration",
               "<video_next>", "llava_next_video"),
]


def test_card_front_matter_is_a_valid_hub_card(tmp_path):
    text = build_card(name="vicuna-mm", method="mmer", base_model="lmsys/vicuna-7b-v1.5", sources=HUB_SOURCES,
                      yaml_text="merge_method: mmer\n")
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == ["lmsys/vicuna-7b-v1.5", "llava-hf/llava-1.5-7b-hf", "LanguageBind/Video-LLaVA-7B-hf",
                                    "llava-hf/LLaVA-NeXT-Video-7B-hf", "someone/a-lora"]
    assert card.data.base_model_relation == "merge"
    assert set(card.data.tags) >= {"merge", "mergekit", "mergekit-multimodal", "mmer"}
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert "| video_next | `llava-hf/LLaVA-NeXT-Video-7B-hf+someone/a-lora` |" in card.text
    assert "merge_method: mmer" in card.text
    assert "CompositeModel.from_pretrained(path)" in card.text and "model.generate(ids, media=media" in card.text


def test_card_lists_no_local_paths(family, tmp_path):
    """Composed from local directories: no base_model at all (a Hub card can't point at a path)."""
    out = Path(compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path / "c"),
                       MergeOptions(quiet=True)))
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
    assert card.data.pipeline_tag == "any-to-any" and "mmer" in card.data.tags
    assert "\\<\\|AUDIO\\|>" not in card.text and "<\\|AUDIO\\|>" in card.text  # escaped inside the table
    assert card.text.count(str(family.sources["llava"])) >= 1


def test_hub_ids_are_decided_by_shape_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "model").mkdir()
    assert hub_ids(["org/model", "org/model@v2", "local/model", "/abs/path", "~/x", "./x", "a/b/c", "org/m+org/lora",
                    "bad--name/x"]) == ["org/model", "org/m", "org/lora"]


@pytest.mark.parametrize("kinds,tag", [
    (["llava"], "image-text-to-text"), (["llava", "video_llava"], "image-text-to-text"),
    (["llava_next_video"], "video-text-to-text"), (["qwen2_audio", "voxtral"], "audio-text-to-text"),
    (["mistral3", "voxtral"], "any-to-any"),
])
def test_pipeline_tag_fits_the_modalities(kinds, tag):
    names = {"llava": "pic", "video_llava": "clip", "llava_next_video": "clip2", "qwen2_audio": "speech",
             "voxtral": "speech2", "mistral3": "photo"}
    assert pipeline_tag([CardSource(names[k], "x", family=k) for k in kinds]) == tag
