"""Where each part of a composite lives on disk (documented in docs/format.md).

OUT/
  config.json, model*.safetensors[.index.json]   merged LLM (text route), a plain causal LM
  tokenizer files, generation_config.json         base tokenizer + every modality's placeholder
  composite_config.json                           the manifest (format/manifest.py)
  modalities/<name>/config.json                   the source MLLM's config (rebuilds encoder+connector)
  modalities/<name>/model*.safetensors            its encoder/connector tensors, names as in the source
  modalities/<name>/<processor files>             its processor / feature-extractor configs
  modalities/<name>/<tokenizer files>             the source's own tokenizer (what an export of its route writes)
  modalities/<name>/prefix_suffix.safetensors     DAMC: "prefix", "suffix" [n, hidden] embeddings
  routes/<stream>*.safetensors                    the method's routes (methods/<method>/outputs.py):
                                                  MMER task_vector + masks, DAMC damc
  mergekit_config.yml, README.md                  the YAML used, the model card
"""

import json

from mergekit_multimodal.errors import CompositionError

FORMAT_VERSION = 1
COMPOSITE_CONFIG = "composite_config.json"
MODALITIES_DIR = "modalities"
ROUTES_DIR = "routes"
PREFIX_SUFFIX_FILE = "prefix_suffix.safetensors"

#: processor/feature-extractor files carried with each modality (its tokenizer files are carried
#: too, compose/vocab.py's TOKENIZER_FILES; the runtime reads the composite's tokenizer)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
#: files carried from the base next to the merged LLM
BASE_FILES = ("generation_config.json",)


def read_json(path) -> dict:
    """A JSON file, or an error naming it (missing, unreadable or not valid JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CompositionError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise CompositionError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
