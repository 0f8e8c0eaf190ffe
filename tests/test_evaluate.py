"""`mergekit-mm-eval`: benchmark parsing, first-label scoring against an independent forward, routes,
single sources, outputs, CLI.

The tiny tokenizer is word-level (w0..w92): letters are unknown to it, so the questions here carry
their own choice labels w10..w13 (the `labels` field), which the evaluator shows and scores.
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.evaluation import (
    EvalResult,
    build_prompt,
    evaluate,
    evaluate_accuracy,
    format_table,
    label_token_ids,
    load_benchmark,
    load_results,
    parse_label,
    write_results,
)
from mergekit_multimodal.evaluation.cli import main
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from tests.helpers import composite_config
from tests.test_processor import write_media

LABELS = ["w10", "w11", "w12", "w13"]


@pytest.fixture(scope="module")
def composite(family, tmp_path_factory):
    return compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path_factory.mktemp("ev") / "c"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    out = {}
    for kind, seed in (("image", 0), ("audio", 1)):
        sub = d / f"{kind}{seed}"
        sub.mkdir()
        out[kind] = write_media(kind, sub, seed)[0]
    sub = d / "image2"
    sub.mkdir()
    out["image2"] = write_media("image", sub, 7)[0]
    return out


def write_bench(d: Path, questions, name="benchmark.jsonl") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return p


# Questions: text with <modality> markers (or none), their own labels; answers filled in per test.
QUESTIONS = [
    {"id": "i1", "subset": "image", "question": "<image> w5 w6", "choices": ["w1", "w2", "w3", "w4"],
     "media": {"image": ["IMG"]}},
    {"id": "i2", "subset": "image", "question": "w7 w8", "choices": ["w1", "w2", "w3"], "media": {"image": ["IMG2"]}},
    {"id": "a1", "subset": "audio", "question": "w9 <audio>", "choices": ["w1", "w2"], "media": {"audio": "WAV"}},
    {"id": "c1", "subset": "common-2", "question": "<audio> w20 <image> w21", "choices": ["w1", "w2", "w3", "w4"],
     "media": {"image": ["IMG"], "audio": ["WAV"]}},
]
# The same prompts written by hand, with the composite's placeholders and the default template.
PROMPTS = {
    "i1": "<image> w5 w6\nw10. w1\nw11. w2\nw12. w3\nw13. w4\nAnswer:",
    "i2": "<image> w7 w8\nw10. w1\nw11. w2\nw12. w3\nAnswer:",
    "a1": "w9 <|AUDIO|>\nw10. w1\nw11. w2\nAnswer:",
    "c1": "<|AUDIO|> w20 <image> w21\nw10. w1\nw11. w2\nw12. w3\nw13. w4\nAnswer:",
}


def _questions(media, answers):
    subst = {"IMG": str(media["image"]), "IMG2": str(media["image2"]), "WAV": str(media["audio"])}
    out = []
    for q in QUESTIONS:
        q = json.loads(json.dumps(q))
        q["media"] = {m: subst[v] if isinstance(v, str) else [subst[x] for x in v] for m, v in q["media"].items()}
        q["labels"] = LABELS
        q["answer"] = answers[q["id"]]
        out.append(q)
    return out


def independent_predictions(composite, media, route):
    """argmax over the label tokens' next-token logits, from a plain forward of each hand-written prompt alone."""
    proc = CompositeProcessor.from_pretrained(composite)
    model = CompositeModel.from_pretrained(composite)
    ids = [proc.tokenizer.convert_tokens_to_ids(t) for t in LABELS]
    subst = {"image": [media["image"]], "audio": [media["audio"]]}
    files = {"i1": {"image": subst["image"]}, "i2": {"image": [media["image2"]]}, "a1": {"audio": subst["audio"]},
             "c1": {"image": subst["image"], "audio": subst["audio"]}}
    routes = {"i1": "image", "i2": "image", "a1": "audio", "c1": None} if route == "auto" else dict.fromkeys(PROMPTS, route)
    preds = {}
    for qid, prompt in PROMPTS.items():
        n = prompt.count("\nw1")
        with torch.no_grad(), model.route(routes[qid]):
            logits = model(**proc(prompt, media=files[qid])).logits[0, -1]
        preds[qid] = int(torch.argmax(logits[ids[:n]]))
    return preds


