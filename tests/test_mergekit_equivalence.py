"""For classes mergekit itself reads (its architecture files: `gemma3vl` for Gemma3ForConditionalGeneration,
...), a composite's merged LLM equals what `mergekit-yaml` writes for the same plain `linear`
config over the same checkpoints, tensor for tensor (mergekit's output keeps the LLM tensors under
the source's own names)."""

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

from mergekit_multimodal import compose
from mergekit_multimodal.families import LLM, SplitLayout, tiny_sources
from tests.helpers import composite_config, read_dir, released

#: (fixture, stand-ins of one class that mergekit has an architecture file for, the key rename from
#: what transformers writes to the released checkpoints' layout, which mergekit's file lists)
GROUPS = {"gemma3vl": ("gemma_family", ["gemma3", "medgemma"], ("vision_tower.", "vision_tower.vision_model.")),
          # transformers 5.24 writes the layout mergekit's qwen2_5_vl file lists (model.layers, visual.). Not
          # qwen2_vl: mergekit 0.1.5's qwen2_vl file reads the layer count from a top-level num_hidden_layers,
          # which transformers 5's Qwen2VLConfig does not have (it keeps it in text_config, also for a legacy
          # flat config.json), so mergekit-yaml cannot merge Qwen2-VL checkpoints under transformers 5
          "qwen2_5_vl": ("qwen25_vl_family", ["qwen2_5_vl", "qwen2_5_vl_ocr"], ("", ""))}


def llm_of(tensors: dict, kind: str) -> dict:
    """A checkpoint's LLM tensors under causal-LM names, by the stand-in's family layout."""
    layout = SplitLayout(tiny_sources()[kind][0])
    return {name: t for k, t in tensors.items() for part, name in [layout.classify(k)] if part == LLM}


@pytest.mark.parametrize("arch", sorted(GROUPS))
def test_merged_llm_equals_mergekit_yaml_linear(arch, request, tmp_path):
    fixture, kinds, rename = GROUPS[arch]
    fam = released(request.getfixturevalue(fixture), kinds, rename, tmp_path / "released")
    weights = [0.7, 0.3]
    plain = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(fam.sources[k]), "parameters": {"weight": w}} for k, w in zip(kinds, weights)]}
    run_merge(MergeConfiguration.model_validate(plain), str(tmp_path / "mk"), MergeOptions(quiet=True))
    ours = composite_config(fam, "linear", kinds, dtype="float32")
    for entry, w in zip(ours["models"], weights):
        entry["parameters"] = {"weight": w}
    compose(ours, str(tmp_path / "ours"))
    want, got = llm_of(read_dir(tmp_path / "mk"), kinds[0]), read_dir(tmp_path / "ours")
    assert want and set(want) == set(got)
    for name, t in want.items():
        # the base vocabulary's rows: rows a source added (<start_of_image> ...) are carried from
        # their source into the composite (compose/vocab.py), where mergekit merges them too
        rows = fam.vocab_size if name in ("model.embed_tokens.weight", "lm_head.weight") else None
        torch.testing.assert_close(got[name][:rows], t[:rows], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(want[n], llm_of(read_dir(fam.sources[kinds[0]]), kinds[0])[n]) for n in want)  # merged
