"""mergekit-mm-tune: grid and coordinate search find a known optimum; the CLI writes the chosen YAML."""

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_multimodal import tune as tune_mod
from mergekit_multimodal.tune import apply_values, tune
from tests.helpers import read_dir
from tests.test_damc import _factors, _peft_source

NAME = "model.layers.0.self_attn.q_proj.weight"
OPTIMUM = {"image.lambda": 0.25, "audio.lambda": 0.75}


@pytest.fixture(scope="module")
def task(family, tmp_path_factory):
    """A constructed task: the score is minus the distance of one merged tensor to
    W0 + 0.25 dT_image + 0.75 dT_audio, so the best lambdas are known."""
    root = tmp_path_factory.mktemp("tune")
    src = {"image": _peft_source(family, root / "image", "image", 1),
           "audio": _peft_source(family, root / "audio", "audio", 2)}
    target = read_dir(family.base)[NAME].double()
    for m, lam in (("image", 0.25), ("audio", 0.75)):
        f, s = _factors(f"{src[m]}/text")
        target = target + lam * s * torch.as_tensor(f[NAME]["B"] @ f[NAME]["A"])
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": [
        {"model": str(family.sources["llava"]), "modality": "image", "adapters": src["image"]},
        {"model": str(family.sources["qwen2_audio"]), "modality": "audio", "adapters": src["audio"]}]}

    def score(composite_dir):
        return -float((read_dir(composite_dir)[NAME].double() - target).norm())

    return cfg, score


GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_grid_finds_the_known_optimum(task):
    cfg, score = task
    res = tune(cfg, score, {"image.lambda": [0.0, 0.25, 1.0], "audio.lambda": [0.5, 0.75]}, "grid", progress=False)
    assert res.best == OPTIMUM and len(res.trials) == 6
    assert res.config["models"][0]["parameters"] == {"lambda": 0.25}
    table = res.table().splitlines()
    assert table[0].split() == ["image.lambda", "audio.lambda", "score"] and table[2].split()[:2] == ["0.25", "0.75"]


def test_coordinate_descent_finds_it_with_fewer_composes(task):
    cfg, score = task
    res = tune(cfg, score, {"image.lambda": GRID, "audio.lambda": GRID}, "coordinate", progress=False)
    assert res.best == OPTIMUM
    assert len(res.trials) < len(GRID) ** 2


def test_cli_writes_the_tuned_yaml(task, tmp_path, monkeypatch):
    cfg, score = task
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    import mergekit_multimodal.evaluation.running as ev

    seen = []
    monkeypatch.setattr(ev, "evaluate", lambda d, bench, limit=None, **kw: seen.append((bench, limit)) or
                        type("R", (), {"overall": score(d)})())
    out = tmp_path / "tuned.yml"
    r = CliRunner().invoke(tune_mod.main, [str(tmp_path / "c.yml"), "--val", "tiny-vqa", "--limit", "3",
                                           "--space", "image.lambda=0.25,1", "--space", "audio.lambda=0.75",
                                           "--strategy", "coordinate", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert seen == [("tiny-vqa", 3)] * 2 and "image.lambda=0.25" in r.output  # one evaluation a candidate
    tuned = yaml.safe_load(out.read_text())
    assert tuned == apply_values(cfg, OPTIMUM)


def test_cli_passes_the_evaluators_prompt_options(task, tmp_path, monkeypatch):
    """--template / --answer-with / --route reach the evaluator, so tuning scores the prompt in use."""
    import mergekit_multimodal.evaluation.running as ev

    cfg, score = task
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    calls = []
    monkeypatch.setattr(ev, "evaluate", lambda d, bench, **kw: calls.append((bench, kw)) or
                        type("R", (), {"overall": score(d)})())
    r = CliRunner().invoke(tune_mod.main, [str(tmp_path / "c.yml"), "--val", "val-set", "--space", "image.lambda=0.25",
                                           "--space", "audio.lambda=0.75", "--template", "{question}\\n{choices}\\nanswer :",
                                           "--answer-with", "choice", "--route", "auto", "--out", str(tmp_path / "t.yml")])
    assert r.exit_code == 0, r.output
    assert calls == [("val-set", {"device": "cpu", "limit": None, "progress": False, "answer_with": "choice",
                                  "route": "auto", "template": "{question}\n{choices}\nanswer :"})]


def test_unknown_modality_key_is_an_error(task):
    from mergekit_multimodal import CompositionError

    with pytest.raises(CompositionError, match="no model with modality 'video'"):
        apply_values(task[0], {"video.lambda": 1.0})


def test_method_parameters_for_mmer_are_top_level_keys():
    cfg = {"merge_method": "mmer", "base_model": "b", "models": [{"model": "a", "modality": "image"}],
           "parameters": {"election": "max"}}
    got = apply_values(cfg, {"alpha": 0.5, "lambda": 1.5})
    assert got["parameters"] == {"election": "max", "alpha": 0.5, "lambda": 1.5} and cfg["parameters"] == {"election": "max"}
    assert set(tune_mod.default_space(cfg)) == {"alpha", "lambda"}
