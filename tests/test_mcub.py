"""ModelCompose's benchmark files (MCUB, AVQA) as they are: a miniature ModelCompose checkout
(data/test/MCUB-4.json, MCUB-3-image-audio-video.json, MCUB-answer.json, avqa-test_mm_*.json,
media under data/ with a .flac and *_8192.npy point clouds), loaded questions checked against
hand-written expectations, predictions of both scorings against an independent forward.

The tiny tokenizer is word-level (w0..w92): it has no token for the letters, so the logit
scoring runs with labels w10..w13 (`--labels`), and the first-character scoring runs both on the
letters as they are (the CLI) and on those labels.
"""

import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from PIL import Image
from tokenizers import AddedToken

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.evaluation import build_prompt, evaluate, first_char_label, load_benchmark, parse_label
from mergekit_multimodal.evaluation.cli import main
from mergekit_multimodal.families import point_cloud as PC
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.runtime.media import load_audio
from tests.helpers import composite_config

LABELS = ["w10", "w11", "w12", "w13"]
RATE = 16000
PCM = (np.sin(np.arange(12000) * 0.05) * 15000).astype(np.int16)  # the .flac's samples (flac is lossless)


def point_source(fam, d: Path) -> Path:
    """Our point-cloud family on the tiny family's base (its tokenizer plus `<point>`), xyz + rgb in."""
    tok = transformers.AutoTokenizer.from_pretrained(fam.base)
    tok.add_tokens([AddedToken("<point>", special=True, normalized=False)], special_tokens=True)
    lm = transformers.AutoModelForCausalLM.from_pretrained(fam.base)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(5)
    model = PC.PointLlavaForConditionalGeneration(
        PC.make_config(lm.config.to_dict(), tok.convert_tokens_to_ids("<point>"), in_dim=6, hidden_size=8,
                       num_points=32), lm)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def composites(family, tmp_path_factory):
    d = tmp_path_factory.mktemp("mcub")
    cfg = composite_config(family, "naive_mc", ["llava", "video_llava", "qwen2_audio"], dtype="float32")
    three = compose(cfg, str(d / "c3"))
    cfg["models"].append({"model": str(point_source(family, d / "pc")), "modality": "point_cloud"})
    return {"four": compose(cfg, str(d / "c4")), "three": three}


def write_flac(path: Path):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("flac", rate=RATE)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(PCM[None], format="s16", layout="mono")
        frame.sample_rate = RATE
        for p in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(p)


def human(markers, stem, options, style="A.", after=""):
    opts = [f"({chr(65 + i)}) {o}" if style == "(A)" else f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]
    return "\n".join(markers + [stem] + opts + ([after] if after else []))


