"""Everything the package knows about one checkpoint family, declared in one `Family` value.

A family file (`families/<name>.py`) declares a module-level `FAMILY = Family(...)`:

- how its checkpoints split: where the LLM sits (`llm_prefixes`), which prefixes are the encoder
  and the connector, which config.json keys hold the placeholder id (composing);
- what its modality is (`kind`) and the card's `pipeline_tag`;
- how the loader runs its encoder + connector (`encoder`: features from the processor outputs
  it names, optionally its own loader and feature grid) and how its processor turns media files
  into those outputs (`preprocessor`) (running);
- optionally how a ModelCompose projector maps onto its connector (DAMC sources);
- the tiny stand-ins of its real classes that tests and the built-in example build (`tiny`).

`SplitLayout` turns a family (or a YAML override) into a function from a checkpoint tensor name
to (part, composite name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

#: Where the language model sits in multimodal checkpoints. transformers 5 still *writes* the
#: legacy layout; conversions since 4.52 may carry the new one. Both map onto plain causal-LM names.
MLLM_LLM_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
CAUSAL_LM_PREFIXES: Tuple[Tuple[str, str], ...] = (("model.", "model."), ("lm_head.", "lm_head."))

LLM = "llm"
ENCODER = "encoder"
CONNECTOR = "connector"
OTHER = "other"

#: model, its config, the processor outputs of a batch of items -> one [tokens, hidden] per item
FeatureFn = Callable[..., List["object"]]


@dataclass(frozen=True)
class Encoder:
    """How the loader runs a family's encoder + connector on processor outputs."""

    #: (model, config, media) -> one feature matrix [tokens, hidden] per item, exactly as the source
    #: model's forward computes them before scattering them into its embeddings
    features: FeatureFn
    #: the media keys `features` needs, in the names the family's processor gives them
    inputs: Tuple[str, ...]
    #: (directory, dtype) -> (model, config), for a family that is not a transformers class;
    #: transformers families are rebuilt with their own class from the stored config
    load: Optional[Callable] = None
    #: (config, media) -> each item's (rows, columns) of features, for families whose prompts break
    #: an image's rows apart with special tokens (Mistral3: `[IMG_BREAK]` ... `[IMG_END]`)
    grid: Optional[Callable] = None


