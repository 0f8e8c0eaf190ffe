"""Running composites: routed LLM + stitched encoders (the companion loader)."""

from mergekit_multimodal.runtime.model import CompositeModel, auto_route, resolve_route
from mergekit_multimodal.runtime.processor import CompositeProcessor

__all__ = ["CompositeModel", "CompositeProcessor", "auto_route", "resolve_route"]
