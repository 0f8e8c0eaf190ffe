"""Checks the tiny-checkpoint factory against independent expectations (real classes, real layouts)."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from mergekit_multimodal.families import tiny_sources
from mergekit_multimodal.testing import SOURCE_KINDS, build_tiny_family, perturb_like

DS = 0.05
CLASSES = {
    "llava": T.LlavaForConditionalGeneration,
    "video_llava": T.VideoLlavaForConditionalGeneration,
    "llava_next_video": T.LlavaNextVideoForConditionalGeneration,
    "qwen2_audio": T.Qwen2AudioForConditionalGeneration,
    "mistral3": T.Mistral3ForConditionalGeneration,
    "voxtral": T.VoxtralForConditionalGeneration,
    "llava_next": T.LlavaNextForConditionalGeneration,
    "gemma3": T.Gemma3ForConditionalGeneration,
    "medgemma": T.Gemma3ForConditionalGeneration,
    "llava_onevision": T.LlavaOnevisionForConditionalGeneration,
    "llava_video": T.LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": T.Qwen2VLForConditionalGeneration,
    "qwen2_vl_video": T.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
    "qwen2_5_vl_ocr": T.Qwen2_5_VLForConditionalGeneration,
}
#: stand-ins whose legacy layout holds the LLM bare (`model.*`, `lm_head.*` beside `visual.*`), as
#: transformers 5.24 writes and the released Qwen2-VL / Qwen2.5-VL checkpoints hold it
BARE_LLM = {"qwen2_vl", "qwen2_vl_video", "qwen2_5_vl", "qwen2_5_vl_ocr"}
# non-LM top-level prefixes of the legacy layout, as in the published checkpoints
ENCODERS = {
    "llava": {"vision_tower", "multi_modal_projector"},
    "video_llava": {"image_tower", "video_tower", "multi_modal_projector"},
    "llava_next_video": {"vision_tower", "multi_modal_projector", "image_newline"},
    "qwen2_audio": {"audio_tower", "multi_modal_projector"},
    "mistral3": {"vision_tower", "multi_modal_projector"},
    "voxtral": {"audio_tower", "multi_modal_projector"},
    "llava_next": {"vision_tower", "multi_modal_projector", "image_newline"},
    "gemma3": {"vision_tower", "multi_modal_projector"},
    "medgemma": {"vision_tower", "multi_modal_projector"},
    "llava_onevision": {"vision_tower", "multi_modal_projector", "image_newline"},
    "llava_video": {"vision_tower", "multi_modal_projector", "image_newline"},
    **{k: {"visual"} for k in BARE_LLM},
}
# placeholder config field -> token, and the expected text vocab (96 + added, llava padded to 8)
PLACEHOLDERS = {
    "llava": ({"image_token_index": "<image>"}, 104),
    "video_llava": ({"image_token_index": "<image>", "video_token_index": "<video>"}, 98),
    "llava_next_video": ({"image_token_index": "<image>", "video_token_index": "<video>"}, 98),
    "qwen2_audio": ({"audio_token_index": "<|AUDIO|>"}, 97),
    "mistral3": ({"image_token_index": "[IMG]"}, 99),  # + [IMG_BREAK], [IMG_END], as Mistral-Small-3.1 has
    "voxtral": ({"audio_token_id": "[AUDIO]"}, 97),
    "llava_next": ({"image_token_index": "<image>"}, 97),
    # + <start_of_image>, <end_of_image> around the soft tokens, as Gemma 3's tokenizer has
    "gemma3": ({"image_token_index": "<image_soft_token>", "boi_token_index": "<start_of_image>"}, 99),
    "medgemma": ({"image_token_index": "<image_soft_token>", "boi_token_index": "<start_of_image>"}, 99),
    "llava_onevision": ({"image_token_index": "<image>", "video_token_index": "<video>"}, 98),
    "llava_video": ({"image_token_index": "<image>", "video_token_index": "<video>"}, 98),
    # + Qwen2's special tokens (<|endoftext|>, <|im_start|> ...) and the vision ones, as Qwen2-VL's tokenizer has
    **{k: ({"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>"}, 110) for k in BARE_LLM},
}


def legacy_llm(kind: str, name: str) -> str:
    """The legacy checkpoint's name of a causal-LM tensor."""
    return name if kind in BARE_LLM else "language_model." + name
