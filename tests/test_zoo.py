"""CI: a reduced zoo (fewer training steps, smaller test split) tells the composition story.

Composites answer multi-modal commonality questions zero-shot well above chance (25%), and
MMER keeps more of each source's own-task accuracy than NaiveMC. Minutes on 2 CPU cores.
"""

import pytest

from mergekit_multimodal.zoo.story import QUICK, run_story


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return run_story(str(root / "out"), QUICK, cache=str(root / "cache"), echo=lambda *_: None,
                     rows_wanted=["naive_mc", "mmer"])


def test_composites_answer_multimodal_questions_well_above_chance(story):
    for row in ("naive_mc", "mmer"):
        for subset in ("common-2", "common-3", "common-4"):
            assert story["table"][row][subset] >= 0.45, (row, subset, story["table"][row])


def test_mmer_retains_more_than_naive_mc(story):
    t = story["table"]
    assert t["mmer"]["retention"] > t["naive_mc"]["retention"], t


def test_results_files_are_written(story, tmp_path_factory):
    import os

    out = os.path.dirname(story["benchmark"])
    assert os.path.isdir(out) and story["timings"]["total_s"] > 0
