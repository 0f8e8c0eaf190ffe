"""mergekit-multimodal: compose multimodal LLMs that share a base LLM, without training.

Importing the package registers `naive_mc`, `mmer` and `damc` in mergekit's method registry.
"""

from mergekit_multimodal.methods import register_with_mergekit

register_with_mergekit()

from mergekit_multimodal.api import compose, run_yaml  # noqa: E402
from mergekit_multimodal.compose.config import CompositeMergeConfig, load_config  # noqa: E402
from mergekit_multimodal.errors import CompositionError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["compose", "run_yaml", "CompositeMergeConfig", "load_config", "CompositionError", "__version__"]
