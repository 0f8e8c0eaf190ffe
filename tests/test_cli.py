"""`mergekit-mm-yaml` as a drop-in for `mergekit-yaml`, and our methods inside mergekit's own run_merge."""

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.scripts.run_yaml import main as mergekit_yaml

from mergekit_multimodal.testing import perturb_like
from tests import reference
from tests.helpers import composite_config, f64, read_dir, read_json

from mergekit_multimodal.cli import main as mergekit_mm_yaml

CLIS = {"mergekit-yaml": mergekit_yaml, "mergekit-mm-yaml": mergekit_mm_yaml}


def run(cli, *args):
    """Invoke a CLI's click command in-process (the installed scripts call exactly these)."""
    r = CliRunner().invoke(CLIS[cli], [str(a) for a in args], catch_exceptions=False)
    r.returncode = r.exit_code
    return r


@pytest.fixture(scope="module")
def text_llms(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return [perturb_like(family.base, root / f"ft{i}", seed=i) for i in range(3)]


@pytest.mark.parametrize("method,params", [("linear", {"weight": 1.0}), ("ties", {"weight": 1.0, "density": 0.5})])
def test_plain_mergekit_config_gives_the_same_tensors_through_both_clis(family, text_llms, tmp_path, method, params):
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(p), "parameters": params} for p in text_llms]}
    if method != "linear":
        cfg["base_model"] = str(family.base)
    path = tmp_path / "plain.yml"
    path.write_text(yaml.safe_dump(cfg))
    a = run("mergekit-yaml", path, tmp_path / "a", "--out-shard-size", "20K")
    b = run("mergekit-mm-yaml", path, tmp_path / "b", "--out-shard-size", "20K")
    assert a.returncode == 0, a.output
    assert b.returncode == 0, b.output
    ta, tb = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert ta and set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())


def test_every_mergekit_flag_is_accepted():
    help_a = run("mergekit-yaml", "--help").output
    help_b = run("mergekit-mm-yaml", "--help").output
    flags = {tok.strip(",") for tok in help_a.split() if tok.startswith("--")}
    assert len(flags) > 20
    missing = [f for f in flags if f not in help_b]
    assert not missing


def test_composite_through_the_cli_with_mergekit_flags(family, tmp_path):
    path = tmp_path / "mmer.yml"
    path.write_text(yaml.safe_dump(composite_config(family, "mmer", ["llava", "qwen2_audio"])))
    r = run("mergekit-mm-yaml", path, tmp_path / "out", "--out-shard-size", "5K", "--no-write-model-card", "--quiet")
    assert r.returncode == 0, r.output
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists() and not (out / "README.md").exists()
    assert (out / "mergekit_config.yml").read_text() == path.read_text()
    assert read_json(out / "composite_config.json")["merge_method"] == "mmer"


def test_run_merge_from_python_accepts_our_methods(family, text_llms, tmp_path):
    """`import mergekit_multimodal` registers mmer: mergekit's own run_merge gives its text route."""
    import mergekit_multimodal  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate({
        "merge_method": "mmer", "base_model": str(family.base), "dtype": "float32",
        "parameters": {"election": "ties", "density": 0.5},
        "models": [{"model": str(p)} for p in text_llms]})
    run_merge(cfg, str(tmp_path / "o"), MergeOptions(quiet=True, copy_tokenizer=False))
    out = read_dir(tmp_path / "o")
    base = read_dir(family.base)
    srcs = [read_dir(p) for p in text_llms]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        want = reference.mmer(f64(base[name]), [f64(s[name]) for s in srcs], election="ties", density=0.5)[0]
        np.testing.assert_allclose(f64(out[name]), want, rtol=1e-6, atol=1e-6)


def test_run_merge_naive_mc_is_the_mean(family, text_llms, tmp_path):
    import mergekit_multimodal  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate({"merge_method": "naive_mc", "dtype": "float32",
                                             "models": [{"model": str(p)} for p in text_llms]})
    run_merge(cfg, str(tmp_path / "o"), MergeOptions(quiet=True, copy_tokenizer=False))
    out, srcs = read_dir(tmp_path / "o"), [read_dir(p) for p in text_llms]
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_allclose(f64(out[name]), reference.naive_mc([f64(s[name]) for s in srcs]), rtol=1e-6)


def test_run_merge_damc_on_full_checkpoints_is_lambda_weighted_task_arithmetic(family, text_llms, tmp_path):
    """On plain full checkpoints damc reads dT_i = theta_i - W0; an unset lambda is 1/N."""
    import mergekit_multimodal  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    models = [{"model": str(p)} for p in text_llms]
    models[0]["parameters"] = {"lambda": 0.3}
    cfg = MergeConfiguration.model_validate({"merge_method": "damc", "base_model": str(family.base),
                                             "dtype": "float32", "models": models})
    run_merge(cfg, str(tmp_path / "o"), MergeOptions(quiet=True, copy_tokenizer=False))
    out, base, srcs = read_dir(tmp_path / "o"), read_dir(family.base), [read_dir(p) for p in text_llms]
    name = "model.layers.1.mlp.up_proj.weight"
    lams = [0.3] + [1.0 / len(srcs)] * (len(srcs) - 1)
    want = f64(base[name]) + sum(lam * (f64(s[name]) - f64(base[name])) for lam, s in zip(lams, srcs))
    np.testing.assert_allclose(f64(out[name]), want, rtol=1e-6, atol=1e-6)
