"""CI: the zoo (the README's, with a 40-question test split) tells the composition story.

Composites answer multi-modal commonality questions zero-shot well above chance (25%), MMER keeps
more of each source's own-task accuracy than NaiveMC, the image source's fine-tune forgets its task,
exported routes answer as the routes do, and the story's files hold what it printed.
A few minutes on 2 CPU cores.
"""

import json
import os

import pytest

from mergekit_multimodal.zoo.story import QUICK, run_story

ROWS = ["naive_mc", "mmer", "damc"]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("zoo")
    out = str(root / "out")
    before = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_info()  # the story must hand this back unchanged
    try:
        yield out, run_story(out, QUICK, cache=str(root / "cache"), echo=lambda *_: None, rows_wanted=ROWS), \
            transformers.utils.logging.get_verbosity()
    finally:
        transformers.utils.logging.set_verbosity(before)


def test_composites_answer_multimodal_questions_well_above_chance(story):
    """Beyond the 95% interval (zoo/stats.py: over the seeds and questions): its low end clears chance."""
    iv = story[1]["intervals"]
    for row in ROWS:
        for subset in ("common-2", "common-3", "common-4"):
            assert iv[row][subset][0] > 0.25, (row, subset, iv[row])


def test_shuffled_media_control_falls_to_chance(story):
    """The same composite with each question shown another question's media: not above chance within
    its interval, and wholly below the composite's own interval: the answers came from the inputs."""
    iv = story[1]["intervals"]
    for subset in ("common-2", "common-3", "common-4"):
        lo, hi = iv["mmer, media shuffled"][subset]
        assert lo <= 0.25 and hi < iv["mmer"][subset][0], (subset, iv["mmer, media shuffled"], iv["mmer"])


def test_mmer_retains_more_than_naive_mc(story):
    t = story[1]["table"]
    assert t["mmer"]["retention"] > t["naive_mc"]["retention"], t


def test_claims_carry_their_intervals(story):
    """Every claim the README states is in the JSON with its estimate inside its interval."""
    claims = {c["claim"]: c for c in story[1]["claims"]}
    assert "mmer retention - naive_mc retention > 0" in claims and "mmer retention >= 99%" in claims
    for c in claims.values():
        point, lo, hi = c["value"]
        assert lo <= point <= hi and c["holds"] in (True, False), c


def test_intervals_cover_seeds_and_questions():
    """The bootstrap widens with disagreement between seeds; one seed: question sampling only."""
    import numpy as np

    from mergekit_multimodal.zoo import stats

    agree = {"r": {"s": np.array([[1, 0] * 50, [1, 0] * 50], dtype=float)}}
    differ = {"r": {"s": np.array([[1] * 80 + [0] * 20, [1] * 20 + [0] * 80], dtype=float)}}
    p1, lo1, hi1 = stats.estimate(agree, stats.accuracy("r", "s"))
    p2, lo2, hi2 = stats.estimate(differ, stats.accuracy("r", "s"))
    assert p1 == p2 == 0.5 and lo1 < 0.5 < hi1 and hi2 - lo2 > 2 * (hi1 - lo1)