@dataclass(frozen=True)
class TinySource:
    """A tiny, random stand-in of one real class of the family, for tests and the example
    (`mergekit_multimodal.testing.build_tiny_family` builds it; nothing is downloaded)."""

    model_class: str  # transformers class name
    config_class: str
    encoder_key: str  # the config field holding the encoder's config
    encoder_config: Callable[[int], dict]  # hidden size -> the encoder's config
    added_tokens: Tuple[str, ...]  # special tokens its tokenizer adds, in id order
    placeholder_fields: Mapping[str, str]  # config field -> placeholder token
    processor: Callable[[], object]  # -> a processor object saved with the checkpoint
    seed: int  # its seed stream: a source's tensors never depend on which others are built
    modality: str  # the modality name tests and the example give it
    pad_token: Optional[str] = None
    vocab_multiple: int = 1  # LLaVA-1.5 pads its vocabulary to a multiple of 8 (32002 -> 32064)
    extra_config: Mapping[str, object] = field(default_factory=dict)
    placeholder: Optional[str] = None  # a composite placeholder to use instead of its own
    in_example: bool = False  # part of the built-in example (`mergekit-mm-example`)
    #: (config class, causal-LM class, extra config fields) of the text model the class requires
    #: (Gemma 3's `Gemma3TextConfig`); None: any of testing.TEXT_FAMILIES (llama by default). The
    #: causal-LM class is a transformers class name, or a function giving the class where transformers
    #: has none (Qwen2-VL's text model: `families.qwen2_vl.causal_lm_class`)
    text_model: Optional[Tuple[str, str, Mapping[str, object]]] = None
    #: tokenizer attributes its processor reads (Gemma 3's `boi_token`), each one of `added_tokens`
    named_tokens: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One checkpoint family (one or more transformers classes with the same layout)."""

    name: str
    architectures: Tuple[str, ...]
    #: config.json keys that hold a placeholder token id, in order of preference
    placeholder_keys: Tuple[str, ...] = ()
    #: prefixes in the legacy layout; the transformers-5 layout (`model.` + prefix) is matched too
    encoder_prefixes: Tuple[str, ...] = ()
    connector_prefixes: Tuple[str, ...] = ()
    llm_prefixes: Tuple[Tuple[str, str], ...] = MLLM_LLM_PREFIXES
    #: True for a plain causal LM: there is no modality part, and a placeholder is never needed
    text_only: bool = False
    #: the kind of media its modality takes: image, video, audio, point_cloud
    kind: Optional[str] = None
    #: other names prompts and benchmarks use for its kind, as markers (`<point>` for point clouds)
    markers: Tuple[str, ...] = ()
    #: the Hub pipeline tag of a composite whose sources are all of this kind
    pipeline_tag: str = "any-to-any"
    encoder: Optional[Encoder] = None
    #: (directory of the stored processor files, num_frames=None) -> items -> processor outputs
    preprocessor: Optional[Callable] = None
    #: ModelCompose's mlp2x_gelu projector keys -> this family's connector tensor names (DAMC)
    modelcompose_projector: Optional[Mapping[str, str]] = None
    #: tiny stand-ins by name (e.g. "llava", "llava_next"), for tests and the example
    tiny: Mapping[str, TinySource] = field(default_factory=dict)
    #: what the family is when composed under a modality whose name starts with a key, for a source
    #: that brings two towers (Video-LLaVA composed as `image...` runs its image tower)
    variants: Mapping[str, "Family"] = field(default_factory=dict)
    #: the text one item stands for in the sequence, `{}` for the placeholder the composite expands
    #: into the item's features, when the source's processor wraps each item in special tokens
    #: (Gemma 3: "\n\n<start_of_image>{}<end_of_image>\n\n"); generic markers become it
    item_text: Optional[str] = None
    #: the token the family's own prompts and chat template put where an item goes, when it is not
    #: the placeholder (Gemma 3's `<start_of_image>`): a prompt carrying it becomes `item_text` too
    prompt_token: Optional[str] = None
    #: (llm, inputs_embeds, attention_mask, position_ids, cache, media_mask) -> the attention mask the
    #: merged LLM takes, for a family whose source does not attend causally among an item's features
    #: (Gemma 3: bidirectionally within each image); media_mask is 1 at those features' positions
    llm_mask: Optional[Callable] = None
    #: (composite directory, the stored source directories of its modalities of this family, dtype) ->
    #: (merged LLM, transformers' loading info), for a family whose language model transformers has no
    #: causal-LM class for (Qwen2-VL's text model runs 3-D rotary positions); None: AutoModelForCausalLM
    load_llm: Optional[Callable] = None
    #: text model_type -> () -> the causal-LM class the family builds for it where transformers has
    #: none (`qwen2_vl_text`): what builds a composite's merged LLM from its config.json alone (Hub
    #: validation, LoRA export); `families.causal_lm_class` asks these after AutoModelForCausalLM
    causal_lms: Mapping[str, Callable] = field(default_factory=dict)
    #: (encoders {modality: ModalityEncoder}, media {modality: processor outputs}, items, attention_mask)
    #: -> (position ids, per-row offsets kept for cached decoding), for a family whose source computes the
    #: LLM's positions from its items' layout (Qwen2-VL: get_rope_index); items are (row, start, end,
    #: modality, index) of the family's items in the expanded, left-padded sequence
    llm_positions: Optional[Callable] = None
    #: why checkpoints of these classes cannot be composed and what would be needed (Llama-3.2-Vision);
    #: reading one is an error saying so
    refused: Optional[str] = None
    #: (the item's text, its preprocessor's outputs) -> each item's text in prompt order, for a family
    #: whose processor lays one item out as several (Gemma 3's pan-and-scan: the image, then its crops,
    #: each its own `item_text`); the preprocessor's outputs hold one feature item per placeholder
    item_layout: Optional[Callable] = None
    #: the preprocessor output counting each prompt's items (prompts holding none left out), for a
    #: family whose source lays an item out by how many share its prompt (LLaVA-OneVision's
    #: `batch_num_images`: several images of one prompt are not tiled); the composite's processor
    #: passes its preprocessor `per_prompt=`, and the loader checks the count against the prompts
    items_by_prompt: Optional[str] = None

    def for_modality(self, modality: Optional[str]) -> "Family":
        """The family as it runs under this modality name (itself, or a declared variant)."""
        for prefix, variant in self.variants.items():
            if modality and modality.startswith(prefix):
                return variant
        return self


@dataclass(frozen=True)
class SplitLayout:
    """Classifies checkpoint tensor names into LLM / encoder / connector / other parts."""

    family: Family
    exact_llm: Dict[str, str] = field(default_factory=dict)

    def classify(self, name: str) -> Tuple[str, str]:
        """Return (part, name): for the LLM part the causal-LM name, else the name unchanged."""
        if name in self.exact_llm:
            return LLM, self.exact_llm[name]
        for src, dst in self.family.llm_prefixes:
            if name.startswith(src):
                return LLM, dst + name[len(src):]
        stripped = name[len("model."):] if name.startswith("model.") else name
        if any(stripped.startswith(p) for p in self.family.encoder_prefixes):
            return ENCODER, name
        if any(stripped.startswith(p) for p in self.family.connector_prefixes):
            return CONNECTOR, name
        return OTHER, name

    def placeholder_key(self, config: dict, modality: str) -> Optional[str]:
        """The config key of this source's placeholder id, preferring one whose kind word starts the
        modality's name (`image_token_index` for a modality `image` or `image_med`)."""
        present = [k for k in self.family.placeholder_keys if config.get(k) is not None]
        for key in present:
            if modality.startswith(key.split("_")[0]):
                return key
        return present[0] if present else None


#: the family name a composite records for a source read through a YAML `layout:` block
OVERRIDE = "override"


def override_layout(llm_prefix: str, lm_head: Optional[str], modality_prefixes: Sequence[str],
                    placeholder_key: Optional[str]) -> SplitLayout:
    """A layout from the YAML's `layout:` block, for architectures without a family file."""
    family = Family(
        name=OVERRIDE,
        architectures=(),
        placeholder_keys=(placeholder_key,) if placeholder_key else (),
        encoder_prefixes=tuple(modality_prefixes),
        llm_prefixes=((llm_prefix, "model."),),
    )
    return SplitLayout(family, exact_llm={lm_head: "lm_head.weight"} if lm_head else {})
