"""The composite's model card, in mergekit's convention plus a table of modalities and how to run it.

`build_card` is a pure function of what the card shows (so it is testable without composing);
`write_card` feeds it from a plan. Front matter is built with huggingface_hub's ModelCardData so
it validates as a Hub card: `base_model` lists the base and every source that is a Hub id
(local paths can't be listed), as mergekit's own card does, decided by the string's shape only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

from huggingface_hub import ModelCardData

if TYPE_CHECKING:
    from mergekit_multimodal.compose.plan import CompositePlan

#: modality-name prefixes that say the kind of a source's input (Video-LLaVA also reads images)
KIND_PREFIXES = ("image", "video", "audio")
#: the pipeline tag of a composite whose sources all take one kind
TAG_OF_KIND = {"image": "image-text-to-text", "video": "video-text-to-text", "audio": "audio-text-to-text"}
#: vision LLMs that read images and video are tagged as image models on the Hub
VISION_TAGS = {"image-text-to-text", "video-text-to-text"}


@dataclass(frozen=True)
class CardSource:
    """One row of the modalities table."""

    modality: str
    model: str  # the reference as written: path, Hub id, id@rev, model+lora
    architecture: str = "?"
    placeholder: Optional[str] = None
    family: Optional[str] = None


def is_hub_id(path: str) -> bool:
    """mergekit's `is_hf` without the network: not a local path, and shaped like `org/name` (or `name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not path or path[0] in "/~." or path.count("/") > 1 or os.path.exists(path):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def hub_ids(refs: Sequence[str]) -> List[str]:
    """The Hub ids among model references (model and LoRA of `model+lora`; `@revision` dropped), in order."""
    from mergekit.common import ModelReference

    out: List[str] = []
    for ref in refs:
        if os.path.exists(ref):  # a local path as written (it may hold `+` or `@`)
            continue
        parsed = ModelReference.model_validate(ref)
        for part in (parsed.model, parsed.lora):
            if part is not None and is_hub_id(part.path) and part.path not in out:
                out.append(part.path)
    return out


def _family(src: CardSource):
    from mergekit_multimodal.families import FAMILIES

    fam = next((f for f in FAMILIES if f.name == src.family), None)
    return fam.for_modality(src.modality) if fam else None


def _kind(src: CardSource) -> Optional[str]:
    prefix = next((k for k in KIND_PREFIXES if src.modality.startswith(k)), None)
    fam = _family(src)
    return prefix or (fam.kind if fam else None)


def _tag(src: CardSource) -> str:
    """The source's own pipeline tag: the kind its modality name says, else its family's tag."""
    prefix = next((k for k in KIND_PREFIXES if src.modality.startswith(k)), None)
    fam = _family(src)
    return TAG_OF_KIND[prefix] if prefix else (fam.pipeline_tag if fam else "any-to-any")


def pipeline_tag(sources: Sequence[CardSource]) -> str:
    """One kind -> its tag (audio-text-to-text, video-text-to-text, image-text-to-text); images and
    video -> image-text-to-text, as vision LLMs that read both are tagged on the Hub; anything else
    (vision + audio, point clouds, unknown families) -> any-to-any."""
    tags = {_tag(s) for s in sources}
    if len(tags) == 1:
        return tags.pop()
    return "image-text-to-text" if tags <= VISION_TAGS else "any-to-any"


def _inputs(src: CardSource) -> str:
    """The media keys the loader's encoder for this family reads (its processor's output names)."""
    fam = _family(src)
    if fam is None or fam.encoder is None:  # an unknown family: say nothing
        return "-"
    return ", ".join(f"`{k}`" for k in fam.encoder.inputs)