def test_video_shows_the_first_concept_then_the_second():
    """Each video frame's centre (always inside its concept's rectangle: data.VIDEO_PATCH's least
    side covers it wherever the rectangle lies) is one concept's colour at a brightness within
    data.BRIGHTNESS: the first concept's in the first 1-3 frames, the second's after; over many
    videos every split occurs (a concept may be shown for one frame only)."""
    import numpy as np

    from mergekit_multimodal.zoo import data

    lo, hi = data.IMAGE_SIZE - data.VIDEO_PATCH[0], data.VIDEO_PATCH[0]  # the centre every rectangle covers
    assert lo < hi

    def shows(frame, c):  # the centre's median colour is c's at some brightness in range (within pixel noise)
        med = np.median(frame[lo:hi, lo:hi].reshape(-1, 3).astype(float), axis=0)
        return any(np.abs(med - np.clip(s * np.array(data.RGB[c], dtype=float), 0, 255)).max() < 10
                   for s in np.linspace(*data.BRIGHTNESS, 71))

    rng = np.random.default_rng(0)
    splits = set()
    for pair in [("red", "blue"), ("yellow", "black"), ("green", "purple"), ("white", "brown")] * 8:
        v = data.video(pair, rng)
        assert v.shape == (data.FRAMES, data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and v.dtype == np.uint8
        shown = [[c for c in pair if shows(f, c)] for f in v]
        k = shown.count([pair[0]])
        assert 1 <= k < data.FRAMES and shown == [[pair[0]]] * k + [[pair[1]]] * (data.FRAMES - k), (pair, shown)
        splits.add(k)
    assert splits == set(range(1, data.FRAMES)), splits


def test_retention_is_computed_from_the_predictions(story):
    """Each accuracy recounted from the saved per-question predictions; retention from those counts."""
    res = story[1]["results"]
    with open(os.path.join(story[1]["benchmark"], "benchmark.jsonl")) as f:
        truth = {q["id"]: "ABCD".index(q["answer"]) for q in map(json.loads, f)}

    def acc(result, subset):
        preds = [p for p in result["predictions"] if p["subset"] == subset]
        return sum(p["index"] == truth[p["id"]] for p in preds) / len(preds)

    mods = ("image", "audio", "video", "point_cloud")
    own = {m: acc(res[f"source {m}"], m) for m in mods}
    damc_own = {m: acc(res["damc sources"][m], m) for m in mods}
    for row, base in (("mmer", own), ("naive_mc", own), ("damc", damc_own)):
        want = sum(acc(res[row], m) / base[m] for m in mods) / len(mods)
        assert story[1]["table"][row]["retention"] == pytest.approx(want), row


def test_results_files_are_written(story):
    out, doc = story[:2]
    with open(os.path.join(out, "zoo-results.json")) as f:
        saved = json.load(f)
    assert set(saved["table"]) >= set(ROWS) and saved["timings"]["total_s"] > 0
    assert os.path.getsize(os.path.join(out, "zoo-results.png")) > 10_000
    for row in ROWS:  # every question asked of every composite: 4 own tasks + 3 commonality subsets
        assert doc["results"][row]["total"] == 7 * QUICK.test_per_subset and not doc["results"][row]["skipped"]


def test_the_fine_tune_forgets_its_sources_task(story):
    """The forgetting section: the image source fine-tuned on `more` only learns the new task beyond
    the interval and loses part of its own task, and the MMER composite of the two recovers part of it. At 40 questions a subset the interval cannot resolve
    this task's drop (100 questions, seed 0: 22 points [12, 33]; the quick zoo: 15 [-2, 30]), so the
    drop is asserted on its estimate; the README's three-seed run states it with its interval. Every
    row is scored on both tasks."""
    from mergekit_multimodal.zoo import stats

    correct = stats.stack([s["correct"] for s in story[1]["per_seed"]])
    source, tuned = "forgetting source image", "forgetting fine-tune image_new"
    learnt = stats.estimate(correct, stats.difference(stats.accuracy(tuned, "new-task"),
                                                      stats.accuracy(source, "new-task")))
    assert learnt[1] > 0, learnt  # the new task: beyond the interval
    claims = {c["claim"]: c for c in story[1]["claims"]}
    assert claims["forgetting: source image - its fine-tune on old-task > 0"]["value"][0] > 0, claims
    # MMER's claim: its composite of the two mitigates the forgetting (old task above the fine-tune's)
    assert claims["forgetting: mmer - the fine-tune on old-task > 0"]["value"][0] > 0, claims
    rows = story[1]["forgetting"]
    assert set(rows) == {"source image", "fine-tune image_new", *ROWS}, rows
    assert all(set(v) == {"old-task", "new-task"} for v in rows.values()), rows


def test_retention_curve_composes_one_to_all_sources(story):
    """Retention as 1..5 sources are composed; a one-source NaiveMC composite is its source."""
    out, doc = story[:2]
    curve = doc["retention_curve"]
    assert curve["order"] == ["image", "audio", "video", "point_cloud", "image_new"]
    for row in ROWS:
        assert [k for k, *_ in curve["rows"][row]] == [1, 2, 3, 4, 5], curve
    assert curve["rows"]["naive_mc"][0][1] == 1.0
    assert os.path.getsize(os.path.join(out, "zoo-retention.png")) > 10_000
    assert os.path.getsize(os.path.join(out, "zoo-forgetting.png")) > 10_000


def test_exported_routes_answer_as_the_mmer_routes(story):
    """Each route exported as a plain checkpoint (mergekit-mm-export) answers every own-task question
    as the mmer row does on that route; the point-cloud family, not a transformers class, is refused."""
    doc = story[1]
    correct = doc["per_seed"][0]["correct"]
    assert set(doc["export"]["refused"]) == {"point_cloud"}, doc["export"]
    for m in ("image", "audio", "video"):
        assert correct["mmer export"][m] == correct["mmer"][m], m


def test_a_second_run_reads_every_evaluation_from_the_cache(story, monkeypatch):
    """The same zoo asked again (same cache, same code): no model is evaluated, every number the same."""
    from mergekit_multimodal import evaluation

    def refuse(*args, **kwargs):
        raise AssertionError(f"evaluated again: {args}")

    monkeypatch.setattr(evaluation, "evaluate", refuse)
    out, doc = story[:2]
    again = run_story(out + "-again", QUICK, cache=os.path.join(os.path.dirname(out), "cache"), echo=lambda *_: None,
                      rows_wanted=ROWS)
    assert again["table"] == doc["table"] and again["per_seed"] == doc["per_seed"]


def test_evaluations_are_cached_by_content(family, tmp_path, monkeypatch):
    """evaluate_cached asks the evaluator once for one model, benchmark, code and options; a changed
    weight of the composite, media file, question file or option asks it again, and the answer
    follows the change."""
    from safetensors.torch import load_file, save_file

    from mergekit_multimodal import compose, evaluation
    from mergekit_multimodal.zoo.story import evaluate_cached
    from tests.helpers import composite_config
    from tests.test_processor import write_media

    composite = compose(composite_config(family, "naive_mc", ["llava"]), str(tmp_path / "c"))
    bench = tmp_path / "bench"
    (bench / "m").mkdir(parents=True)
    write_media("image", bench / "m", 0)

    def write_questions(answers):
        (bench / "benchmark.jsonl").write_text("".join(json.dumps(
            {"id": f"q{i}", "subset": "image", "question": "<image> w5 w6", "choices": ["w1", "w2", "w3", "w4"],
             "labels": ["w10", "w11", "w12", "w13"], "answer": a, "media": {"image": ["m/x.png"]}}) + "\n"
            for i, a in enumerate(answers)))

    write_questions("AB")
    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(a) or real(*a, **k))
    zoo = str(tmp_path / "zoo")
    ask = lambda **options: evaluate_cached(zoo, composite, str(bench), answer_with="label", **options)  # noqa: E731
    first = ask()
    assert len(calls) == 1 and ask() == first and len(calls) == 1  # read back whole: predictions, scores
    write_media("image", bench / "m", 1)  # other pixels, same file name
    second = ask()
    assert len(calls) == 2
    write_questions("CD")  # other answers
    third = ask()
    assert len(calls) == 3 and [p["answer"] for p in third.predictions] == ["w12", "w13"]
    assert [p["index"] for p in third.predictions] == [p["index"] for p in second.predictions]
    shard = next(os.path.join(d, f) for d, _, fs in os.walk(composite) for f in fs if f.endswith(".safetensors"))
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    ask()
    assert len(calls) == 4
    ask(batch_size=1)
    assert len(calls) == 5 and ask() and len(calls) == 5
    assert len(os.listdir(next(p for p in (tmp_path / "zoo").iterdir()) / "evaluations")) == 5