def item(qid, text, modal, answer=None):
    return {"id": qid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}],
            "modal_inputs": modal}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """ModelCompose's layout: data/test/*.json, media under data/, paths relative to the checkout root."""
    root = tmp_path_factory.mktemp("ckpt") / "ModelCompose"
    rng = np.random.default_rng(0)
    files = {"img0": "data/coco/train2017/000001.png", "img1": "data/coco/train2017/000002.png",
             "flac": "data/WavCaps/audios/FreeSound_flac/17.flac", "wav": "data/clotho/audio/3.wav",
             "vid": "data/activitynet/v_1.npy", "pc0": "data/PointCloud/8192_npy/chair_8192.npy",
             "pc1": "data/PointCloud/8192_npy/lamp_8192.npy"}
    for p in files.values():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
    for k in ("img0", "img1"):
        Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(root / files[k])
    write_flac(root / files["flac"])
    with wave.open(str(root / files["wav"]), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE), w.writeframes(PCM[::-1].tobytes())
    np.save(root / files["vid"], rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8))
    for k in ("pc0", "pc1"):
        np.save(root / files[k], rng.normal(size=(8192, 6)).astype(np.float32))
    four = ["<image>", "<audio>", "<video>", "<point>"]
    mcub4 = [item("mcub4_0", human(four, "w5 w6", ["w1", "w2", "w3", "w4"], after="w7 w8"),
                  {"vision": [files["img0"]], "audio": [files["flac"]], "video": [files["vid"]],
                   "point": [files["pc0"]]}),
             item("mcub4_1", human(four, "w9", ["w1", "w2", "w3"], style="(A)"),
                  {"vision": [files["img1"]], "audio": [files["wav"]], "video": [files["vid"]],
                   "point": [files["pc1"]]})]
    mcub3 = [item("mcub3_0", human(four[:3], "w20 w21", ["w1", "w2", "w3", "w4"]),
                  {"vision": [files["img0"]], "audio": [files["flac"]], "video": [files["vid"]]}),
             item("mcub3_1", human(four[:3], "w22", ["w3", "w1"]),
                  {"vision": [files["img1"]], "audio": [files["wav"]], "video": [files["vid"]]})]
    answers = {"mcub4_0": "C", "mcub4_1": "A", "mcub3_0": "D", "mcub3_1": "B"}
    avqa = [item(7, human(["<image>", "<audio>"], "w30", ["w1", "w2"]),
                 {"vision": [files["img0"]], "audio": [files["wav"]]})]
    test = root / "data" / "test"
    test.mkdir(parents=True)
    (test / "MCUB-4.json").write_text(json.dumps(mcub4, indent=2))
    (test / "MCUB-3-image-audio-video.json").write_text(json.dumps(mcub3, indent=2))
    (test / "MCUB-answer.json").write_text(json.dumps(
        [item(k, "question", {}, v) for k, v in answers.items()]))
    (test / "avqa-test_mm_image+audio.json").write_text(json.dumps(avqa))
    (test / "avqa-test_mm_answer.json").write_text(json.dumps([item(7, "q", {}, "B")]))
    return root, {k: root / v for k, v in files.items()}


# -- loading -----------------------------------------------------------------------------------------
def test_mcub_files_load_with_answers_modalities_options_and_paths(checkout):
    root, f = checkout
    q4 = load_benchmark(root / "data" / "test" / "MCUB-4.json")
    assert [q.id for q in q4] == ["mcub4_0", "mcub4_1"]
    assert [q.answer for q in q4] == [2, 0]  # C, A from MCUB-answer.json
    assert [q.choices for q in q4] == [["w1", "w2", "w3", "w4"], ["w1", "w2", "w3"]]
    assert q4[0].question == "<image>\n<audio>\n<video>\n<point_cloud>\nw5 w6" and q4[0].instruction == "w7 w8"
    assert q4[1].question == "<image>\n<audio>\n<video>\n<point_cloud>\nw9" and q4[1].instruction == ""
    assert q4[0].media == {"image": [str(f["img0"])], "audio": [str(f["flac"])], "video": [str(f["vid"])],
                           "point_cloud": [str(f["pc0"])]}
    assert q4[1].media["audio"] == [str(f["wav"])] and q4[1].media["point_cloud"] == [str(f["pc1"])]
    assert [q.subset for q in q4] == ["common-4", "common-4"] and q4[0].labels is None
    assert q4[0].extra["prompt"].startswith("<image>\n<audio>\n<video>\n<point>\nw5 w6\nA. w1")
    q3 = load_benchmark(root / "data" / "test" / "MCUB-3-image-audio-video.json")
    assert [(q.id, q.answer, q.choices, sorted(q.media)) for q in q3] == [
        ("mcub3_0", 3, ["w1", "w2", "w3", "w4"], ["audio", "image", "video"]),
        ("mcub3_1", 1, ["w3", "w1"], ["audio", "image", "video"])]
    avqa = load_benchmark(root / "data" / "test" / "avqa-test_mm_image+audio.json")  # its own answers file
    assert [(q.id, q.answer, q.subset) for q in avqa] == [("7", 1, "common-2")]
    assert build_prompt(q4[0], {"image": "<I>", "audio": "<A>", "video": "<V>", "point_cloud": "<P>"}) == \
        "<I>\n<A>\n<V>\n<P>\nw5 w6\nA. w1\nB. w2\nC. w3\nD. w4\nw7 w8\nAnswer:"


