"""Existing mergekit pipelines run unchanged through `mergekit-mm-yaml`.

The SAME plain config and flags go through `mergekit-yaml` and `mergekit-mm-yaml` (in-process,
the click commands the installed scripts call); the outputs must hold the same files, byte for
byte, hence the same tensors. Covers LoRA inputs (`model+lora` with `--lora-merge-cache`, a real
PEFT adapter), `--trust-remote-code`, `--allow-crimes`, `--out-shard-size`, tokenizer and
model-card switches and `.bin` output.
"""

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from mergekit.scripts.run_yaml import main as mergekit_yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from mergekit_multimodal import compose
from mergekit_multimodal.cli import main as mergekit_mm_yaml
from mergekit_multimodal.methods.routes import iter_route
from mergekit_multimodal.testing import build_tiny_family, perturb_like
from tests.helpers import read_dir

# peft calls a transformers method that transformers 5 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

Q = "model.layers.0.self_attn.q_proj.weight"


def run(cli, *args, catch=False):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch)


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(directory.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def lora_adapter(model_dir: Path, out: Path, target, seed=0) -> Path:
    """A real PEFT LoRA adapter with non-zero B (PEFT starts B at zero: a no-op adapter)."""
    arch = transformers.AutoConfig.from_pretrained(model_dir).architectures[0]
    model = getattr(transformers, arch).from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=target))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_llms(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return [perturb_like(family.base, root / f"ft{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def adapter(family, tmp_path_factory):
    return lora_adapter(family.base, tmp_path_factory.mktemp("lora") / "adapter", ["q_proj", "v_proj"])


def both(tmp_path, cfg: dict, *flags, per_run=()):
    """Run cfg through both CLIs into <tmp>/<cli>/out (same basename: the card names it); return the dirs.

    `per_run` flags get a per-CLI directory appended (e.g. --lora-merge-cache, so each run merges its own).
    """
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    outs = []
    for name, cli in (("mergekit-yaml", mergekit_yaml), ("mergekit-mm-yaml", mergekit_mm_yaml)):
        LoaderCache.loaders.clear()  # mergekit keeps opened (LoRA-merged) models per process: start fresh
        extra = [a for flag in per_run for a in (flag, tmp_path / name / flag.strip("-"))]
        r = run(cli, path, tmp_path / name / "out", *flags, *extra)
        assert r.exit_code == 0, f"{name}: {r.output}"
        outs.append(tmp_path / name / "out")
    return outs


def assert_same_outputs(a: Path, b: Path):
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    ta, tb = tensors(a), tensors(b)
    assert ta and set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    differing = [f for f in fa if fa[f] != fb[f]]
    assert not differing


def linear(models, **extra):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **extra}


@pytest.mark.parametrize("flags,present,absent", [
    (["--out-shard-size", "20K"], ["model.safetensors.index.json", "README.md", "tokenizer.json"], []),
    (["--copy-tokenizer", "--write-model-card"], ["tokenizer.json", "README.md"], []),
    (["--no-copy-tokenizer"], ["README.md"], ["tokenizer.json"]),
    (["--no-write-model-card"], ["tokenizer.json"], ["README.md"]),
    (["--trust-remote-code", "--lazy-unpickle", "--clone-tensors"], ["config.json"], []),
    (["--no-safe-serialization"], ["pytorch_model.bin"], ["model.safetensors"]),
])
def test_flags_give_the_same_output_through_both_clis(text_llms, tmp_path, flags, present, absent):
    a, b = both(tmp_path, linear(text_llms), *flags, "--quiet")
    assert_same_outputs(a, b)
    names = {p.name for p in b.iterdir()}
    assert set(present) <= names and not set(absent) & names


def test_lora_inputs_merge_the_same_through_both_clis(family, text_llms, adapter, tmp_path):
    cfg = linear([f"{family.base}+{adapter}", text_llms[0]], base_model=str(family.base))
    cfg["merge_method"] = "task_arithmetic"
    a, b = both(tmp_path, cfg, "--quiet", per_run=["--lora-merge-cache"])
    assert_same_outputs(a, b)
    assert all(any((tmp_path / n / "lora-merge-cache").iterdir()) for n in ("mergekit-yaml", "mergekit-mm-yaml"))
    # the adapter really was applied: its cached merge is W + (B @ A) * alpha / r
    cache = next((tmp_path / "mergekit-mm-yaml" / "lora-merge-cache").iterdir())
    merged, base = load_file(cache / "model.safetensors"), read_dir(family.base)
    lora = load_file(adapter / "adapter_model.safetensors")
    la = next(v for k, v in lora.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    lb = next(v for k, v in lora.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    torch.testing.assert_close(merged[Q], base[Q] + (lb @ la) * 2.0)
    # task_arithmetic: base + (lora_model - base) + (ft0 - base)
    ft0 = read_dir(text_llms[0])
    torch.testing.assert_close(tensors(b)[Q], merged[Q] + ft0[Q] - base[Q], rtol=1e-5, atol=1e-6)


def test_allow_crimes_is_passed_through(family, tmp_path):
    """A Llama and a Mistral of identical shapes: refused by both CLIs, merged by both with --allow-crimes."""
    mistral = build_tiny_family(tmp_path / "mistral", (), text_family="mistral").base
    cfg = linear([family.base, mistral])
    path = tmp_path / "crimes.yml"
    path.write_text(yaml.safe_dump(cfg))
    for cli in (mergekit_yaml, mergekit_mm_yaml):
        r = run(cli, path, tmp_path / "refused", "--quiet", catch=True)
        assert r.exit_code != 0 and "allow-crimes" in str(r.exception)
    a, b = both(tmp_path, cfg, "--allow-crimes", "--quiet")
    assert_same_outputs(a, b)


def test_composite_source_written_model_plus_lora(family, tmp_path):
    llava = family.sources["llava"]
    adapter = lora_adapter(llava, tmp_path / "llava-lora", r".*language_model.*\.(q_proj|v_proj)")
    cfg = {"merge_method": "mmer", "base_model": str(family.base),
           "models": [{"model": f"{llava}+{adapter}", "modality": "image"}]}
    out = compose(cfg, str(tmp_path / "c"), MergeOptions(lora_merge_cache=str(tmp_path / "cache"), quiet=True))
    plain = compose({**cfg, "models": [{"model": str(llava), "modality": "image"}]}, str(tmp_path / "p"),
                    MergeOptions(quiet=True))
    with_lora, without = dict(iter_route(out, "image")), dict(iter_route(plain, "image"))
    assert not torch.allclose(with_lora[Q], without[Q])