def test_the_story_restores_transformers_logging(story):
    import transformers

    assert story[2] == transformers.logging.INFO


def test_stale_composite_caches_are_pruned(tmp_path):
    from mergekit_multimodal.zoo.story import prune_stale_composites

    cur, old, other = "a" * 10, "b" * 10, "c" * 10
    names = [f"composites-{cur}", f"composites-{old}", f"sources-{cur}", f"sources-{old}", f"sources-{other}",
             "sources-mine", "bench-test", "base"]
    for d in names:
        (tmp_path / d).mkdir()
        if d != f"sources-{other}":  # that one was used within the day: another checkout may be running
            os.utime(tmp_path / d, (1e9, 1e9))
    assert prune_stale_composites(str(tmp_path), cur) == [f"composites-{old}", f"sources-{old}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {f"composites-{old}", f"sources-{old}"})


def test_low_rank_exports_report_their_error(story):
    """Each mmer route as a rank-r adapter over its source class holding the merged LLM (`--lora --rank
    r --base`), merged by PEFT and scored as its source: every rank has its routes and a retention, and
    a higher rank's reported probe logit error is lower (its truncated SVD keeps more of each delta)."""
    from mergekit_multimodal.zoo.story import LORA_RANKS

    rows = story[1]["export_lora"]
    assert list(rows) == [f"lora r{r}" for r in LORA_RANKS], rows
    for row in rows.values():
        assert set(row["routes"]) == set(row["probe"]) == {"image", "audio", "video"} and len(row["retention"]) == 3
    for m in ("image", "audio", "video"):
        errors = [rows[f"lora r{r}"]["probe"][m] for r in LORA_RANKS]
        assert errors == sorted(errors, reverse=True) and errors[-1] > 0, (m, errors)