def test_flac_reads_losslessly_and_without_pyav_names_the_file(checkout, monkeypatch):
    _, f = checkout
    assert np.array_equal(load_audio(f["flac"], RATE), PCM.astype(np.float32) / 32768)
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(CompositionError, match=r"17\.flac: reading \.flac audio needs PyAV \(pip install av\)"):
        load_audio(f["flac"], RATE)


def _edit(root, name, fn):
    src = json.loads((root / "data" / "test" / "MCUB-4.json").read_text())
    fn(src)
    p = root / "data" / "test" / name
    p.write_text(json.dumps(src))
    return p


@pytest.mark.parametrize("edit,message", [
    (lambda d: d[1].update(id="nope"), "MCUB-x.json: item 2 (id nope): no answer: id nope is not in MCUB-answer.json"),
    (lambda d: d[0]["modal_inputs"].update(vision=["data/coco/missing.png"]),
     "item 1 (id mcub4_0): modal_inputs.vision file not found: data/coco/missing.png (relative paths are resolved "
     "against the checkout root"),
    (lambda d: d[0]["modal_inputs"].update(depth=["x"]), "modal_inputs key 'depth' is not one of"),
    (lambda d: d[0]["conversations"][0].update(value="<image> w1 w2"), "item 1 (id mcub4_0): conversations[0].value "
                                                                        "has no lettered options"),
    (lambda d: d[1]["conversations"][0].update(value=d[1]["conversations"][0]["value"].replace("<point>\n", "")),
     "item 2 (id mcub4_1): the question has 0 <point_cloud> marker(s) but 1 point_cloud file(s)"),
])
def test_bad_modelcompose_items_are_named(checkout, tmp_path, edit, message):
    root, _ = checkout
    with pytest.raises(CompositionError) as exc:
        load_benchmark(_edit(root, "MCUB-x.json", edit))
    assert message in str(exc.value)


def test_a_bad_answers_file_is_named_and_our_format_refuses_its_options(checkout, tmp_path):
    root, _ = checkout
    bad = tmp_path / "answers.json"
    bad.write_text(json.dumps([item("mcub4_0", "q", {}, "E"), item("mcub4_1", "q", {}, "A")]))
    with pytest.raises(CompositionError, match=r"answers.json, id mcub4_0: answer 'E' is not one of the question's "
                                               r"option letters A, B, C, D"):
        load_benchmark(root / "data" / "test" / "MCUB-4.json", answers=bad)
    ours = tmp_path / "benchmark.jsonl"
    ours.write_text(json.dumps({"question": "w1", "choices": ["w2", "w3"], "answer": 0}) + "\n")
    assert load_benchmark(ours)[0].answer == 0  # our own format unchanged
    with pytest.raises(CompositionError, match="apply to ModelCompose's files"):
        load_benchmark(ours, answers=bad)


# -- scoring -----------------------------------------------------------------------------------------
def prompts(a, b, c, d):  # by hand: the composite's placeholders, the labels given, the default template
    head = "<image>\n<|AUDIO|>\n<video>\n<point>\n"
    return {"mcub4_0": f"{head}w5 w6\n{a}. w1\n{b}. w2\n{c}. w3\n{d}. w4\nw7 w8\nAnswer:",
            "mcub4_1": f"{head}w9\n{a}. w1\n{b}. w2\n{c}. w3\nAnswer:"}


def _independent(composite, f, labels, generate=False):
    """Per question alone: the hand-written prompt, the media decoded here (the flac as its PCM)."""
    proc = CompositeProcessor.from_pretrained(composite)
    model = CompositeModel.from_pretrained(composite)
    audio = {"mcub4_0": (PCM.astype(np.float32) / 32768, RATE), "mcub4_1": f["wav"]}
    media = {"mcub4_0": {"image": [f["img0"]], "point_cloud": [np.load(f["pc0"])]},
             "mcub4_1": {"image": [f["img1"]], "point_cloud": [np.load(f["pc1"])]}}
    ids = [proc.tokenizer.convert_tokens_to_ids(t) for t in labels]
    out = {}
    for qid, prompt in prompts(*labels).items():
        inputs = proc(prompt, media={**media[qid], "audio": [audio[qid]], "video": [np.load(f["vid"])]})
        with torch.no_grad():
            if generate:
                new = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                out[qid] = proc.decode(new[0], skip_special_tokens=True)
            else:
                n = prompt.count(". w")
                out[qid] = int(torch.argmax(model(**inputs).logits[0, -1][ids[:n]]))
    return out


