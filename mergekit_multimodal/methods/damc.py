"""DAMC (Chen et al., 2024): needs sources trained with decoupled text/modality parameters.

Not yet implemented (issue #4: decoupled-source readers, the damc formula, lambda search).
Selecting it fails before anything is read or written.
"""

from __future__ import annotations

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.methods.base import CompositeMethod


class DAMC(CompositeMethod):
    name = "damc"

    def check_parameters(self, global_params, source_params, where):
        raise CompositionError(
            f"{where}: merge_method damc is not yet available: it needs sources trained with decoupled "
            "parameters and their readers (tracked as issue #4). Use mmer or naive_mc meanwhile."
        )

    def merge(self, base, sources, params):  # pragma: no cover - check_parameters refuses first
        raise CompositionError("damc is not yet available (issue #4)")
