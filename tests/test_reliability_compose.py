"""Composing under bad input and faults (docs/reliability.md, "Composing"): a clear error naming the
file / key / tensor, exit 2 from `mergekit-mm-yaml`, and the output's parent directory exactly as it
was (no OUT, no `.partial-*`, no lock, the user's files intact). Every input that gets damaged here
is a copy: the session's fixtures are never touched."""

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import LoraConfig
from safetensors.torch import save_file

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.cli import main as mergekit_mm_yaml
from mergekit_multimodal.compose import engine
from mergekit_multimodal.compose.writer import PlannedShardWriter
from tests.helpers import composite_config, read_dir, read_json

KINDS = ["llava", "qwen2_audio"]
REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------------

def copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def rewrite(path: Path, fn):
    sd = read_dir(path)
    fn(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def edit_json(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def with_source(cfg, family, kind, path):
    for m in cfg["models"]:
        if m["model"] == str(family.sources[kind]):
            m["model"] = str(path)
    return cfg


def run_cli(config, out: Path, *flags):
    """`mergekit-mm-yaml` in-process; `config` a dict (dumped to YAML) or the file's raw bytes."""
    cfg_path = out.parent.parent / f"{out.name}.yml"
    if isinstance(config, bytes):
        cfg_path.write_bytes(config)
    else:
        cfg_path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(mergekit_mm_yaml, [str(cfg_path), str(out), "--quiet", *flags])


def outdir(tmp_path) -> Path:
    d = tmp_path / "outdir"
    d.mkdir()
    return d


def assert_clean_failure(r, parent: Path, before, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    for needle in needles:
        assert str(needle) in r.output, (needle, r.output)
    assert sorted(p.name for p in parent.iterdir()) == before, "the output's directory is as it was"


# -- bad inputs, table-driven: (build the damaged input) -> (config or raw YAML bytes, needles) ----------

def untied_source_without_head(family, tmp):
    src = copy(family.sources["llava"], tmp / "llava")
    rewrite(src, lambda sd: sd.pop("language_model.lm_head.weight"))
    return with_source(composite_config(family, "mmer", KINDS), family, "llava", src), [
        src / "config.json", "tie_word_embeddings", "lm_head"]


def untied_base_without_head(family, tmp):
    base = copy(family.base, tmp / "base")
    rewrite(base, lambda sd: sd.pop("lm_head.weight"))
    return composite_config(family, "mmer", KINDS) | {"base_model": str(base)}, [
        base / "config.json", "tie_word_embeddings"]


def corrupt_base_tokenizer_json(family, tmp):
    base = copy(family.base, tmp / "base")
    (base / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return composite_config(family, "mmer", KINDS) | {"base_model": str(base)}, [base / "tokenizer.json"]


def corrupt_base_tokenizer_config(family, tmp):
    base = copy(family.base, tmp / "base")
    (base / "tokenizer_config.json").write_bytes(b"\xff\xfe not json")
    return composite_config(family, "mmer", KINDS) | {"base_model": str(base)}, [base / "tokenizer_config.json"]


def missing_local_path(family, tmp):
    gone = tmp / "no" / "such" / "base"
    return composite_config(family, "mmer", KINDS) | {"base_model": str(gone)}, [gone, "does not exist"]


def _sharded(family, tmp, target):
    """A copy of the base as a one-shard index whose every entry points at `target(shard)`."""
    base = copy(family.base, tmp / "base")
    shard = "model-00001-of-00001.safetensors"
    (base / "model.safetensors").rename(base / shard)
    names = list(read_dir(base))
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: target(base / shard) for n in names}}))
    return composite_config(family, "mmer", KINDS) | {"base_model": str(base)}, index


def index_points_outside_absolute(family, tmp):
    outside = tmp / "elsewhere.safetensors"

    def target(shard):
        shutil.copy(shard, outside)
        return str(outside)
    cfg, index = _sharded(family, tmp, target)
    return cfg, [index, "outside"]


def index_points_outside_dotdot(family, tmp):
    cfg, index = _sharded(family, tmp, lambda shard: "../elsewhere.safetensors")
    return cfg, [index, "outside", "../elsewhere.safetensors"]


def index_not_json(family, tmp):
    cfg, index = _sharded(family, tmp, lambda shard: shard.name)
    index.write_text("{not json")
    return cfg, [index]


def config_json_not_utf8(family, tmp):
    src = copy(family.sources["qwen2_audio"], tmp / "audio")
    (src / "config.json").write_bytes(b'{"architectures": ["\xff\xfe"]}')
    return with_source(composite_config(family, "mmer", KINDS), family, "qwen2_audio", src), [
        src / "config.json", "UTF-8"]