#: kind -> (processor class, how the first item is passed to it, media built from its outputs `x`)
_PROCESSORS = {
    "image": ("AutoImageProcessor", "images=[image], return_tensors=\"pt\"", "x"),
    "video": ("AutoVideoProcessor", "videos=[frames], return_tensors=\"pt\"", "x"),
    "audio": ("AutoFeatureExtractor",
              "[waveform], sampling_rate=16000, return_attention_mask=True, return_tensors=\"pt\"",
              "{\"input_features\": x[\"input_features\"], \"feature_attention_mask\": x[\"attention_mask\"]}"),
}


def _snippet(sources: Sequence[CardSource]) -> str:
    first = sources[0]
    ph = first.placeholder or f"<{first.modality}>"
    proc = _PROCESSORS.get(_kind(first))
    if proc:
        media = (f"from transformers import {proc[0]}\n"
                 f"x = {proc[0]}.from_pretrained(f\"{{path}}/modalities/{first.modality}\")({proc[1]})\n"
                 f"media = {{\"{first.modality}\": {proc[2]}}}")
    else:
        media = f"media = {{\"{first.modality}\": x}}  # x: the outputs of modalities/{first.modality}/'s processor"
    return f"""```python
from transformers import AutoTokenizer
from mergekit_multimodal.runtime import CompositeModel

path = "path/to/this/model"  # a local copy, e.g. huggingface_hub.snapshot_download("<this repo id>")
model = CompositeModel.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
{media}
ids = tokenizer("USER: {ph}\\nDescribe it. ASSISTANT:", return_tensors="pt").input_ids
new_tokens = model.generate(ids, media=media, max_new_tokens=64)
print(tokenizer.decode(new_tokens[0], skip_special_tokens=True))
```"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # e.g. <|AUDIO|>: a bare | would split the table cell


def build_card(*, name: str, method: str, base_model: str, sources: Sequence[CardSource], yaml_text: str) -> str:
    """The README.md text: front matter, modalities table, the YAML, and how to run it."""
    ids = hub_ids([base_model] + [s.model for s in sources])
    data = ModelCardData(
        base_model=ids or None,
        base_model_relation="merge" if ids else None,
        library_name="transformers",
        tags=["merge", "mergekit", "mergekit-multimodal", method],
        pipeline_tag=pipeline_tag(sources),
    )
    rows = "\n".join(f"| {s.modality} | `{s.model}` | `{s.architecture}` | `{_cell(s.placeholder or '-')}` | {_inputs(s)} |"
                     for s in sources)
    return f"""---
{data.to_yaml()}
---
# {name}

A multimodal composite built with [mergekit-multimodal](https://github.com/arcee-ai/mergekit) from MLLMs
that share the base LLM `{base_model}`, with no training. The merged LLM was produced
with the **{method}** method; every source's encoder and connector are kept unchanged.

## Modalities

| modality | source | architecture | placeholder | media inputs |
|---|---|---|---|---|
{rows}

## Configuration

```yaml
{yaml_text.rstrip()}
```

## How to run it

The directory holds the merged LLM (loadable alone with `AutoModelForCausalLM`) and, under
`modalities/`, each source's encoder, connector and processor files; `composite_config.json`
describes them. The companion loader runs it as one model, each placeholder replaced by its
item's features (pass each modality's processor outputs under its name in `media`):

{_snippet(sources)}
"""


def write_card(plan: "CompositePlan", out: str, yaml_text: str) -> None:
    sources = [
        CardSource(
            modality=m,
            model=str(plan.config.models[i].model),
            architecture=(s.config.get("architectures") or ["?"])[0],
            placeholder=plan.vocab.placeholders[m].token if m in plan.vocab.placeholders else None,
            family=s.layout.family.name,
        )
        for i, (m, s) in enumerate(zip(plan.modalities, plan.sources))
    ]
    # the engine writes into a hidden ".<name>.partial-<id>" directory renamed at the end
    name = os.path.basename(os.path.normpath(out)).split(".partial-")[0].lstrip(".")
    text = build_card(name=name, method=plan.method.name, base_model=str(plan.config.base_model),
                      sources=sources, yaml_text=yaml_text)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
