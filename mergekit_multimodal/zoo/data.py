"""Synthetic concepts, media and text for the zoo: every modality expresses the same 8 concepts.

A concept is a colour word. Each input shows two distinct concepts, in order:
- image (28 px): left half one colour, right half the other;
- audio (1 s at 16 kHz): a tone at the first concept's pitch, then one at the second's;
- video (4 frames of 28 px, with a moving grey dot): two frames of one colour, then two of the other;
- point cloud (64 xyz points): a cluster at the first concept's cube corner, one at the second's.
Questions are multiple choice with letters A-D. The commonality question gives n inputs that share
exactly one concept (each other concept appears in one input only) and asks what they have in common.
"""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import numpy as np

CONCEPTS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
       "purple": (140, 40, 180), "orange": (240, 140, 20), "white": (240, 240, 240), "black": (15, 15, 15)}
# Hz, evenly spaced on the mel scale (200 Hz .. 5 kHz) so each tone lands in its own Whisper mel bands
PITCH = {c: 700.0 * (10 ** ((m0 + (m1 - m0) * i / 7) / 2595) - 1) for i, c in enumerate(CONCEPTS)
         for m0, m1 in [(2595 * np.log10(1 + 200 / 700), 2595 * np.log10(1 + 5000 / 700))]}
CORNER = {c: np.array([(i >> 2) & 1, (i >> 1) & 1, i & 1], dtype=np.float32) * 2 - 1 for i, c in enumerate(CONCEPTS)}
MODALITIES = ("image", "audio", "video", "point_cloud")
LETTERS = ("A", "B", "C", "D")
IMAGE_SIZE, FRAMES, SAMPLE_RATE, POINTS = 28, 4, 16000, 64
COMMON_Q = "question : what do all inputs have in common ?"
SINGLE_Q = "question : which one appears in the input ?"

WORDS = (["input", ":", ".", "question", "what", "do", "all", "inputs", "have", "in", "common", "?", "which",
          "one", "appears", "the", "answer", "describe"] + [str(i) for i in range(1, 5)] + list(LETTERS)
         + list(CONCEPTS))


def image(pair: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:, : IMAGE_SIZE // 2] = RGB[pair[0]]
    img[:, IMAGE_SIZE // 2:] = RGB[pair[1]]
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def audio(pair: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    n = SAMPLE_RATE // 2
    t = np.arange(n) / SAMPLE_RATE
    parts = [0.5 * np.sin(2 * np.pi * PITCH[c] * (1 + rng.normal(0, 0.01)) * t + rng.uniform(0, 6.3)) for c in pair]
    wave = np.concatenate(parts) + rng.normal(0, 0.02, 2 * n)
    return wave.astype(np.float32)


def video(pair: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    frames = np.zeros((FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    x, y, dx = rng.integers(2, 20), rng.integers(2, 20), rng.choice([-2, 2])
    for f in range(FRAMES):
        frames[f] = RGB[pair[f * 2 // FRAMES]]
        xx = int(np.clip(x + f * dx, 0, IMAGE_SIZE - 6))
        frames[f, y:y + 6, xx:xx + 6] = 128  # a grey dot moving sideways
    return np.clip(frames + rng.normal(0, 12, frames.shape), 0, 255).astype(np.uint8)


def point_cloud(pair: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    half = POINTS // 2
    pts = np.concatenate([CORNER[c] + rng.normal(0, 0.25, (half, 3)) for c in pair]).astype(np.float32)
    return pts  # order kept: first concept's cluster first


RENDER = {"image": image, "audio": audio, "video": video, "point_cloud": point_cloud}


def pair(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.sample(CONCEPTS, 2)
    return a, b


def choices_with(answer: str, distractors: Sequence[str], rng: random.Random) -> Tuple[List[str], str]:
    opts = [answer] + list(distractors)
    rng.shuffle(opts)
    return opts, LETTERS[opts.index(answer)]


def choice_text(opts: Sequence[str]) -> str:
    return " ".join(f"{letter} . {o}" for letter, o in zip(LETTERS, opts))


def single_question(rng: random.Random) -> dict:
    """One input; which of four concepts appears in it (one of its two does; three are absent)."""
    p = pair(rng)
    answer = rng.choice(p)
    opts, letter = choices_with(answer, rng.sample([c for c in CONCEPTS if c not in p], 3), rng)
    return {"pairs": [p], "choices": opts, "answer": letter}


def common_question(n: int, rng: random.Random) -> dict:
    """n inputs sharing exactly one concept; distractors: concepts in one input only, then absent ones."""
    common = rng.choice(CONCEPTS)
    others = rng.sample([c for c in CONCEPTS if c != common], n)
    pairs = [tuple(rng.sample([common, o], 2)) for o in others]
    absent = [c for c in CONCEPTS if c != common and c not in others]
    distract = (others + rng.sample(absent, 3))[:3]
    opts, letter = choices_with(common, distract, rng)
    return {"pairs": pairs, "choices": opts, "answer": letter}


def answer_word(q: dict) -> str:
    """The zoo's models answer with the chosen option's text (scored with the evaluator's
    `choice` scoring): tiny models trained for minutes do not learn letter binding (docs/zoo.md)."""
    return q["choices"][LETTERS.index(q["answer"])]


def prompt(slots: Sequence[str], question: str, opts: Sequence[str]) -> str:
    """The one prompt format of the zoo: `input i : SLOT .` per input, the question, choices, `answer :`."""
    inputs = " ".join(f"input {i + 1} : {s} ." for i, s in enumerate(slots))
    return f"{inputs} {question} {choice_text(opts)} answer :"


def text_example(rng: random.Random) -> Tuple[str, str]:
    """Base LM pretraining: the same questions over text descriptions (n = 1..4 inputs), or a description copy."""
    kind = rng.random()
    if kind < 0.15:
        p = pair(rng)
        return f"input 1 : {p[0]} {p[1]} . describe :", f" {p[0]} {p[1]}"
    if kind < 0.35:
        q = single_question(rng)
        return prompt([" ".join(q["pairs"][0])], SINGLE_Q, q["choices"]), " " + answer_word(q)
    q = common_question(rng.choice((2, 3, 4)), rng)
    return prompt([" ".join(p) for p in q["pairs"]], COMMON_Q, q["choices"]), " " + answer_word(q)


def render_many(modality: str, pairs: Sequence[Sequence[str]], seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [RENDER[modality](p, rng) for p in pairs]


def benchmark_items(seed: int, per_subset: int) -> List[dict]:
    """Benchmark questions (no media yet): each modality's own task, then common-2/3/4 over random
    distinct modalities. Each entry: subset, question text with placeholders, modalities, pairs, choices, answer."""
    rng = random.Random(seed)
    items: List[dict] = []
    for m in MODALITIES:
        for _ in range(per_subset):
            q = single_question(rng)
            items.append({"subset": m, "modalities": [m], **q})
    for n in (2, 3, 4):
        for _ in range(per_subset):
            q = common_question(n, rng)
            items.append({"subset": f"common-{n}", "modalities": rng.sample(MODALITIES, n), **q})
    return items
