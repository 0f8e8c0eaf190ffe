"""`mergekit-mm-eval`: multiple-choice accuracy of a composite (or of one source MLLM) on a benchmark.

Scoring is MCUB's first-letter rule for greedy decoding restricted to the choice labels: the
prompt is `template` filled with the question and the labelled choices; the prediction is the
label whose token (with or without a leading space, whichever the tokenizer makes after the
prompt) has the highest next-token logit. `scoring="first-label"` (`generate=True`) decodes
greedily instead and reads the first label of the answer (no label: wrong); `scoring="first-char"`
decodes and compares the output's first character with the answer's letter, as ModelCompose scores
MCUB and AVQA. ModelCompose's own files (MCUB-4.json, ...) load as they are (`modelcompose`).

Modules: `benchmark` (the question format of docs/evaluate.md, and its loading), `modelcompose`
(ModelCompose's MCUB / AVQA files), `prompts` (the
template, label tokens, reading a generated answer), `scoring` (`EvalResult`), `models` (which
composite runs), `running` (`evaluate`), `report` (table, plot, results files), `cli`
(`mergekit-mm-eval`).
"""

from mergekit_multimodal.evaluation.benchmark import LETTERS, Question, load_benchmark
from mergekit_multimodal.evaluation.models import composite_for, is_composite, source_modality
from mergekit_multimodal.evaluation.prompts import (
    ANSWER_WITH,
    DEFAULT_TEMPLATE,
    SCORINGS,
    build_prompt,
    first_char_label,
    label_token_ids,
    parse_label,
)
from mergekit_multimodal.evaluation.report import format_table, load_results, plot_results, write_results
from mergekit_multimodal.evaluation.running import (
    DTYPE_NAMES,
    evaluate,
    evaluate_accuracy,
    next_token_logits,
    transformers_output,
)
from mergekit_multimodal.evaluation.scoring import EvalResult, SubsetScore

__all__ = [
    "ANSWER_WITH", "DEFAULT_TEMPLATE", "DTYPE_NAMES", "LETTERS", "SCORINGS", "EvalResult",
    "Question", "SubsetScore", "build_prompt", "composite_for", "evaluate", "evaluate_accuracy", "first_char_label",
    "format_table", "is_composite",
    "label_token_ids", "load_benchmark", "load_results", "next_token_logits", "parse_label", "plot_results",
    "source_modality", "transformers_output", "write_results",
]
