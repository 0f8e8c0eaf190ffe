"""The composite's model card, in mergekit's convention plus a table of modalities.

Front matter is built with huggingface_hub's ModelCardData so it validates as a Hub card.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from huggingface_hub import ModelCardData

if TYPE_CHECKING:
    from mergekit_multimodal.plan import CompositePlan

_PIPELINE = {"image": "image-text-to-text", "video": "video-text-to-text", "audio": "audio-text-to-text"}


def _is_hub_id(ref: str) -> bool:
    path = ref.split("@")[0]
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _models(plan: "CompositePlan"):
    return [str(plan.config.base_model)] + [str(m.model) for m in plan.config.models]


def pipeline_tag(modalities) -> str:
    tags = {_PIPELINE.get(m, "any-to-any") for m in modalities}
    return tags.pop() if len(tags) == 1 else "any-to-any"


def write_card(plan: "CompositePlan", out: str, yaml_text: str) -> None:
    hub_ids = [m for m in _models(plan) if _is_hub_id(m)]
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        library_name="transformers",
        tags=["merge", "mergekit", "mergekit-multimodal", plan.method.name],
        pipeline_tag=pipeline_tag(plan.modalities),
    )
    rows = "\n".join(
        f"| {m} | `{plan.config.models[i].model}` | `{(s.config.get('architectures') or ['?'])[0]}` | "
        f"`{plan.vocab.placeholders[m].token if m in plan.vocab.placeholders else '-'}` |"
        for i, (m, s) in enumerate(zip(plan.modalities, plan.sources))
    )
    name = os.path.basename(os.path.normpath(out)).split(".partial-")[0].lstrip(".")
    body = f"""---
{data.to_yaml()}
---
# {name}

A multimodal composite built with [mergekit-multimodal](https://github.com/arcee-ai/mergekit) from MLLMs
that share the base LLM `{plan.config.base_model}`, with no training. The merged LLM was produced
with the **{plan.method.name}** method; every source's encoder and connector are kept unchanged.

## Modalities

| modality | source | architecture | placeholder |
|---|---|---|---|
{rows}

## Configuration

```yaml
{yaml_text.rstrip()}
```

## How to run it

The directory holds the merged LLM (loadable alone with `AutoModelForCausalLM`) and, under
`modalities/`, each source's encoder and connector; `composite_config.json` describes them.
See the mergekit-multimodal documentation (`docs/format.md`) for the layout.
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(body)