def config_json_is_a_list(family, tmp):
    src = copy(family.sources["llava"], tmp / "llava")
    (src / "config.json").write_text("[1, 2]")
    return with_source(composite_config(family, "mmer", KINDS), family, "llava", src), [
        src / "config.json", "list"]


def models_is_a_number(family, tmp):
    return {"merge_method": "mmer", "base_model": str(family.base), "models": 5}, ["models", "list"]


def models_is_a_number_without_method(family, tmp):
    return {"base_model": str(family.base), "models": 5}, ["models", "list"]


def yaml_not_utf8(family, tmp):
    return b"merge_method: mmer\nbase_model: \xff\xfe\n", ["UTF-8", ".yml"]


def plain_config_unknown_method(family, tmp):
    return {"merge_method": "banana", "models": [{"model": str(family.base)}]}, ["merge_method", "banana"]


BAD_INPUTS = [untied_source_without_head, untied_base_without_head, corrupt_base_tokenizer_json,
              corrupt_base_tokenizer_config, missing_local_path, index_points_outside_absolute,
              index_points_outside_dotdot, index_not_json, config_json_not_utf8, config_json_is_a_list,
              models_is_a_number, models_is_a_number_without_method, yaml_not_utf8, plain_config_unknown_method]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_fails_cleanly(family, tmp_path, case):
    config, needles = case(family, tmp_path)
    parent = outdir(tmp_path)
    r = run_cli(config, parent / "out")
    assert_clean_failure(r, parent, [], *needles)
    assert "Repo id must be" not in r.output


def test_missing_local_path_does_not_read_as_a_hub_id(family, tmp_path):
    cfg, _ = missing_local_path(family, tmp_path)
    with pytest.raises(CompositionError, match="does not exist"):
        compose(cfg, str(tmp_path / "out"))


# -- DAMC adapters: every number checked, naming the file and the tensor --------------------------------

def _lora(d: Path, modules, seed):
    g = torch.Generator().manual_seed(seed)
    LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]).save_pretrained(str(d))
    save_file({f"base_model.model.{m}.lora_{ab}.weight": 0.1 * torch.randn(*shape, generator=g)
               for m in modules for ab, shape in (("A", (2, 16)), ("B", (16, 2)))},
              str(d / "adapter_model.safetensors"))


def damc_source(family, tmp: Path) -> Path:
    """A hand-written PEFT two-adapter source for the tiny LLaVA: text + image LoRA on q_proj,
    prefix/suffix tokens and a trained connector."""
    d = tmp / "adapters"
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    _lora(d / "text", modules, 1)
    _lora(d / "image", modules, 2)
    save_file({"prefix_tokens.image": torch.randn(2, 16), "suffix_tokens.image": torch.randn(1, 16)},
              str(d / "prefix_suffix.safetensors"))
    llava = read_dir(family.sources["llava"])
    save_file({k: v + 0.01 for k, v in llava.items() if k.startswith("multi_modal_projector.")},
              str(d / "connector.safetensors"))
    return d


def damc_config(family, adapters):
    return {"merge_method": "damc", "base_model": str(family.base),
            "models": [{"model": str(family.sources["llava"]), "modality": "image", "adapters": str(adapters)}]}


def _poison(file: Path, key: str, value=math.nan):
    from safetensors.torch import load_file

    sd = load_file(str(file))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    save_file(sd, str(file))