# -- parsing ----------------------------------------------------------------------------------------
def test_load_benchmark_reads_jsonl_json_and_directories(media, tmp_path):
    qs = _questions(media, {"i1": "B", "i2": 2, "a1": "w11", "c1": "a"})
    qs[1]["media"]["image"] = ["../" + Path(media["image2"]).parent.name + "/x.png"]  # relative to the file
    d = Path(media["image2"]).parent.parent / "bench"
    write_bench(d, qs)
    got = load_benchmark(d)  # a directory holding benchmark.jsonl
    assert [q.id for q in got] == ["i1", "i2", "a1", "c1"]
    assert [q.answer for q in got] == [1, 2, 1, 0]
    assert got[1].media == {"image": [str(d / ".." / Path(media["image2"]).parent.name / "x.png")]}
    assert got[2].media == {"audio": [str(media["audio"])]} and got[0].labels == LABELS
    assert got[0].where == "benchmark.jsonl:1" and got[3].subset == "common-2"
    # default subset: the one modality, common-N for several, text for none; default id: the line
    bare = [{"question": "<image> w1", "choices": ["w1", "w2"], "answer": "A", "media": {"image": str(media["image"])}},
            {"question": "w1", "choices": ["w1", "w2"], "answer": 1,
             "media": {"image": str(media["image"]), "audio": str(media["audio"])}},
            {"question": "w1", "choices": ["w1", "w2"], "answer": "B"}]
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"questions": bare}))
    got = load_benchmark(p)
    assert [(q.id, q.subset) for q in got] == [("question 1", "image"), ("question 2", "common-2"), ("question 3", "text")]
    p.write_text(json.dumps(bare))
    assert [q.subset for q in load_benchmark(p)] == ["image", "common-2", "text"]


@pytest.mark.parametrize("line, message", [
    ({"answer": "E"}, "benchmark.jsonl:2: answer 'E' but only 4 choices"),
    ({"answer": "AB"}, "benchmark.jsonl:2: answer 'AB' is not a letter"),
    ({"answer": 4}, "benchmark.jsonl:2: answer index 4 but only 4 choices"),
    ({"media": {"image": ["nope.png"]}}, "benchmark.jsonl:2: image file not found: nope.png"),
    ({"choices": None}, "benchmark.jsonl:2: missing field 'choices'"),
    ({"choices": ["w1"]}, "benchmark.jsonl:2: 'choices' must be a list of at least 2"),
    ({"question": "<image> <image> w1"}, "benchmark.jsonl:2: the question has 2 <image> marker(s) but 1 image file"),
    ({"id": "q1"}, "benchmark.jsonl:2: id 'q1' already used at benchmark.jsonl:1"),
    ({"labels": ["w1", "w1", "w2", "w3"]}, "benchmark.jsonl:2: 'labels' must be a list of distinct"),
    ("{not json", "benchmark.jsonl:2: not valid JSON"),
])
def test_bad_lines_name_the_file_and_line(media, tmp_path, line, message):
    good = {"id": "q1", "question": "<image> w1", "choices": ["w1", "w2", "w3", "w4"], "answer": "A",
            "media": {"image": [str(media["image"])]}}
    if isinstance(line, str):
        bad_line = line
    else:
        bad = {**good, "id": "q2", **line}
        bad = {k: v for k, v in bad.items() if v is not None}
        bad_line = json.dumps(bad)
    p = tmp_path / "benchmark.jsonl"
    p.write_text(json.dumps(good) + "\n" + bad_line + "\n")
    with pytest.raises(CompositionError) as exc:
        load_benchmark(p)
    assert message in str(exc.value)


