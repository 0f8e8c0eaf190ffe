"""Synthetic concepts, media and text for the zoo: every modality expresses the same 12 concepts.

A concept is a colour word. Each input shows two distinct concepts, the first one *first*:
- image (28 px): one colour on the left, the other on the right (the split jitters by a few pixels),
  and 1-4 dots (checkered 4 px squares), more of them on one side than on the other;
- audio (1 s at 16 kHz): a tone at the first concept's pitch, then one at the second's;
- video (4 frames of 28 px): coloured noise with a rectangle of a concept's colour (20-28 px a side,
  anywhere, its own size, place and shade in each frame), the first concept's in the first 1-3 frames
  (drawn: one of the two may be shown for a single frame), the second's in the rest; a checkered dot
  moves sideways;
- point cloud (64 xyz points): a cluster at each concept's icosahedron vertex; the first concept's
  cluster is the larger one (40 points against 24: the point encoder does not see point order).
Each rendering is jittered (brightness, pitch, position) so that near concepts (red / orange / pink /
brown, white / gray, blue / cyan / purple, neighbouring vertices) are sometimes confused: the sources
do not sit at 100% on their own tasks (issue 17).
Questions: "which one appears in the input ?" (one attribute: colour), "which one is first ?" (two
at once: colour and position; the input's other concept is always a distractor), and the commonality
question: n inputs share exactly one concept (each other concept appears in one input only). The
forgetting experiment's new task, "which one has more dots ?" (the concept of the image's side with
more dots: colour, position and count at once), is in no other model's training. With choices
(scored by the evaluator) or free-form (no choices: the answer is generated, then `</s>`).
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import numpy as np

CONCEPTS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white", "gray", "black")
RGB = {"red": (220, 30, 30), "orange": (240, 140, 20), "yellow": (230, 220, 40), "green": (30, 200, 40),
       "cyan": (30, 200, 210), "blue": (30, 60, 220), "purple": (140, 40, 180), "pink": (240, 120, 180),
       "brown": (130, 80, 30), "white": (240, 240, 240), "gray": (128, 128, 128), "black": (15, 15, 15)}
# Hz, evenly spaced on the mel scale (200 Hz .. 5 kHz), the spectrum order of the colours
PITCH = {c: 700.0 * (10 ** ((m0 + (m1 - m0) * i / (len(CONCEPTS) - 1)) / 2595) - 1) for i, c in enumerate(CONCEPTS)
         for m0, m1 in [(2595 * np.log10(1 + 200 / 700), 2595 * np.log10(1 + 5000 / 700))]}
_PHI = (1 + 5 ** 0.5) / 2
#: the 12 vertices of an icosahedron (radius ~1.9), one per concept
CORNER = {c: np.array(v, dtype=np.float32) for c, v in zip(CONCEPTS, [
    (s1 * a, s2 * b, 0) for a, b in [(1, _PHI)] for s1 in (-1, 1) for s2 in (-1, 1)] + [
    (0, s1 * a, s2 * b) for a, b in [(1, _PHI)] for s1 in (-1, 1) for s2 in (-1, 1)] + [
    (s2 * b, 0, s1 * a) for a, b in [(1, _PHI)] for s1 in (-1, 1) for s2 in (-1, 1)])}
MODALITIES = ("image", "audio", "video", "point_cloud")
LETTERS = ("A", "B", "C", "D")
IMAGE_SIZE, FRAMES, SAMPLE_RATE, POINTS = 28, 4, 16000, 64
FIRST_POINTS = 40  # the first concept's cluster: the larger one
#: rendering jitter: brightness factor range, pixel noise, pitch jitter (relative), point noise
BRIGHTNESS, PIXEL_NOISE, PITCH_JITTER, AUDIO_NOISE, POINT_NOISE = (0.65, 1.35), 20.0, 0.007, 0.03, 0.55
#: px: the range of a video frame's concept rectangle's width and height (over coloured noise)
VIDEO_PATCH = (20, 28)
DOT = 4  # px: a dot is a DOT x DOT checkered square (0 / 255), visible on every colour
#: dots per image: 1-4 in all, never as many on the left as on the right
MAX_DOTS = 4
COMMON_Q = "question : what do all inputs have in common ?"
APPEARS_Q = "question : which one appears in the input ?"
FIRST_Q = "question : which one is first ?"
#: the forgetting experiment's new task (never in the base LM's text): the concept of the image's
#: side with more dots
MORE_Q = "question : which one has more dots ?"
#: the forgetting experiment: FORGET_SOURCE's source fine-tuned on `more` only is the zoo's fifth
#: source, modality NEW (a task route of FORGET_SOURCE's kind); its benchmark subsets
FORGET_SOURCE, NEW = "image", "image_new"
OLD_TASK, NEW_TASK = "old-task", "new-task"
#: the questions each source is trained and tested on (its own task); NEW's: the new task only
KINDS = {**{m: ("appears", "first") for m in MODALITIES}, NEW: ("more",)}


def kind(modality: str) -> str:
    """The kind of media a zoo modality takes (NEW is an image route)."""
    return FORGET_SOURCE if modality == NEW else modality

WORDS = (["input", ":", ".", "question", "what", "do", "all", "inputs", "have", "in", "common", "?", "which",
          "one", "appears", "the", "answer", "describe", "is", "first", "has", "more", "dots"]
         + [str(i) for i in range(1, 5)]
         + list(LETTERS) + list(CONCEPTS))


def _shade(c: str, rng: np.random.Generator) -> np.ndarray:
    return np.array(RGB[c], dtype=np.float32) * rng.uniform(*BRIGHTNESS)


_CHECKER = np.where(np.add.outer(np.arange(DOT), np.arange(DOT)) % 2, 255.0, 0.0)[..., None]
_ROWS = range(0, IMAGE_SIZE - DOT + 1, 2)  # dots sit on even pixels: one checker phase


def _place(rng: np.random.Generator, k: int, cols: Sequence[int], taken: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """k dot corners (x, y) among `cols` x _ROWS, apart from every dot in `taken` and each other
    (a gap of a pixel at least; drawn again from the start where the first ones leave no room)."""
    apart = lambda p, q: abs(p[0] - q[0]) > DOT or abs(p[1] - q[1]) > DOT  # noqa: E731
    spots = [(x, y) for x in cols for y in _ROWS if all(apart((x, y), t) for t in taken)]
    while True:
        out: List[Tuple[int, int]] = []
        while len(out) < k:
            free = [s for s in spots if all(apart(s, o) for o in out)]
            if not free:
                break
            out.append(free[int(rng.integers(len(free)))])
        if len(out) == k:
            return out


def image(pair: Sequence[str], rng: np.random.Generator, dots: Tuple[int, int] = (1, 0)) -> np.ndarray:
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    split = IMAGE_SIZE // 2 + int(rng.integers(-4, 5))
    img[:, :split] = _shade(pair[0], rng)
    img[:, split:] = _shade(pair[1], rng)
    left = _place(rng, dots[0], range(0, split - DOT + 1, 2), [])  # wholly on their side
    right = _place(rng, dots[1], range(split + split % 2, IMAGE_SIZE - DOT + 1, 2), left)
    for x, y in left + right:
        img[y:y + DOT, x:x + DOT] = _CHECKER
    return np.clip(img + rng.normal(0, PIXEL_NOISE, img.shape), 0, 255).astype(np.uint8)


def audio(pair: Sequence[str], rng: np.random.Generator, dots: Optional[Tuple[int, int]] = None) -> np.ndarray:
    n = SAMPLE_RATE // 2
    t = np.arange(n) / SAMPLE_RATE
    parts = [rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * PITCH[c] * (1 + rng.normal(0, PITCH_JITTER)) * t
                                            + rng.uniform(0, 6.3)) for c in pair]
    wave = np.concatenate(parts) + rng.normal(0, AUDIO_NOISE, 2 * n)
    return wave.astype(np.float32)


def video(pair: Sequence[str], rng: np.random.Generator, dots: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """FRAMES frames of coloured noise (every pixel drawn at random: no concept's colour), each with a
    rectangle of one concept's colour (width and height drawn in VIDEO_PATCH per frame, anywhere: it
    always covers the frame's centre): the first concept's in the first 1 to FRAMES - 1 frames (drawn:
    a concept may be shown for one frame only), the second's in the rest. Each frame draws its own
    shade, and a checkered dot (an image's dot: no concept's colour) moves sideways."""
    frames = rng.uniform(0, 255, (FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    x, y, dx = rng.integers(2, 20), rng.integers(2, 20), rng.choice([-2, 2])
    cut = int(rng.integers(1, FRAMES))  # frames [0, cut) show the first concept
    for f in range(FRAMES):
        w, h = (int(v) for v in rng.integers(VIDEO_PATCH[0], VIDEO_PATCH[1] + 1, 2))
        x0, y0 = int(rng.integers(0, IMAGE_SIZE - w + 1)), int(rng.integers(0, IMAGE_SIZE - h + 1))
        frames[f, y0:y0 + h, x0:x0 + w] = _shade(pair[0] if f < cut else pair[1], rng)
        xx = int(np.clip(x + f * dx, 0, IMAGE_SIZE - DOT))
        frames[f, y:y + DOT, xx:xx + DOT] = _CHECKER
    return np.clip(frames + rng.normal(0, PIXEL_NOISE, frames.shape), 0, 255).astype(np.uint8)


def point_cloud(pair: Sequence[str], rng: np.random.Generator, dots: Optional[Tuple[int, int]] = None) -> np.ndarray:
    sizes = (FIRST_POINTS, POINTS - FIRST_POINTS)
    pts = np.concatenate([CORNER[c] + rng.normal(0, POINT_NOISE, (k, 3)) for c, k in zip(pair, sizes)])
    return pts[rng.permutation(POINTS)].astype(np.float32)  # order carries nothing: size tells the first


RENDER = {"image": image, "audio": audio, "video": video, "point_cloud": point_cloud}


def pair(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.sample(CONCEPTS, 2)
    return a, b


def dots(rng: random.Random) -> Tuple[int, int]:
    """(dots on the image's left, on its right): 1..MAX_DOTS in all, never as many on each side."""
    n = rng.randint(1, MAX_DOTS)
    return rng.choice([(k, n - k) for k in range(n + 1) if 2 * k != n])


def choices_with(answer: str, distractors: Sequence[str], rng: random.Random) -> Tuple[List[str], str]:
    opts = [answer] + list(distractors)
    rng.shuffle(opts)
    return opts, LETTERS[opts.index(answer)]


def choice_text(opts: Sequence[str]) -> str:
    return " ".join(f"{letter} . {o}" for letter, o in zip(LETTERS, opts))


def _absent(p: Sequence[str], k: int, rng: random.Random) -> List[str]:
    return rng.sample([c for c in CONCEPTS if c not in p], k)


def single_question(rng: random.Random, kind: Optional[str] = None, p: Optional[Tuple[str, str]] = None,
                    d: Optional[Tuple[int, int]] = None, kinds: Sequence[str] = ("appears", "first")) -> dict:
    """One input and one of its questions (`kind`, else one of `kinds`): `appears` (one of its two
    concepts among three absent ones), `first` (its first concept; the second is a distractor: colour
    and position at once) or `more` (the forgetting task: the concept of the image's side with more
    dots; the other is a distractor: colour, position and count at once)."""
    p = p or pair(rng)
    kind = kind or rng.choice(tuple(kinds))
    d = d or (dots(rng) if kind == "more" else None)  # drawn only where the question needs them
    if kind == "appears":
        answer, distract = rng.choice(p), _absent(p, 3, rng)
    else:
        i = 0 if kind == "first" or (kind == "more" and d[0] > d[1]) else 1
        answer, distract = p[i], [p[1 - i]] + _absent(p, 2, rng)
    opts, letter = choices_with(answer, distract, rng)
    return {"pairs": [p], "dots": [d], "choices": opts, "answer": letter, "question": QUESTION[kind]}


QUESTION = {"appears": APPEARS_Q, "first": FIRST_Q, "more": MORE_Q}


def common_question(n: int, rng: random.Random) -> dict:
    """n inputs sharing exactly one concept; distractors: concepts in one input only, then absent ones."""
    common = rng.choice(CONCEPTS)
    others = rng.sample([c for c in CONCEPTS if c != common], n)
    pairs = [tuple(rng.sample([common, o], 2)) for o in others]
    absent = [c for c in CONCEPTS if c != common and c not in others]
    distract = (others + rng.sample(absent, 3))[:3]
    opts, letter = choices_with(common, distract, rng)
    return {"pairs": pairs, "dots": [None] * n, "choices": opts, "answer": letter, "question": COMMON_Q}


def answer_word(q: dict) -> str:
    """The zoo's models answer with the chosen option's text (scored with the evaluator's
    `choice` scoring): tiny models trained for minutes do not learn letter binding (docs/zoo.md)."""
    return q["choices"][LETTERS.index(q["answer"])]


def prompt(slots: Sequence[str], question: str, opts: Optional[Sequence[str]] = None) -> str:
    """The one prompt format of the zoo: `input i : SLOT .` per input, the question, the choices
    (none: a free-form question), `answer :`."""
    inputs = " ".join(f"input {i + 1} : {s} ." for i, s in enumerate(slots))
    return f"{inputs} {question} {choice_text(opts) + ' ' if opts else ''}answer :"


def example(slots: Sequence[str], q: dict, rng: random.Random) -> Tuple[str, str]:
    """A training (prompt, answer) for question q: with its choices, or free-form one time in three."""
    free = rng.random() < 1 / 3
    return prompt(slots, q["question"], None if free else q["choices"]), " " + answer_word(q)


def describe(slots: Sequence[str], p: Sequence[str]) -> Tuple[str, str]:
    return f"input 1 : {slots[0]} . describe :", f" {p[0]} {p[1]}"


def text_example(rng: random.Random) -> Tuple[str, str]:
    """Base LM pretraining: the questions over text descriptions (n = 1..4 inputs), or a description
    copy. Not the forgetting experiment's `more` task."""
    kind = rng.random()
    if kind < 0.15:
        p = pair(rng)
        return describe([" ".join(p)], p)
    q = single_question(rng) if kind < 0.4 else common_question(rng.choice((2, 3, 4)), rng)
    return example([" ".join(p) for p in q["pairs"]], q, rng)


def render_many(modality: str, pairs: Sequence[Sequence[str]], seed: int,
                counts: Optional[Sequence[Tuple[int, int]]] = None) -> List[np.ndarray]:
    """Each pair rendered in `modality` (an image with its dots: `counts`)."""
    rng = np.random.default_rng(seed)
    return [RENDER[modality](p, rng, d) for p, d in zip(pairs, counts or [None] * len(pairs))]


def benchmark_items(seed: int, per_subset: int) -> List[dict]:
    """Benchmark questions (no media yet): each modality's own task (KINDS), then common-2/3/4 over
    random distinct modalities. Each entry: subset, question text with placeholders, modalities,
    pairs, dots (None where no question needs them: write_benchmark draws an image's), choices, answer."""
    rng = random.Random(seed)
    items: List[dict] = []
    for m in MODALITIES:
        for _ in range(per_subset):
            q = single_question(rng, kinds=KINDS[m])
            items.append({"subset": m, "modalities": [m], **q})
    for n in (2, 3, 4):
        for _ in range(per_subset):
            q = common_question(n, rng)
            items.append({"subset": f"common-{n}", "modalities": rng.sample(MODALITIES, n), **q})
    return items


def forgetting_items(seed: int, per_subset: int) -> List[dict]:
    """The forgetting benchmark: FORGET_SOURCE's own task (KINDS, as in benchmark_items) as OLD_TASK,
    and the fine-tune's `more` task on NEW's media as NEW_TASK."""
    rng = random.Random(seed)
    return ([{"subset": OLD_TASK, "modalities": [FORGET_SOURCE], **single_question(rng, kinds=KINDS[FORGET_SOURCE])}
             for _ in range(per_subset)]
            + [{"subset": NEW_TASK, "modalities": [NEW], **single_question(rng, kinds=KINDS[NEW])}
               for _ in range(per_subset)])