#: stand-ins grouped by the text model they need (Gemma 3's own; the others share the default base)
GROUPS = {}
for _k in SOURCE_KINDS:
    GROUPS.setdefault((tiny_sources()[_k][1].text_model or [None])[0], []).append(_k)


class Families:
    """One tiny family per text model, looked up by stand-in."""

    def __init__(self, root, **kw):
        self.by_kind = {}
        for i, kinds in enumerate(GROUPS.values()):
            fam = build_tiny_family(root / str(i), tuple(kinds), **kw)
            self.by_kind.update({k: fam for k in kinds})
        self.default = self.by_kind[GROUPS[None][0]]
        self.base, self.vocab_size = self.default.base, self.default.vocab_size

    def source(self, kind):
        return self.by_kind[kind].sources[kind]


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    return Families(tmp_path_factory.mktemp("legacy"))


@pytest.fixture(scope="module")
def hf5(tmp_path_factory):
    return Families(tmp_path_factory.mktemp("hf5"), layout="hf5")


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_legacy_keys(legacy, kind):
    keys = set(tensors(legacy.source(kind)))
    assert legacy_llm(kind, "model.layers.0.self_attn.q_proj.weight") in keys
    assert legacy_llm(kind, "model.embed_tokens.weight") in keys and legacy_llm(kind, "lm_head.weight") in keys
    llm = {legacy_llm(kind, "model."), legacy_llm(kind, "lm_head.")}
    tops = {k.split(".")[0] for k in keys if not any(k.startswith(p) for p in llm)}
    assert tops == ENCODERS[kind]
    if kind not in BARE_LLM:
        assert not any(k.startswith("model.") or k.startswith("lm_head") for k in keys)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_hf5_keys(legacy, hf5, kind):
    keys = set(tensors(hf5.source(kind)))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in keys and "lm_head.weight" in keys
    assert {k.split(".")[1] for k in keys if k.startswith("model.")} == ENCODERS[kind] | {"language_model"}
    assert not any(k.startswith("language_model.") for k in keys)
    assert len(keys) == len(tensors(legacy.source(kind)))


