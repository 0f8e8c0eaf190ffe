"""The zoo's word-level tokenizer, built with the `tokenizers` library (no download)."""

from __future__ import annotations

from typing import Sequence

import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from mergekit_multimodal.zoo.data import WORDS

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(added: Sequence[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """Base vocabulary = specials + the zoo's words; a source appends its placeholder as real MLLMs do."""
    vocab = {w: i for i, w in enumerate(SPECIAL + list(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # also splits punctuation: the evaluator's "A. red" -> A . red
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>")
    if added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    return tok
