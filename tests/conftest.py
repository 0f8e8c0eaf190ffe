"""Tiny real-layout checkpoints shared by the tests (built once per session, seconds)."""

import pytest

from mergekit_multimodal.testing import build_tiny_family
from tests.helpers import KINDS


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("fam"), KINDS)


@pytest.fixture(scope="session")
def next_family(tmp_path_factory):
    """LLaVA-NeXT (anyres images) on its own: the others don't need it."""
    return build_tiny_family(tmp_path_factory.mktemp("next"), ("llava_next",))


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory):
    """Mistral3 (vision) + Voxtral (audio) on a Mistral base, as Mistral-Small-3.1 + Voxtral-Small."""
    return build_tiny_family(tmp_path_factory.mktemp("mistral"), ("mistral3", "voxtral"), text_family="mistral")


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory):
    """Tied input/output embeddings (no lm_head tensor), as Mistral3 checkpoints ship."""
    return build_tiny_family(tmp_path_factory.mktemp("tied"), ("mistral3", "llava"), text_family="mistral",
                             tie_word_embeddings=True)


@pytest.fixture(scope="session")
def gemma_family(tmp_path_factory):
    """Gemma 3 + a fine-tune of it (MedGemma's stand-in) on a Gemma 3 text base: two image routes."""
    return build_tiny_family(tmp_path_factory.mktemp("gemma"), ("gemma3", "medgemma"))


@pytest.fixture(scope="session")
def onevision_family(tmp_path_factory):
    """LLaVA-OneVision (image) + LLaVA-Video (video), one class."""
    return build_tiny_family(tmp_path_factory.mktemp("onevision"), ("llava_onevision", "llava_video"))


@pytest.fixture(scope="module")
def sources(family, tmp_path_factory):
    """DAMC sources: decoupled adapters trained for a few steps on the base, one per modality."""
    from tests.test_damc import _peft_source

    root = tmp_path_factory.mktemp("damc")
    return {"image": _peft_source(family, root / "image", "image", 1),
            "audio": _peft_source(family, root / "audio", "audio", 2)}


@pytest.fixture(scope="session")
def qwen2_vl_family(tmp_path_factory):
    """Qwen2-VL as an image route and as a video route (one class), on its own text model."""
    return build_tiny_family(tmp_path_factory.mktemp("qwen2vl"), ("qwen2_vl", "qwen2_vl_video"))


@pytest.fixture(scope="session")
def qwen25_vl_family(tmp_path_factory):
    """Two task fine-tunes of one Qwen2.5-VL (OptMerge's experts): two image routes."""
    return build_tiny_family(tmp_path_factory.mktemp("qwen25vl"), ("qwen2_5_vl", "qwen2_5_vl_ocr"))
