"""Running composites: routed LLM + stitched encoders (the companion loader)."""

from mergekit_multimodal.runtime.model import CompositeModel

__all__ = ["CompositeModel"]
