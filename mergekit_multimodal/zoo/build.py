"""Build (or reuse) the zoo: base LM, one source per modality, and the benchmark splits.

The cache directory is named by a hash of the spec and of the zoo's source code, so any change
rebuilds; a finished step leaves a `.done` marker, so an interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import wave
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from mergekit_multimodal.zoo import data
from mergekit_multimodal.zoo import train

ZOO_VERSION = 2
#: directory name -> (function(spec, base_dir, out_dir, progress) training it, its step count). The
#: plain sources first, then the forgetting fine-tune (data.NEW: data.FORGET_SOURCE's source trained
#: on the `more` task only); then each one's DAMC-decoupled adapters ("<m>-damc", NEW's on the `more`
#: task), which use the plain source's trained encoder + connector as their frozen feature extractor.
SOURCE_BUILDERS: Dict[str, Tuple[Callable, Callable]] = {
    **{m: ((lambda spec, base, out, progress, m=m, k=k: train.train_source(m, spec, base, out, k, progress)),
           lambda spec: spec.connector_steps + spec.llm_steps)
       for k, m in enumerate(data.MODALITIES, start=1)},
    data.NEW: ((lambda spec, base, out, progress: train.train_finetune(
        spec, os.path.join(os.path.dirname(out), data.FORGET_SOURCE), out, progress)), lambda spec: spec.forget_steps),
    **{f"{m}-damc": ((lambda spec, base, out, progress, m=m, k=k: train.train_damc_source(
        m, spec, base, os.path.join(os.path.dirname(out), m), out, k, progress)), lambda spec: spec.damc_steps)
       for k, m in enumerate(data.MODALITIES + (data.NEW,), start=1)},
}


def default_cache() -> str:
    return os.environ.get("MERGEKIT_MM_ZOO_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "mergekit-multimodal", "zoo"))


def spec_hash(spec: train.ZooSpec) -> str:
    h = hashlib.sha256(json.dumps({"v": ZOO_VERSION, **dataclasses.asdict(spec)}, sort_keys=True).encode())
    here = os.path.dirname(__file__)
    # the code that trains the zoo or computes its training features
    for name in ("data.py", "train.py", "tokenizer.py", "build.py", "../methods/damc/train.py", "../runtime/encoders.py",
                 *(f"../families/{f}.py" for f in sorted(set(train.FAMILY.values())))):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def total_steps(spec: train.ZooSpec) -> int:
    return spec.base_steps + sum(steps(spec) for _, steps in SOURCE_BUILDERS.values())


def _done(d: str) -> bool:
    return os.path.isfile(os.path.join(d, ".done"))


def _mark(d: str) -> None:
    open(os.path.join(d, ".done"), "w").close()


def build_zoo(spec: train.ZooSpec, cache: Optional[str] = None, progress: Optional[Callable[[int], None]] = None) -> str:
    """Return the zoo directory: base/, <modality>/ for each source, bench-test/, bench-val/."""
    import torch

    root = os.path.join(cache or default_cache(), spec_hash(spec))
    os.makedirs(root, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over small kernels
    try:
        base = os.path.join(root, "base")
        if not _done(base):
            shutil.rmtree(base, ignore_errors=True)
            train.train_base(spec, base, progress)
            _mark(base)
        elif progress:
            progress(spec.base_steps)
        for m, (builder, steps) in SOURCE_BUILDERS.items():
            d = os.path.join(root, m)
            if not _done(d):
                shutil.rmtree(d, ignore_errors=True)
                builder(spec, base, d, progress)
                _mark(d)
            elif progress:
                progress(steps(spec))
    finally:
        torch.set_num_threads(threads)
    for name, seed, items in (("bench-test", spec.test_seed, data.benchmark_items),
                              ("bench-val", spec.test_seed + 1, data.benchmark_items),
                              ("bench-forget", spec.test_seed + 2, data.forgetting_items)):
        d = os.path.join(root, name)
        if not _done(d):
            shutil.rmtree(d, ignore_errors=True)
            write_benchmark(d, seed, spec.test_per_subset, items)
            _mark(d)
    return root


def _save_wav(path: str, wave_f32: np.ndarray) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(data.SAMPLE_RATE)
        w.writeframes((np.clip(wave_f32, -1, 1) * 32767).astype("<i2").tobytes())


def save_media(root: str, stem: str, modality: str, arr: np.ndarray) -> str:
    """Write one rendered input as the file a user would give (PNG, WAV or .npy); its path under root."""
    rel = stem + {"image": ".png", "audio": ".wav"}.get(modality, ".npy")
    if modality == "image":
        Image.fromarray(arr).save(os.path.join(root, rel))
    elif modality == "audio":
        _save_wav(os.path.join(root, rel), arr)
    else:
        np.save(os.path.join(root, rel), arr)
    return rel


#: the example inputs the story writes for `mergekit-mm-run` (README): modality -> its two concepts,
#: in order, and its dots (left, right: data.dots; the image only)
EXAMPLES = {"image": ("red", "blue", (1, 2)), "audio": ("yellow", "blue", None), "video": ("blue", "black", None),
            "point_cloud": ("green", "blue", None)}


def write_examples(out_dir: str, seed: int = 7) -> Dict[str, str]:
    """One input per modality (EXAMPLES; named by their concepts, first one first, then the number of
    dots) for trying the composites by hand: they share one concept, blue. Returns modality -> path."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    return {m: os.path.join(out_dir, save_media(out_dir, f"{m}-{a}-{b}" + (f"-{sum(d)}dots" if d else ""), m,
                                                data.RENDER[m]((a, b), rng, d)))
            for m, (a, b, d) in EXAMPLES.items()}


def write_benchmark(out_dir: str, seed: int, per_subset: int, items: Callable = data.benchmark_items) -> str:
    """The commonality benchmark (or `items`' questions: data.forgetting_items): media files +
    benchmark.jsonl (docs/evaluate.md's format). The test split uses a seed no training run uses
    (training draws from the spec's seed)."""
    os.makedirs(os.path.join(out_dir, "media"), exist_ok=True)
    rng = np.random.default_rng(seed)
    dots_rng = random.Random(seed)  # an image's dots where its question did not draw them
    lines = []
    for i, q in enumerate(items(seed, per_subset)):
        media: Dict[str, list] = {}
        for m, p, d in zip(q["modalities"], q["pairs"], q["dots"]):
            if d is None and data.kind(m) == "image":
                d = data.dots(dots_rng)
            media[m] = [save_media(out_dir, f"media/{i:05d}-{m}", data.kind(m), data.RENDER[data.kind(m)](p, rng, d))]
        # the evaluator's template adds the choices and "answer :"
        question = data.prompt([f"<{m}>" for m in q["modalities"]], q["question"]).removesuffix(" answer :")
        lines.append(json.dumps({"id": f"q{i:05d}", "subset": q["subset"], "question": question, "media": media,
                                 "choices": q["choices"], "answer": q["answer"]}))
    with open(os.path.join(out_dir, "benchmark.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return out_dir
