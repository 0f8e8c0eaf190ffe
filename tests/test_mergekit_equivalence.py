"""For classes mergekit itself reads (its architecture files: `gemma3vl` for Gemma3ForConditionalGeneration,
`mistral3` for Mistral3ForConditionalGeneration, ...), a composite's merged LLM equals what
`mergekit-yaml` writes for the same plain `linear` config over the same checkpoints, tensor for
tensor (mergekit's output keeps the LLM tensors under the source's own names:
`language_model.model.*`, `language_model.lm_head.weight`)."""

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

from mergekit_multimodal import compose
from mergekit_multimodal.testing import perturb_like
from tests.helpers import MODALITY, PLACEHOLDER_OVERRIDE, llm_of, read_dir, released

#: (fixture, stand-ins of one class that mergekit has an architecture file for, the key rename from
#: what transformers writes to the released checkpoints' layout, which mergekit's file lists; None:
#: transformers writes that layout). One stand-in: the second source is a fine-tune of it (every
#: tensor perturbed, seeded), as a task fine-tune of Mistral-Small-3.1 would be.
GROUPS = {"gemma3vl": ("gemma_family", ["gemma3", "medgemma"], ("vision_tower.", "vision_tower.vision_model.")),
          "mistral3": ("mistral_family", ["mistral3"], None),
          # transformers 5.24 writes the layout mergekit's qwen2_5_vl file lists (model.layers, visual.). Not
          # qwen2_vl: mergekit 0.1.5's qwen2_vl file reads the layer count from a top-level num_hidden_layers,
          # which transformers 5's Qwen2VLConfig does not have (it keeps it in text_config, also for a legacy
          # flat config.json), so mergekit-yaml cannot merge Qwen2-VL checkpoints under transformers 5
          "qwen2_5_vl": ("qwen25_vl_family", ["qwen2_5_vl", "qwen2_5_vl_ocr"], None)}

#: groups whose checkpoints keep the LLM at the top level (Qwen2.5-VL's released layout: `model.layers.*`,
#: `lm_head.weight`, beside `visual.*`): their LLM tensors are exactly those names
BARE_LLM = {"qwen2_5_vl"}


def llm_tensors(tensors: dict, arch: str) -> dict:
    if arch in BARE_LLM:
        return {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))}
    return llm_of(tensors)


def sources(arch, request, root):
    """The group's two checkpoints in the layout mergekit reads, and each one's (modality, placeholder)."""
    fixture, kinds, rename = GROUPS[arch]
    fam = request.getfixturevalue(fixture)
    if rename:
        fam = released(fam, kinds, rename, root / "released")
    paths = [fam.sources[k] for k in kinds]
    names = [(MODALITY[k], PLACEHOLDER_OVERRIDE.get(k)) for k in kinds]
    if len(kinds) == 1:
        paths.append(perturb_like(paths[0], root / "fine_tune", seed=1))
        names.append((f"{MODALITY[kinds[0]]}_ft", "[IMG_FT]"))  # the copy's [IMG] needs a name of its own
    return fam, paths, names


@pytest.mark.parametrize("arch", sorted(GROUPS))
def test_merged_llm_equals_mergekit_yaml_linear(arch, request, tmp_path):
    fam, paths, names = sources(arch, request, tmp_path)
    weights = [0.7, 0.3]
    plain = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]}
    run_merge(MergeConfiguration.model_validate(plain), str(tmp_path / "mk"), MergeOptions(quiet=True))
    models = [{"model": str(p), "modality": m, "parameters": {"weight": w}, **({"placeholder": ph} if ph else {})}
              for p, (m, ph), w in zip(paths, names, weights)]
    compose({"merge_method": "linear", "base_model": str(fam.base), "dtype": "float32", "models": models},
            str(tmp_path / "ours"))
    want, got = llm_tensors(read_dir(tmp_path / "mk"), arch), read_dir(tmp_path / "ours")
    assert want and set(want) == set(got)
    for name, t in want.items():
        # the base vocabulary's rows: rows a source added (<start_of_image>, [IMG] ...) are carried from
        # their source into the composite (compose/vocab.py), where mergekit merges them too
        rows = fam.vocab_size if name in ("model.embed_tokens.weight", "lm_head.weight") else None
        torch.testing.assert_close(got[name][:rows], t[:rows], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(want[n], llm_tensors(read_dir(paths[0]), arch)[n]) for n in want)  # really merged