@pytest.mark.parametrize("layout", ["legacy", "hf5"])
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_loads_with_own_class_and_tokenizer(legacy, hf5, kind, layout):
    d = (legacy if layout == "legacy" else hf5).source(kind)
    model, info = CLASSES[kind].from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q = next(v for k, v in tensors(d).items() if k in (legacy_llm(kind, "model.layers.0.self_attn.q_proj.weight"),
                                                       "model.language_model.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(model.get_decoder().layers[0].self_attn.q_proj.weight, q)  # really loaded, not re-initialised
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()
    fields, vocab = PLACEHOLDERS[kind]
    tok = T.AutoTokenizer.from_pretrained(d)
    assert model.config.get_text_config().vocab_size == vocab == model.get_input_embeddings().weight.shape[0]
    for field, token in fields.items():
        tid = tok.convert_tokens_to_ids(token)
        assert tid >= legacy.vocab_size and tid == getattr(model.config, field)
        assert tid in tok(f"w1 {token} w2")["input_ids"]
    base_tok = T.AutoTokenizer.from_pretrained(legacy.by_kind[kind].base)
    assert tok("w0 w5 w92")["input_ids"] == base_tok("w0 w5 w92")["input_ids"]
    if kind == "llava":
        assert tok.pad_token == "<pad>" and len(tok) == 98 < vocab  # padded rows no tokenizer names


def test_lm_deltas_small_and_source_specific(legacy):
    deltas = {}
    for kind in SOURCE_KINDS:
        base = tensors(legacy.by_kind[kind].base)
        assert base["model.embed_tokens.weight"].shape[0] == legacy.vocab_size == 96
        src = tensors(legacy.source(kind))
        for k, b in base.items():
            s = src[legacy_llm(kind, k)][tuple(slice(0, n) for n in b.shape)]
            if not b.any():  # Gemma's zero-centred norm weights: perturbed at the documented 0.02 scale
                assert 0.4 * DS * 0.02 < s.float().pow(2).mean().sqrt() < 2.0 * DS * 0.02, (kind, k)
                continue
            assert 0.4 * DS < rel(s, b) < 2.0 * DS, (kind, k)
        up = "model.layers.1.mlp.up_proj.weight"
        deltas[kind] = src[legacy_llm(kind, up)] - base[up]
    for a in SOURCE_KINDS:
        for b in SOURCE_KINDS:
            if a < b:
                assert not torch.allclose(deltas[a], deltas[b])


def test_kinds_independent_and_reproducible(tmp_path, legacy):
    solo = build_tiny_family(tmp_path / "a", ("voxtral",))
    build_tiny_family(tmp_path / "b", ("voxtral",))
    full = tensors(legacy.source("voxtral"))
    assert all(torch.equal(v, full[k]) for k, v in tensors(solo.sources["voxtral"]).items())
    for name in ("base/model.safetensors", "voxtral/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other, up = tensors(build_tiny_family(tmp_path / "c", (), seed=1).base), "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(other[up], tensors(legacy.base)[up])


@pytest.mark.parametrize("layout", ["legacy", "hf5"])
def test_tied_has_no_lm_head(tmp_path, layout):
    kinds = ("llava", "video_llava", "llava_next_video", "mistral3")
    fam = build_tiny_family(tmp_path, kinds, text_family="mistral", tie_word_embeddings=True, layout=layout)
    for d in [fam.base, *fam.sources.values()]:
        assert tensors(d) and not any("lm_head" in k for k in tensors(d)), d
    model = CLASSES["mistral3"].from_pretrained(fam.sources["mistral3"])
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("kind", ["qwen2_audio", "voxtral"])
def test_untieable_kinds_refused(tmp_path, kind):
    with pytest.raises(ValueError):
        build_tiny_family(tmp_path, (kind,), tie_word_embeddings=True)


@pytest.mark.parametrize("args", [dict(kinds=("nope",)), dict(text_family="gpt2"), dict(layout="hf4"),
                                  dict(kinds=("gemma3",), text_family="llama")])
def test_bad_arguments(tmp_path, args):
    with pytest.raises(ValueError):
        build_tiny_family(tmp_path, **args)


@pytest.mark.parametrize("layout", ["legacy", "hf5"])
def test_sharded_bf16(tmp_path, layout):
    fam = build_tiny_family(tmp_path, ("llava", "qwen2_audio"), text_family="qwen2", layout=layout,
                            dtype=torch.bfloat16, shard_size="8KB")
    for kind, d in [("base", fam.base), *fam.sources.items()]:
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        shards = sorted(d.glob("model-*-of-*.safetensors"))
        assert len(shards) > 1 and set(index.values()) == {p.name for p in shards}
        for shard in shards:
            with safe_open(shard, "pt") as fh:
                assert all(index[k] == shard.name for k in fh.keys())
                assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())
        assert len(index) == len(tensors(d))
        if kind != "base":
            prefix = "model.language_model." if layout == "hf5" else "language_model.model."
            assert prefix + "layers.0.self_attn.q_proj.bias" in index
            _, info = CLASSES[kind].from_pretrained(d, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]


def test_perturb_like(tmp_path, legacy):
    a = perturb_like(legacy.base, tmp_path / "a", seed=3)
    b = perturb_like(legacy.base, tmp_path / "b", seed=3)
    c = perturb_like(legacy.base, tmp_path / "c", seed=4)
    base, ta, tc = tensors(legacy.base), tensors(a), tensors(c)
    assert set(ta) == set(base) and (a / "config.json").exists() and (a / "tokenizer.json").exists()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    for k in base:
        assert 0.4 * DS < rel(ta[k], base[k]) < 2.0 * DS and not torch.equal(ta[k], tc[k])
    model = T.AutoModelForCausalLM.from_pretrained(a)
    assert math.isfinite(model(torch.tensor([[1, 5, 7]])).logits.sum().item())
