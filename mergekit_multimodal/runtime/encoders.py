"""Each modality's encoder + connector, rebuilt with the source's own transformers class.

The stored `modalities/<m>/config.json` is the source MLLM's config; its language model is
shrunk to zero layers and a one-row vocabulary (we never run it: the composite's merged LLM
replaces it), and `from_pretrained` loads the stored encoder/connector weights through
transformers' own loading code, legacy or transformers-5 layout. The family's `Encoder`
(families/<name>.py) turns processor outputs into one feature matrix [tokens, hidden] per media
item, exactly as the source model's forward would before scattering them into its embeddings.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import transformers

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import get_family
from mergekit_multimodal.format.tensors import refuse_incomplete, weights_file

LOG = logging.getLogger(__name__)


def llm_parameter_names(model: torch.nn.Module) -> set:
    """Names of a multimodal model's language-model parameters (its decoder and output head)."""
    owned = {id(p) for mod in (model.get_decoder(), model.get_output_embeddings()) if mod is not None
             for p in mod.parameters()}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in owned}


class ModalityEncoder:
    """A source's encoder + connector, loaded from `modalities/<m>/`, giving per-item features."""

    def __init__(self, name: str, family: str, directory: str, dtype: Optional[torch.dtype], device):
        spec = get_family(family, directory, modality=name).encoder
        if spec is None:
            raise CompositionError(f"{directory}: the loader cannot run family {family!r}: it has no encoder")
        self.name, self.family, self.spec = name, family, spec
        self.required = spec.inputs
        if spec.load is not None:  # a family of ours, not a transformers class: its own loader
            self.model, self.config = spec.load(directory, dtype)
            self.model.to(device)
            return
        cfg = transformers.AutoConfig.from_pretrained(directory)
        text = cfg.get_text_config()
        text.num_hidden_layers, text.vocab_size, text.pad_token_id = 0, 1, None
        cls = getattr(transformers, cfg.architectures[0])
        prev = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # the absent LLM weights are expected
        try:
            self.model, info = cls.from_pretrained(directory, config=cfg, dtype=dtype, output_loading_info=True,
                                                   ignore_mismatched_sizes=True)
        except Exception as exc:
            raise CompositionError(f"{directory}: cannot load the {name} encoder ({type(exc).__name__}: {exc})") from None
        finally:
            transformers.utils.logging.set_verbosity(prev)
        # only the LLM's tensors may be absent (shrunk to zero layers: the merged LLM replaces it)
        refuse_incomplete(info, weights_file(directory), f"the {name} encoder/connector",
                          ignore_missing=llm_parameter_names(self.model))
        self.model.to(device).eval()
        self.config = cfg

    @property
    def breaks_rows(self) -> bool:
        """The family's prompts break an item's feature rows apart (Mistral3's `[IMG_BREAK]`)."""
        return self.spec.grid is not None

    def features(self, media: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        missing = [k for k in self.required if k not in media]
        if missing:
            raise CompositionError(f"modality {self.name!r} needs inputs {missing} (from its processor)")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        media = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in media.items()}
        with torch.no_grad():
            return self.spec.features(self.model, self.config, media)

    def grids(self, media: Dict[str, torch.Tensor]) -> Optional[List[Tuple[int, int]]]:
        """Each item's (rows, columns) of features where the family's prompt layout breaks rows; else None."""
        return self.spec.grid(self.config, media) if self.spec.grid is not None else None
