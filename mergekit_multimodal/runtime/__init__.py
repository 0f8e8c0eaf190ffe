"""Running composites: routed LLM + stitched encoders (the companion loader)."""

from mergekit_multimodal.runtime.model import CompositeModel
from mergekit_multimodal.runtime.processor import CompositeProcessor

__all__ = ["CompositeModel", "CompositeProcessor"]
