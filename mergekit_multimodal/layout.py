"""Where each part of a composite lives on disk (documented in docs/format.md).

OUT/
  config.json, model*.safetensors[.index.json]   merged LLM (text route), a plain causal LM
  tokenizer files, generation_config.json         base tokenizer + every modality's placeholder
  composite_config.json                           modalities, placeholders, method, parameters
  modalities/<name>/config.json                   the source MLLM's config (rebuilds encoder+connector)
  modalities/<name>/model*.safetensors            its encoder/connector tensors, names as in the source
  modalities/<name>/<processor files>             its processor / feature-extractor configs
  routes/task_vector*.safetensors                 MMER: tau_* per LLM tensor (composite names)
                                                  and "<tensor>:alpha" -> float32 scalar
  routes/masks*.safetensors                       MMER: "<modality>/<tensor>" -> uint8, 1 bit per parameter
                                                  and "<modality>/<tensor>:scale" -> float32 scalar
  routes/damc*.safetensors                        DAMC: "text/<tensor>:A|B" (lambda-scaled text factors),
                                                  "<modality>/<tensor>:A|B" (modality factors), or with
                                                  densify "<modality>/<tensor>" (dense route delta)
  modalities/<name>/prefix_suffix.safetensors     DAMC: "prefix", "suffix" [n, hidden] embeddings
  mergekit_config.yml, README.md                  the YAML used, the model card
"""

FORMAT_VERSION = 1
COMPOSITE_CONFIG = "composite_config.json"
MODALITIES_DIR = "modalities"
ROUTES_DIR = "routes"
TASK_VECTOR_BASENAME = "task_vector"
MASKS_BASENAME = "masks"
DAMC_BASENAME = "damc"
PREFIX_SUFFIX_FILE = "prefix_suffix.safetensors"
TEXT_ROUTE = "text"

#: processor/feature-extractor files carried with each modality (tokenizers are not: the
#: composite tokenizer replaces them)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
#: files carried from the base next to the merged LLM
BASE_FILES = ("generation_config.json",)


def mask_key(modality: str, tensor: str) -> str:
    return f"{modality}/{tensor}"


def scale_key(modality: str, tensor: str) -> str:
    return f"{modality}/{tensor}:scale"


def alpha_key(tensor: str) -> str:
    return f"{tensor}:alpha"


def damc_key(route: str, tensor: str, factor: str = "") -> str:
    """DAMC route tensors: `<route>/<tensor>:A`, `:B` (low-rank) or `<route>/<tensor>` (dense)."""
    return f"{route}/{tensor}:{factor}" if factor else f"{route}/{tensor}"
