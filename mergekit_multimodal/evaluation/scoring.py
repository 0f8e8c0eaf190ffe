"""Results: per-subset and overall scores of an evaluation, and the scoring of its predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mergekit_multimodal.evaluation.benchmark import Question


@dataclass
class SubsetScore:
    correct: int
    total: int
    accuracy: float
    chance: float  # mean of 1 / number of choices


@dataclass
class EvalResult:
    model: str  # the directory evaluated (a source's path when a single source was given)
    benchmark: str
    name: str  # short label for tables and plots
    subsets: Dict[str, SubsetScore]
    overall: float  # correct / total over every scored question
    correct: int
    total: int
    macro: float  # mean of the subsets' accuracies
    predictions: List[Dict[str, Any]]
    seconds: float
    route: Optional[str] = None
    mode: str = "logits"  # or "generate" (first label of the output), "first-char" (ModelCompose's reading)
    skipped: Dict[str, int] = field(default_factory=dict)  # subset -> questions the model has no modality for
    composite: Optional[str] = None  # the composite actually run (a cache dir for a single source)

    def to_dict(self, predictions: bool = False) -> Dict[str, Any]:
        d = asdict(self)
        if not predictions:
            d.pop("predictions")
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EvalResult":
        d = dict(d)
        d["subsets"] = {s: SubsetScore(**v) for s, v in d["subsets"].items()}
        d.setdefault("predictions", [])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _score(questions: List[Question], preds: List[Dict[str, Any]]) -> Tuple[Dict[str, SubsetScore], int, int]:
    per: Dict[str, List[int]] = {}
    chance: Dict[str, List[float]] = {}
    by_id = {q.id: q for q in questions}
    for p in preds:
        q = by_id[p["id"]]
        c = per.setdefault(q.subset, [0, 0])
        c[0] += int(p["correct"])
        c[1] += 1
        chance.setdefault(q.subset, []).append(1.0 / len(q.choices))
    subsets = {s: SubsetScore(c, t, c / t, sum(chance[s]) / len(chance[s])) for s, (c, t) in per.items()}
    return subsets, sum(c for c, _ in per.values()), sum(t for _, t in per.values())
