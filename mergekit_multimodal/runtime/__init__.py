"""Running composites: routed LLM + stitched encoders (the companion loader).

Names are imported on first use, so family files can import `runtime.preprocess` without
loading the model code.
"""

from typing import TYPE_CHECKING

__all__ = ["CompositeModel", "CompositeProcessor", "auto_route", "resolve_route"]

if TYPE_CHECKING:
    from mergekit_multimodal.runtime.model import CompositeModel, auto_route, resolve_route
    from mergekit_multimodal.runtime.processor import CompositeProcessor


def __getattr__(name: str):
    if name in ("CompositeModel", "auto_route", "resolve_route"):
        from mergekit_multimodal.runtime import model

        return getattr(model, name)
    if name == "CompositeProcessor":
        from mergekit_multimodal.runtime.processor import CompositeProcessor

        return CompositeProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