def test_prompt_building_and_label_tokens(composite, media):
    proc = CompositeProcessor.from_pretrained(composite)
    qs = load_benchmark(write_bench(Path(media["image"]).parent.parent / "p",
                                    _questions(media, dict.fromkeys(PROMPTS, 0))))
    for q in qs:
        assert build_prompt(q, proc.placeholders, labels=q.labels) == PROMPTS[q.id]
    assert build_prompt(qs[2], proc.placeholders, "USER: {question} ({choices}) ASSISTANT:", ["x", "y"]) == \
        "USER: w9 <|AUDIO|> (x. w1\ny. w2) ASSISTANT:"
    bare = load_benchmark(write_bench(Path(media["image"]).parent.parent / "p2", [
        {"question": "w1", "choices": ["w2", "w3"], "answer": 0,
         "media": {"audio": [str(media["audio"])], "image": [str(media["image"])] * 2}}]))[0]
    assert build_prompt(bare, proc.placeholders).startswith("<|AUDIO|> <image> <image> w1\nA. w2\nB. w3")
    assert label_token_ids(proc.tokenizer, "w1 w2\nAnswer:", LABELS) == [[proc.tokenizer.convert_tokens_to_ids(t)]
                                                                         for t in LABELS]
    with pytest.raises(CompositionError, match="no token for the choice label 'A'"):
        label_token_ids(proc.tokenizer, "Answer:", ["A", "B"])  # letters are unknown to the tiny vocabulary
    assert parse_label(" (B) rain", ["A", "B"]) == 1 and parse_label("B. x", ["A", "B"]) == 1
    assert parse_label("Because", ["A", "B"]) is None and parse_label("w11", LABELS) == 1


# -- scoring ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", [None, "image", "auto"])
def test_predictions_match_an_independent_forward_and_accuracy_is_hand_computed(composite, media, tmp_path, route):
    want = independent_predictions(composite, media, route)
    n_choices = {q["id"]: len(q["choices"]) for q in QUESTIONS}
    # i1 and c1 answered as predicted (right); i2 and a1 answered with another choice (wrong)
    answers = {"i1": want["i1"], "c1": want["c1"], "i2": (want["i2"] + 1) % n_choices["i2"],
               "a1": (want["a1"] + 1) % n_choices["a1"]}
    bench = write_bench(tmp_path, _questions(media, answers))
    res = evaluate(composite, str(bench), route=route, batch_size=3, progress=False)  # batches mix lengths
    got = {p["id"]: p["index"] for p in res.predictions}
    assert got == want
    assert [p["id"] for p in res.predictions] == ["i1", "i2", "a1", "c1"]
    assert res.correct == 2 and res.total == 4 and res.overall == 0.5
    assert {s: (v.correct, v.total) for s, v in res.subsets.items()} == \
        {"image": (1, 2), "audio": (0, 1), "common-2": (1, 1)}
    assert res.subsets["image"].chance == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert res.macro == pytest.approx((0.5 + 0 + 1) / 3)
    if route == "auto":
        assert {p["id"]: p["route"] for p in res.predictions} == {"i1": "image", "i2": "image", "a1": "audio",
                                                                  "c1": None}


