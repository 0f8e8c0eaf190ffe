"""`CompositeProcessor`: text with placeholders + media files -> inputs of `CompositeModel`.

The composite's tokenizer knows every modality's placeholder; each modality's media go through
its family's preprocessor (families/<name>.py; the generic ones are in runtime/preprocess.py),
built from the processor files carried from its source into `modalities/<m>/`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import transformers

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import get_family, kind_of, marker_kinds
from mergekit_multimodal.format.manifest import Manifest


_MARKER = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")


class CompositeProcessor:
    """Builds `CompositeModel` inputs: `{"input_ids", "attention_mask", "media"}`.

    >>> proc = CompositeProcessor.from_pretrained("my-composite")
    >>> inputs = proc("USER: <image> <audio> What do they have in common?",
    ...               media={"image": ["cat.png"], "audio": ["meow.wav"]})
    >>> model.generate(**inputs, max_new_tokens=20)

    Each placeholder stands for one item of its modality, items taken in prompt order (across the
    batch, row by row). `images=`, `videos=`, `audios=` are shortcuts when exactly one modality of
    the composite takes that kind of media.
    """

    def __init__(self, path: str, tokenizer, manifest: Manifest, preprocessors: Dict[str, Callable]):
        self.path, self.tokenizer, self.manifest = path, tokenizer, manifest
        self.preprocessors = preprocessors
        self.modalities: List[str] = list(manifest.modalities)
        self.placeholders = {m: manifest.modalities[m].placeholder for m in self.modalities}
        self.placeholder_ids = {m: manifest.modalities[m].placeholder_id for m in self.modalities}
        families = {m: get_family(manifest.modalities[m].family, path, modality=m) for m in self.modalities}
        #: modality -> the text one item stands for, when its family wraps items in special tokens
        self.item_text = {m: f.item_text.format(self.placeholders[m]) for m, f in families.items()
                          if f.item_text and self.placeholders[m]}
        #: a family's own prompt token (Gemma 3's `<start_of_image>`) -> its modality
        self.prompt_tokens = {f.prompt_token: m for m, f in families.items() if f.prompt_token and m in self.item_text}
        #: modality -> its family's per-item layout (Gemma 3's pan-and-scan crops: `Family.item_layout`)
        self.layouts = {m: f.item_layout for m, f in families.items() if f.item_layout and m in self.item_text}
        #: the modalities whose preprocessor takes the items grouped by prompt (`Family.items_by_prompt`)
        self.by_prompt = frozenset(m for m, f in families.items() if f.items_by_prompt)
        #: each modality's own placeholder (the composite's placeholders are distinct tokens)
        self.owner = {ph: m for m, ph in self.placeholders.items() if ph}
        own = "|".join(re.escape(ph) for ph in sorted(self.owner, key=len, reverse=True))
        self.marker = re.compile(f"{own}|{_MARKER.pattern}" if own else _MARKER.pattern)

    @classmethod
    def from_pretrained(cls, path: str, num_frames: Optional[int] = None) -> "CompositeProcessor":
        cfg = Manifest.read(path)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise CompositionError(f"{path}: the composite's tokenizer does not load ({type(exc).__name__}: {exc})") from None
        preps = {}
        for m, info in cfg.modalities.items():
            factory = get_family(info.family, path, modality=m).preprocessor
            if factory is None:
                raise CompositionError(f"{path}: no processor for modality {m!r} of family {info.family!r}")
            preps[m] = factory(os.path.join(path, info.path), num_frames)
        return cls(path, tok, cfg, preps)

    def kind(self, modality: str) -> Optional[str]:
        return kind_of(self.manifest.modalities[modality].family, modality)

    def __call__(self, text: Union[str, Sequence[str]], media: Optional[Mapping[str, Sequence[Any]]] = None, *,
                 images=None, videos=None, audios=None, return_tensors: str = "pt", **options) -> Dict[str, Any]:
        """`options` go to the preprocessors that take them, as the sources' processors take them at
        call time (Gemma 3: `do_pan_and_scan=True` and the `pan_and_scan_*` settings); an option no
        modality of the composite takes is an error."""
        if return_tensors != "pt":
            raise ValueError("CompositeProcessor returns PyTorch tensors only (return_tensors='pt')")
        media = {m: list(items) for m, items in (media or {}).items()}
        for kind, items in (("image", images), ("video", videos), ("audio", audios)):
            if items is not None:
                media.setdefault(self.modality_of_kind(kind), []).extend(_as_list(items))
        for m in media:
            if m not in self.modalities:
                raise CompositionError(f"the composite has no modality {m!r}; it has {', '.join(self.modalities)}")
        taken = {m: frozenset(getattr(p, "options", ())) for m, p in self.preprocessors.items()}
        unknown = sorted(set(options) - set().union(*taken.values()))
        if unknown:
            offered = "; ".join(f"{m}: {', '.join(sorted(o))}" for m, o in taken.items() if o) or "none"
            raise CompositionError(f"no modality of this composite takes the processor option(s) {', '.join(unknown)} "
                                   f"(options taken: {offered})")
        texts = [text] if isinstance(text, str) else list(text)
        rows = self._tokenize([self.expand_markers(t) for t in texts])
        per_prompt = {m: [int((r == self.placeholder_ids[m]).sum()) for r in rows] for m in self.modalities}
        for m in self.modalities:
            found, given = sum(per_prompt[m]), len(media.get(m, []))
            if found != given:
                raise CompositionError(f"the prompt has {found} {self.placeholders[m]!r} placeholder(s) but "
                                       f"{given} {m} item(s) were given; put one placeholder per item")
        features = {}
        for m, items in media.items():
            if not items:
                continue
            kwargs = {k: v for k, v in options.items() if k in taken[m]}
            if m in self.by_prompt:  # its source lays an item out by how many share its prompt
                kwargs["per_prompt"] = per_prompt[m]
            features[m] = self.preprocessors[m](items, **kwargs)
        # an item its family lays out as several (Gemma 3's crops): the prompt again, item by item
        layouts = {m: self.layouts[m](self.item_text[m], features[m]) for m in features if m in self.layouts}
        if any(t != self.item_text[m] for m, texts_m in layouts.items() for t in texts_m):
            items = {m: iter(texts_m) for m, texts_m in layouts.items()}
            rows = self._tokenize([self.expand_markers(t, items) for t in texts])
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding, as generation needs
            input_ids[b, width - len(r):] = r
            attention_mask[b, width - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "media": features}

    def _tokenize(self, texts: Sequence[str]) -> List[torch.Tensor]:
        return [self.tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts]

    def expand_markers(self, text: str, layouts: Optional[Mapping[str, Iterator[str]]] = None) -> str:
        """Generic markers -> the composite's placeholders, so one prompt works whatever the sources
        call theirs: a kind's marker (`<image>`, `<video>`, `<audio>`, and the other names families
        declare: families.marker_kinds) stands for the one modality of that kind (two of a kind: name it, `<image_med>`), and `<NAME>` for modality
        NAME. A marker that is some modality's own placeholder token (e.g. LLaVA's `<image>`) is that
        token; each source's own token keeps working (docs/runtime.md). Where a family wraps each
        item in special tokens (Gemma 3), a marker, and the family's own prompt token, becomes that
        whole text (`Family.item_text`); its bare placeholder stays as written. `layouts` gives, per
        modality, each item's own text in prompt order (`Family.item_layout`), taken item by item."""
        layouts = layouts or {}

        def item(m: str) -> str:
            if m in layouts:
                return next(layouts[m], self.item_text[m])
            return self.item_text.get(m, self.placeholders[m])

        def placeholder(match: "re.Match") -> str:
            marker, name = match.group(0), match.group(1)
            if marker in self.owner:
                m = self.owner[marker]
                if m in layouts and next(layouts[m], marker).count(self.placeholders[m]) > 1:
                    raise CompositionError(
                        f"modality {m!r}: the prompt writes its bare placeholder {marker!r} for an item its processor "
                        f"lays out as several (pan-and-scan crops); write the marker <{m}> instead")
                return marker
            if marker in self.prompt_tokens:
                return item(self.prompt_tokens[marker])
            if name in self.modalities:
                return item(name)
            kind = marker_kinds().get(name)
            if kind is None:
                return marker  # not a media marker: ordinary text
            return item(self.modality_of_kind(kind))

        return self.marker.sub(placeholder, text)

    def item_marker(self, modality: str) -> str:
        """What a prompt writes for one item of `modality` so that this processor lays it out as the
        source's processor does (`expand_markers`: the family's item text, e.g. Gemma 3's
        `<start_of_image>` ... `<end_of_image>`, and its pan-and-scan crops; else the placeholder):
        the marker `<modality>`, unless that names something else in this composite (another
        modality's placeholder token), then the family's own prompt token, then the bare placeholder
        where it is the whole item. Evaluation writes its questions' items with it."""
        placeholder = self.placeholders[modality]
        if not placeholder:
            raise CompositionError(f"modality {modality!r} has no placeholder token: its items cannot be put in a prompt")
        want = self.item_text.get(modality, placeholder)
        own = [t for t, m in self.prompt_tokens.items() if m == modality]
        for marker in [f"<{modality}>", *own, placeholder]:
            try:
                if self.expand_markers(marker) == want:
                    return marker
            except CompositionError:  # a kind's marker that is ambiguous here
                continue
        raise CompositionError(f"modality {modality!r}: no marker stands for its item {want!r} in this composite "
                               f"(<{modality}> means something else here); rename the modality")

    def modality_of_kind(self, kind: str) -> str:
        matches = [m for m in self.modalities if self.kind(m) == kind]
        if len(matches) != 1:
            have = ", ".join(f"{m} ({self.kind(m)})" for m in self.modalities)
            why = "none takes" if not matches else f"{len(matches)} modalities take"
            raise CompositionError(f"a {kind} given without its modality is ambiguous: {why} {kind}s in this "
                                   f"composite ({have}); name the modality (mergekit-mm-run --media NAME=PATH, "
                                   f"or media={{NAME: [...]}} in Python)")
        return matches[0]

    def batch_decode(self, ids, **kwargs) -> List[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def _as_list(items) -> list:
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, np.ndarray) and items.dtype == object:
        return list(items)
    return [items]