NONFINITE_ADAPTERS = [
    ("text/adapter_model.safetensors", "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", math.nan),
    ("image/adapter_model.safetensors", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", math.inf),
    ("prefix_suffix.safetensors", "suffix_tokens.image", math.nan),
    ("connector.safetensors", "multi_modal_projector.linear_2.bias", -math.inf),
]


def test_valid_damc_source_composes(family, tmp_path):
    """The hand-written source the cases below damage is itself valid."""
    out = compose(damc_config(family, damc_source(family, tmp_path)), str(tmp_path / "out"))
    assert read_json(Path(out) / "composite_config.json")["merge_method"] == "damc"


@pytest.mark.parametrize("file,key,value", NONFINITE_ADAPTERS, ids=[f for f, _, _ in NONFINITE_ADAPTERS])
def test_nonfinite_adapter_tensor_is_refused(family, tmp_path, file, key, value):
    d = damc_source(family, tmp_path)
    _poison(d / file, key, value)
    parent = outdir(tmp_path)
    r = run_cli(damc_config(family, d), parent / "out")
    assert_clean_failure(r, parent, [], d / file, key, "NaN or inf")


def test_dense_delta_nonfinite_is_refused(family, tmp_path):
    d = damc_source(family, tmp_path)
    shutil.rmtree(d / "text")
    (d / "text").mkdir()
    delta = torch.zeros(16, 16)
    delta[3, 4] = math.inf
    save_file({"model.layers.0.self_attn.q_proj.weight": delta}, str(d / "text" / "delta.safetensors"))
    parent = outdir(tmp_path)
    r = run_cli(damc_config(family, d), parent / "out")
    assert_clean_failure(r, parent, [], d / "text" / "delta.safetensors", "model.layers.0.self_attn.q_proj.weight")


def test_corrupt_prefix_suffix_file_is_named(family, tmp_path):
    d = damc_source(family, tmp_path)
    (d / "prefix_suffix.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    parent = outdir(tmp_path)
    assert_clean_failure(run_cli(damc_config(family, d), parent / "out"), parent, [], d / "prefix_suffix.safetensors")


def test_modelcompose_release_nonfinite_is_refused(family, tmp_path):
    d = tmp_path / "mc"
    d.mkdir()
    sd = {}
    for adapter in ("default", "vision"):
        sd[f"model.layers.0.self_attn.q_proj.lora_A.{adapter}.weight"] = torch.zeros(2, 16)
        sd[f"model.layers.0.self_attn.q_proj.lora_B.{adapter}.weight"] = torch.zeros(16, 2)
    sd["prefix_tokens.vision"] = torch.full((1, 2, 16), math.nan)
    torch.save(sd, d / "adapter_model.bin")
    (d / "config.json").write_text(json.dumps({"mm_vision_encoder": "clip", "lora_r": 2, "lora_alpha": 4}))
    parent = outdir(tmp_path)
    assert_clean_failure(run_cli(damc_config(family, d), parent / "out"), parent, [],
                         d / "adapter_model.bin", "prefix_tokens.vision", "NaN or inf")


# -- paths ----------------------------------------------------------------------------------------------

def test_paths_with_spaces_plus_and_at(family, tmp_path):
    """mergekit's reference syntax (`model+lora`, `model@revision`) must not split an existing local path."""
    base = copy(family.base, tmp_path / "my models" / "base v1")
    src = copy(family.sources["llava"], tmp_path / "a+b@c" / "llava")
    cfg = with_source(composite_config(family, "mmer", KINDS), family, "llava", src) | {"base_model": str(base)}
    out = tmp_path / "out dir" / "composite"
    r = run_cli(cfg, out)
    assert r.exit_code == 0, r.output
    manifest = read_json(out / "composite_config.json")
    assert manifest["base_model"] == str(base)
    assert manifest["modalities"]["image"]["source"] == str(src)
    assert (out / "README.md").exists()


# -- the output: never lose what the run did not create -------------------------------------------------

def _cfg(family):
    return composite_config(family, "mmer", KINDS)


def _racing(monkeypatch, during):
    """Run `during()` after the composite is written aside and before it is moved into place."""
    real = engine._write_composite

    def write_then_race(plan, tmp, source):
        real(plan, tmp, source)
        during()
    monkeypatch.setattr(engine, "_write_composite", write_then_race)


def test_output_appearing_during_compose_is_kept(family, tmp_path, monkeypatch):
    parent = outdir(tmp_path)
    out = parent / "out"

    def user_creates_out():
        out.mkdir()
    _racing(monkeypatch, user_creates_out)
    with pytest.raises(CompositionError, match="appeared"):
        compose(_cfg(family), str(out))
    assert out.is_dir() and list(out.iterdir()) == [], "the user's (empty) directory is left as it was"
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_output_replaced_during_overwrite_is_kept(family, tmp_path, monkeypatch):
    parent = outdir(tmp_path)
    out = parent / "out"
    out.mkdir()
    (out / "old.txt").write_text("to be overwritten")

    def user_replaces_out():
        shutil.rmtree(out)
        out.mkdir()
        (out / "new.txt").write_text("the user's new work")
    _racing(monkeypatch, user_replaces_out)
    with pytest.raises(CompositionError, match="changed while composing"):
        compose(_cfg(family), str(out), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in parent.iterdir()] == ["out"]


def _overwrite_into_input(family, tmp):
    """(config, OUT, the input directory whose contents must survive) per relation."""
    base = copy(family.base, tmp / "inputs" / "base")
    cfg = _cfg(family) | {"base_model": str(base)}
    return cfg, base


@pytest.mark.parametrize("relation", ["is", "contains", "lies_inside"])
def test_overwrite_refuses_an_input_directory(family, tmp_path, relation):
    cfg, base = _overwrite_into_input(family, tmp_path)
    out = {"is": base, "contains": base.parent, "lies_inside": base / "sub"}[relation]
    before = sorted(p.name for p in base.iterdir())
    r = run_cli(cfg, out, "--overwrite")
    assert r.exit_code == 2 and "refusing --overwrite" in r.output and str(base) in r.output, r.output
    assert sorted(p.name for p in base.iterdir()) == before


def test_overwrite_refuses_the_adapters_directory(family, tmp_path):
    d = damc_source(family, tmp_path)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(CompositionError, match="refusing --overwrite"):
        compose(damc_config(family, d), str(d), overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == before


def test_concurrent_compose_into_one_output_is_refused(family, tmp_path):
    parent = outdir(tmp_path)
    lock = parent / ".out.lock"
    with open(lock, "w") as held:  # another compose holds OUT's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        r = run_cli(_cfg(family), parent / "out")
        assert_clean_failure(r, parent, [".out.lock"], "another compose", "4242", parent / "out")
        assert lock.read_text() == "4242\n"


def test_stale_partials_and_lock_of_killed_runs_are_removed(family, tmp_path):
    parent = outdir(tmp_path)
    (parent / ".out.partial-0badc0de" / "modalities").mkdir(parents=True)
    (parent / ".out.partial-0badc0de" / "model.safetensors").write_bytes(b"\0" * 64)
    (parent / ".out.lock").write_text("999999999\n")  # its holder is dead: the lock is free
    (parent / ".other.partial-0badc0de").mkdir()  # another output's: not ours to remove
    r = run_cli(_cfg(family), parent / "out")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in parent.iterdir()) == [".other.partial-0badc0de", "out"]


def test_output_moved_aside_by_a_killed_overwrite_is_restored(family, tmp_path):
    parent = outdir(tmp_path)
    old = parent / ".out.partial-0badc0de.old"
    old.mkdir()
    (old / "mine.txt").write_text("the composite being overwritten")
    r = run_cli(_cfg(family), parent / "out")
    assert_clean_failure(r, parent, ["out"], "already exists")
    assert (parent / "out" / "mine.txt").read_text() == "the composite being overwritten"


def test_overwrite_onto_a_file_leaves_nothing_aside(family, tmp_path):
    parent = outdir(tmp_path)
    (parent / "out").write_text("a file")
    previous = signal.getsignal(signal.SIGTERM)
    compose(_cfg(family), str(parent / "out"), overwrite=True)
    assert signal.getsignal(signal.SIGTERM) is previous, "the SIGTERM handler is restored"
    assert [p.name for p in parent.iterdir()] == ["out"] and (parent / "out" / "composite_config.json").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
def test_write_failure_leaves_nothing_and_names_the_file(family, tmp_path, monkeypatch, err):
    """A full disk / read-only or forbidden directory, met while writing a shard."""
    def fail(self, name, tensor):
        raise OSError(err, os.strerror(err), os.path.join(self.out_dir, "model.safetensors"))
    monkeypatch.setattr(PlannedShardWriter, "write", fail)
    parent = outdir(tmp_path)
    r = run_cli(_cfg(family), parent / "out")
    assert_clean_failure(r, parent, [], os.strerror(err), "model.safetensors", parent / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_directory(family, tmp_path):
    parent = outdir(tmp_path)
    parent.chmod(0o555)
    try:
        r = run_cli(_cfg(family), parent / "out")
        assert_clean_failure(r, parent, [], parent, "Permission denied")
    finally:
        parent.chmod(0o755)


# -- fault injection: a compose killed midway, in a process of its own ----------------------------------

#: the real CLI, each written tensor slowed so the test can signal it midway
_SLOW_CLI = """
import sys, time
from mergekit_multimodal.compose import writer
real = writer.PlannedShardWriter.write
def slow(self, name, tensor):
    real(self, name, tensor)
    time.sleep(0.25)
writer.PlannedShardWriter.write = slow
from mergekit_multimodal.cli import main
main(sys.argv[1:], prog_name="mergekit-mm-yaml")
"""


def _start_and_signal(family, tmp_path, sig):
    parent = outdir(tmp_path)
    cfg_path = tmp_path / "c.yml"
    cfg_path.write_text(yaml.safe_dump(_cfg(family)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, str(cfg_path), str(parent / "out"), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in parent.glob(".out.partial-*") if (p / "modalities").is_dir()]
            if partial and list(partial[0].rglob("*.safetensors")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the compose was meant to be caught midway"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr, parent


def test_sigkill_midway_then_rerun_completes(family, tmp_path):
    rc, _, parent = _start_and_signal(family, tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = sorted(p.name for p in parent.iterdir())
    assert not (parent / "out").exists() and any(n.startswith(".out.partial-") for n in left), left
    r = run_cli(_cfg(family), parent / "out")  # the next run into OUT cleans up after the killed one
    assert r.exit_code == 0, r.output
    assert [p.name for p in parent.iterdir()] == ["out"]
    fresh = Path(compose(_cfg(family), str(tmp_path / "fresh")))
    assert read_dir(parent / "out").keys() == read_dir(fresh).keys()
    assert (parent / "out" / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()


def test_sigterm_midway_leaves_nothing(family, tmp_path):
    rc, stderr, parent = _start_and_signal(family, tmp_path, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    assert list(parent.iterdir()) == []