def test_logit_scoring_matches_an_independent_forward(composites, checkout):
    root, f = checkout
    want = _independent(composites["four"], f, LABELS)
    res = evaluate(composites["four"], str(root / "data" / "test" / "MCUB-4.json"), labels=LABELS, batch_size=2,
                   progress=False)
    assert {p["id"]: p["index"] for p in res.predictions} == want
    assert res.mode == "logits" and res.correct == (want["mcub4_0"] == 2) + (want["mcub4_1"] == 0)


@pytest.mark.parametrize("labels", [LABELS, ["w", "x", "y", "z"]])
def test_first_char_scoring_matches_an_independent_generation(composites, checkout, labels):
    """One-character labels are ModelCompose's rule as is (the tiny model's words all begin with "w",
    so "w" is read and A is right); longer labels are read as the output's beginning."""
    root, f = checkout
    want = _independent(composites["four"], f, labels, generate=True)
    res = evaluate(composites["four"], str(root / "data" / "test" / "MCUB-4.json"), labels=labels,
                   scoring="first-char", max_new_tokens=2, progress=False)
    answers = {"mcub4_0": 2, "mcub4_1": 0}
    for p in res.predictions:
        text = want[p["id"]]
        assert p["output"] == text
        hit = [i for i, lab in enumerate(labels) if text.strip().startswith(lab)]
        assert p["index"] == (hit[0] if hit else -1) and p["correct"] == (p["index"] == answers[p["id"]])
        if len(labels[0]) == 1:
            assert p["correct"] == (text.strip()[:1] == labels[answers[p["id"]]])
    if len(labels[0]) == 1:
        assert [p["correct"] for p in res.predictions] == [False, True]
    assert res.mode == "first-char"


def test_first_char_is_modelcomposes_reading():
    labs = ["A", "B", "C", "D"]
    for text, want in ((" B", 1), ("Apple", 0), ("D. w1", 3), ("(B)", None), ("b", None), ("", None)):
        assert first_char_label(text, labs) == want, text
    assert parse_label("(B)", labs) == 1 and parse_label("Apple", labs) is None  # the first-label reading differs
    with pytest.raises(CompositionError, match="first-char"):
        evaluate("unused", [], scoring="first-char", answer_with="choice", progress=False)


def test_cli_on_the_checkout_as_is_and_a_composite_without_point_clouds(composites, checkout, tmp_path):
    root, _ = checkout
    mcub3, mcub4 = root / "data" / "test" / "MCUB-3-image-audio-video.json", root / "data" / "test" / "MCUB-4.json"
    res = CliRunner().invoke(main, [composites["three"], str(mcub3), "--scoring", "first-char", "--out",
                                    str(tmp_path / "o"), "--device", "cpu", "--quiet", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    preds = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["mcub3_0", "mcub3_1"] and [p["answer"] for p in preds] == ["D", "B"]
    for p in preds:  # ModelCompose's eval_avqa.py: output.strip()[:1] == the answer's letter
        assert p["correct"] == (p["output"].strip()[:1] == p["answer"])
    assert json.loads((tmp_path / "o" / "results.json").read_text())["mode"] == "first-char"
    res = CliRunner().invoke(main, [composites["three"], str(mcub4), "--labels", ",".join(LABELS), "--out",
                                    str(tmp_path / "o4"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 1 and "skipped 2, which need point_cloud" in res.output, res.output
    mixed = load_benchmark(mcub4) + load_benchmark(mcub3)
    out = evaluate(composites["three"], mixed, labels=LABELS, progress=False)
    assert out.skipped == {"common-4": 2} and [p["id"] for p in out.predictions] == ["mcub3_0", "mcub3_1"]