def test_batching_does_not_change_scores(composite, media, tmp_path):
    bench = write_bench(tmp_path, _questions(media, dict.fromkeys(PROMPTS, 0)))
    one = evaluate(composite, str(bench), batch_size=1, progress=False)
    four = evaluate(composite, str(bench), batch_size=4, progress=False)
    for a, b in zip(one.predictions, four.predictions):
        assert a["index"] == b["index"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_answer_with_choice_scores_the_choice_words(composite, media, tmp_path):
    """The prompt still shows the labels; each choice scores its own word's next-token logit."""
    bench = write_bench(tmp_path, _questions(media, dict.fromkeys(PROMPTS, 1)))
    res = evaluate(composite, str(bench), answer_with="choice", progress=False)
    proc = CompositeProcessor.from_pretrained(composite)
    model = CompositeModel.from_pretrained(composite)
    with torch.no_grad():
        logits = model(**proc(PROMPTS["i1"], media={"image": [str(media["image"])]})).logits[0, -1]
    words = [proc.tokenizer.convert_tokens_to_ids(w) for w in ("w1", "w2", "w3", "w4")]
    p = res.predictions[0]
    assert p["scores"] == pytest.approx([float(logits[t]) for t in words], abs=1e-4)
    assert p["index"] == int(torch.argmax(logits[words])) and p["answer"] == "w2"
    assert p["predicted"] == ["w1", "w2", "w3", "w4"][p["index"]]
    with pytest.raises(CompositionError, match="answer_with"):
        evaluate(composite, str(bench), answer_with="word", progress=False)


def test_generate_mode_reads_the_first_label(composite, media, tmp_path):
    bench = write_bench(tmp_path, _questions(media, dict.fromkeys(PROMPTS, 0)))
    res = evaluate(composite, str(bench), generate=True, max_new_tokens=2, progress=False)
    proc = CompositeProcessor.from_pretrained(composite)
    model = CompositeModel.from_pretrained(composite)
    q = res.predictions[0]
    inputs = proc(PROMPTS["i1"], media={"image": [str(media["image"])]})
    text = proc.decode(model.generate(**inputs, max_new_tokens=2, do_sample=False)[0], skip_special_tokens=True)
    assert q["output"] == text
    idx = parse_label(text, LABELS)
    assert q["index"] == (-1 if idx is None else idx) and q["correct"] == (idx == 0)
    assert res.mode == "generate" and res.correct == sum(p["correct"] for p in res.predictions)


def test_evaluate_accuracy_and_limit_and_subsets(composite, media, tmp_path):
    want = independent_predictions(composite, media, None)
    answers = {"i1": want["i1"], "i2": want["i2"], "a1": want["a1"], "c1": (want["c1"] + 1) % 4}
    bench = write_bench(tmp_path, _questions(media, answers))
    assert evaluate_accuracy(composite, str(bench)) == 0.75
    assert evaluate_accuracy(composite, str(bench), limit=2) == 1.0
    res = evaluate(composite, str(bench), subsets=["common-2"], progress=False)
    assert res.total == 1 and res.overall == 0.0
    with pytest.raises(CompositionError, match="no subset 'video'"):
        evaluate(composite, str(bench), subsets=["video"], progress=False)
    with pytest.raises(CompositionError, match="no route 'video'"):
        evaluate(composite, str(bench), route="video", progress=False)


# -- single sources ---------------------------------------------------------------------------------
def test_a_single_source_scores_as_its_one_source_composite(family, media, tmp_path):
    bench = write_bench(tmp_path / "b", _questions(media, {"i1": 0, "i2": 1, "a1": 0, "c1": 0}))
    one = compose(composite_config(family, "naive_mc", ["llava"]), str(tmp_path / "one"))
    want = evaluate(one, str(bench), progress=False)
    got = evaluate(str(family.sources["llava"]), str(bench), progress=False, cache_dir=str(tmp_path / "cache"))
    assert [p["id"] for p in got.predictions] == ["i1", "i2"]  # audio questions skipped: llava has no audio
    assert got.skipped == {"audio": 1, "common-2": 1} == want.skipped
    for a, b in zip(got.predictions, want.predictions):
        assert a["index"] == b["index"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert got.overall == want.overall and got.name == "llava"
    assert list((tmp_path / "cache").iterdir())  # the one-source composite, kept for reuse
    audio = evaluate(str(family.sources["qwen2_audio"]), str(bench), progress=False)  # modality from the family
    assert [p["id"] for p in audio.predictions] == ["a1"]


# -- outputs and CLI --------------------------------------------------------------------------------
def test_write_results_and_table(composite, media, tmp_path):
    bench = write_bench(tmp_path / "b", _questions(media, dict.fromkeys(PROMPTS, 0)))
    res = evaluate(composite, str(bench), progress=False, name="mmer")
    paths = write_results(res, str(tmp_path / "out"))
    data = json.loads(Path(paths["results"]).read_text())
    assert data["overall"] == res.overall and data["subsets"]["image"]["total"] == 2 and "predictions" not in data
    lines = Path(paths["predictions"]).read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["i1", "i2", "a1", "c1"]
    assert Path(paths["plot"]).read_bytes()[:4] == b"\x89PNG"
    back = load_results(str(tmp_path / "out"))
    assert back == res  # results.json + predictions.jsonl give the same EvalResult
    other = EvalResult(**{**res.__dict__, "name": "other"})
    table = format_table([res, other])
    header, _, *rows = table.splitlines()
    assert header.split() == ["subset", "n", "mmer", "other"]
    assert [r.split()[0] for r in rows] == ["image", "audio", "common-2", "overall", "macro"]
    assert rows[3].split()[2] == f"{100 * res.overall:.1f}"


def test_cli_writes_outputs_prints_a_table(composite, media, tmp_path):
    bench = write_bench(tmp_path / "b", _questions(media, dict.fromkeys(PROMPTS, 0)))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [composite, str(bench), "--out", str(out), "--device", "cpu", "--quiet",
                                    "--route", "auto", "--subset", "image", "--subset", "audio"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].split() == ["subset", "n", "c"]
    assert "overall" in res.stdout
    data = json.loads((out / "results.json").read_text())
    assert set(data["subsets"]) == {"image", "audio"} and data["route"] == "auto"
    assert (out / "predictions.jsonl").exists() and (out / "accuracy.png").exists()


@pytest.mark.parametrize("edit, args, message", [
    (lambda qs: qs[:1] + [{**qs[1], "answer": "E"}], [], "benchmark.jsonl:2: answer 'E' but only 3 choices"),
    (lambda qs: qs, ["--subset", "video"], "no subset 'video'"),
    (lambda qs: [{k: v for k, v in q.items() if k != "labels"} for q in qs], [],
     "no token for the choice label 'A'"),
    (lambda qs: qs, ["--labels", "w1,w1"], "give distinct, non-empty labels"),
])
def test_cli_bad_input_exits_1_with_one_line(composite, media, tmp_path, edit, args, message):
    qs = edit(_questions(media, dict.fromkeys(PROMPTS, 0)))
    bench = write_bench(tmp_path / "b", qs)
    res = CliRunner().invoke(main, [composite, str(bench), "--out", str(tmp_path / "o"), "--device", "cpu",
                                    "--quiet", *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and not (tmp_path / "o").exists()
    assert res.stderr.strip().count("\n") == 0  # one line


def test_a_benchmark_video_fills_the_composites_one_video_modality(family, tmp_path):
    """`video` in the benchmark -> `video_next` (the composite's only video modality), `<video_next>` placeholder."""
    out = compose(composite_config(family, "mmer", ["llava_next_video"]), str(tmp_path / "c"))
    clip, _ = write_media("video", tmp_path)
    bench = write_bench(tmp_path / "b", [{"id": "v", "question": "w3 <video> w4", "choices": ["w1", "w2", "w3"],
                                          "labels": LABELS[:3], "answer": 0, "media": {"video": [str(clip)]}}])
    proc = CompositeProcessor.from_pretrained(out)
    model = CompositeModel.from_pretrained(out)
    ids = [proc.tokenizer.convert_tokens_to_ids(t) for t in LABELS[:3]]
    with torch.no_grad(), model.route("video_next"):
        logits = model(**proc("w3 <video_next> w4\nw10. w1\nw11. w2\nw12. w3\nAnswer:",
                              media={"video_next": [str(clip)]})).logits[0, -1]
    res = evaluate(out, str(bench), route="auto", progress=False)
    assert res.predictions[0]["index"] == int(torch.argmax(logits[ids]))
    assert res.predictions[0]["route"] == "video_next" and res.subsets["video"].total == 1


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_gemma3_questions_are_laid_out_as_its_own_processor_lays_them_out(gemma_family, tmp_path, monkeypatch,
                                                                          pan_and_scan):
    """A Gemma 3 composite: the ids the evaluation feeds the model are Gemma3Processor's for the same
    question written with Gemma's own `<start_of_image>` (each image between <start_of_image> and
    <end_of_image>; with pan-and-scan on in the stored config, the crops laid out as it lays them), one
    composite placeholder standing for the source's `mm_tokens_per_image` soft tokens."""
    import numpy as np
    import transformers
    from PIL import Image

    from mergekit_multimodal.evaluation import running

    out = compose(composite_config(gemma_family, "mmer", ["gemma3"]), str(tmp_path / "c"))
    options = {}
    if pan_and_scan:  # as a released config that turns it on would
        options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}
        cfg = Path(out) / "modalities" / "image" / "processor_config.json"
        stored = json.loads(cfg.read_text())
        stored["image_processor"].update(options)
        cfg.write_text(json.dumps(stored))
    img = tmp_path / "wide.png"  # 130 x 40: three crops with pan-and-scan
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 130, 3), dtype=np.uint8)).save(img)
    bench = write_bench(tmp_path / "b", [
        {"id": "m", "question": "w1 <image> w2", "choices": ["w3", "w4"], "labels": LABELS[:2], "answer": "w10",
         "media": {"image": [str(img)]}},
        {"id": "f", "question": "w5", "choices": ["w6", "w7"], "labels": LABELS[:2], "answer": "w11",
         "media": {"image": [str(img)]}}])
    # by hand: the prompts as the source's chat format writes them (the default template)
    own = {"m": "w1 <start_of_image> w2\nw10. w3\nw11. w4\nAnswer:", "f": "<start_of_image> w5\nw10. w6\nw11. w7\nAnswer:"}
    fed = []
    forward = running.next_token_logits
    monkeypatch.setattr(running, "next_token_logits", lambda model, inputs: fed.append(inputs) or forward(model, inputs))
    res = evaluate(out, str(bench), batch_size=1, progress=False)
    assert [p["id"] for p in res.predictions] == ["m", "f"] and len(fed) == 2
    processor = transformers.AutoProcessor.from_pretrained(gemma_family.sources["gemma3"])
    soft = CompositeProcessor.from_pretrained(out).placeholder_ids["image"]
    for qid, inputs in zip(("m", "f"), fed):
        want = processor(text=own[qid], images=[Image.open(img).convert("RGB")], return_tensors="pt", **options)
        assert want["pixel_values"].shape[0] == (4 if pan_and_scan else 1)
        got = [t for t in inputs["input_ids"][0].tolist() for _ in range(4 if t == soft else 1)]
        assert got == want["input_ids"][0].tolist(), qid
        torch.testing.assert_close(inputs["media"]["image"]["pixel_values"], want["pixel_values"])


def test_item_markers_name_each_modality_unambiguously(gemma_family, tmp_path):
    """What the evaluation writes for an item is a marker the processor expands to that modality's item
    text; where `<m>` is another modality's placeholder and no other marker names m's item, an error."""
    cfg = composite_config(gemma_family, "mmer", ["gemma3", "medgemma"])
    cfg["models"][1]["placeholder"] = "<image>"  # image_med's placeholder is the marker of modality `image`
    proc = CompositeProcessor.from_pretrained(compose(cfg, str(tmp_path / "c")))
    assert proc.item_marker("image_med") == "<image_med>"
    assert proc.expand_markers("<image_med>") == "\n\n<start_of_image><image><end_of_image>\n\n"
    with pytest.raises(CompositionError, match=r"modality 'image': no marker stands for its item .*rename the modality"):
        proc.item_marker("image")
    cfg["models"][1]["placeholder"] = "<image_med_soft_token>"
    proc = CompositeProcessor.from_pretrained(compose(cfg, str(tmp_path / "d")))
    assert proc.item_marker("image") == "<image>" and proc.item_marker("image_med") == "<image_med>"
