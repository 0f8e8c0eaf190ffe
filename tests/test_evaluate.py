"""mergekit-mm-eval: benchmark parsing, first-token scoring on hand-made cases, clear errors."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.evaluate import evaluate, load_benchmark, main
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor


def write_bench(d, rows, media=True):
    (d / "media").mkdir(parents=True, exist_ok=True)
    if media:
        Image.fromarray(np.full((28, 28, 3), 200, np.uint8)).save(d / "media" / "a.png")
    (d / "benchmark.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def q(answer="A", **kw):
    return {"id": "x", "subset": "image", "question": "w3 <image> w4", "media": {"image": ["media/a.png"]},
            "choices": ["w5", "w6", "w7"], "answer": answer, **kw}


def test_parse_resolves_media_and_checks_markers(tmp_path):
    qs = load_benchmark(str(write_bench(tmp_path, [q(), q("C", subset="other")])))
    assert [x.subset for x in qs] == ["image", "other"] and qs[1].answer == "C"
    assert qs[0].media["image"][0].endswith("media/a.png") and qs[0].where.endswith("benchmark.jsonl:1")


@pytest.mark.parametrize("row,message", [
    (q("E"), "benchmark.jsonl:2: answer 'E' is not one of the choice letters A, B, C"),
    (q(media={"image": ["media/missing.png"]}), "benchmark.jsonl:2: media file 'media/missing.png' (image) not found"),
    (q(question="w3 w4"), "benchmark.jsonl:2: the question has 0 '<image>' marker(s) for 1 image file(s)"),
    ({"question": "w3", "choices": ["a", "b"]}, "benchmark.jsonl:2: missing key 'answer'"),
])
def test_bad_benchmarks_name_file_and_line(tmp_path, row, message):
    write_bench(tmp_path, [q(), row])
    with pytest.raises(CompositionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_benchmark(str(tmp_path))


@pytest.fixture(scope="module")
def llava_composite(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalc") / "c"
    compose({"merge_method": "naive_mc", "base_model": str(family.base), "dtype": "float32",
             "models": [{"model": str(family.sources["llava"]), "modality": "image"}]}, str(out))
    return str(out)


def test_choice_scoring_matches_the_models_own_argmax(llava_composite, tmp_path):
    """Known answer: the option the model itself ranks first scores 100%, any other option 0%."""
    write_bench(tmp_path, [q()])
    model, proc = CompositeModel.from_pretrained(llava_composite), CompositeProcessor.from_pretrained(llava_composite)
    prompt = "w3 <image> w4 A . w5 B . w6 C . w7 answer :"
    with torch.no_grad():
        logits = model(**proc(prompt, media={"image": [str(tmp_path / "media" / "a.png")]})).logits[0, -1]
    ids = [proc.tokenizer.convert_tokens_to_ids(w) for w in ("w5", "w6", "w7")]
    best = "ABC"[int(logits[ids].argmax())]
    write_bench(tmp_path, [q(best), q(next(x for x in "ABC" if x != best), subset="wrong")])
    res = evaluate(llava_composite, str(tmp_path), scoring="choice",
                   template="{question} {choices} answer :")
    assert res.subsets["image"]["accuracy"] == 1.0 and res.subsets["wrong"]["accuracy"] == 0.0
    assert res.overall == 0.5


def test_single_source_is_evaluated_through_a_one_source_composite(family, llava_composite, tmp_path):
    write_bench(tmp_path, [q("A"), q("B"), q("C")])
    a = evaluate(llava_composite, str(tmp_path), scoring="choice")
    b = evaluate(str(family.sources["llava"]), str(tmp_path), scoring="choice")
    assert a.subsets == b.subsets


def test_cli_writes_json_png_and_fails_cleanly(llava_composite, tmp_path):
    write_bench(tmp_path / "b", [q()])
    r = CliRunner().invoke(main, [llava_composite, str(tmp_path / "b"), "--out", str(tmp_path / "o"),
                                  "--scoring", "choice"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "results.json").exists() and (tmp_path / "o" / "results.png").exists()
    write_bench(tmp_path / "bad", [q("Z")])
    r = CliRunner().invoke(main, [llava_composite, str(tmp_path / "bad")])
    assert r.exit_code != 0 and "benchmark.jsonl:1: answer 'Z'" in r.output
