"""Our point-cloud layout: the engine reads it, the loader rebuilds the encoder, files feed it."""

import numpy as np
import pytest
import torch
import transformers as T

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.families import point_cloud as PC
from mergekit_multimodal.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("pc") / "src"
    torch.manual_seed(0)
    tok = build_tokenizer(["<point>"])
    text = T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = PC.PointLlavaForConditionalGeneration(
        PC.make_config(text.to_dict(), tok.convert_tokens_to_ids("<point>"), hidden_size=8, num_points=16),
        T.LlamaForCausalLM(text))
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d, model.eval()


def test_composite_of_a_point_cloud_source_reproduces_its_features_and_logits(source, tmp_path):
    d, model = source
    out = compose({"merge_method": "naive_mc", "base_model": str(d), "dtype": "float32",
                   "models": [{"model": str(d), "modality": "point_cloud"}]}, str(tmp_path / "c"))
    pts = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    comp, proc = CompositeModel.from_pretrained(out), CompositeProcessor.from_pretrained(out)
    inputs = proc("input 1 : <point> . describe :", media={"point_cloud": [str(tmp_path / "p.npy")]})
    feats = PC.preprocess_point_clouds([pts], str(d))["point_clouds"]
    with torch.no_grad():
        want = model.get_point_features(feats)[0]
        got = comp.encoders["point_cloud"].features(inputs["media"]["point_cloud"])[0]
        assert torch.allclose(got, want, atol=1e-6)
        ids = proc.tokenizer("input 1 :")["input_ids"]
        after = proc.tokenizer(". describe :")["input_ids"]
        emb = model.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(ids)), want, emb(torch.tensor(after))])[None]
        ref = model.language_model(inputs_embeds=embeds).logits[0, -1]
        assert torch.allclose(comp(**inputs).logits[0, -1], ref, atol=1e-5)


def test_bad_point_cloud_files_are_named(source, tmp_path):
    d, _ = source
    np.save(tmp_path / "flat.npy", np.zeros(12, np.float32))
    with pytest.raises(CompositionError, match="flat.npy: a point cloud is"):
        PC.preprocess_point_clouds([str(tmp_path / "flat.npy")], str(d))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(CompositionError, match="empty.npy: a point cloud is .* at least one point"):
        PC.preprocess_point_clouds([str(tmp_path / "empty.npy")], str(d))
    np.save(tmp_path / "xy.npy", np.zeros((8, 2), np.float32))
    with pytest.raises(CompositionError, match="xy.npy: 2 channels per point; the encoder needs 3"):
        PC.preprocess_point_clouds([str(tmp_path / "xy.npy")], str(d))
    (tmp_path / "junk.npy").write_text("x")
    with pytest.raises(CompositionError, match="junk.npy: not a readable .npy point cloud"):
        PC.preprocess_point_clouds([str(tmp_path / "junk.npy")], str(d))
