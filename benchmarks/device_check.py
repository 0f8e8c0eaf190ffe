"""Everything the project checks on a CUDA machine, in one command, within about 5 minutes.

    python benchmarks/device_check.py [--out DIR] [--skip tests,bench,compose]

1. tests: the loader's equivalence tests (composite vs the source classes' own logits, the route
   cache, generation on a route) run on CUDA in float32 and in bfloat16 (tests/helpers.py:
   MERGEKIT_MM_TEST_DEVICE / MERGEKIT_MM_TEST_DTYPE; in bfloat16 a composite must be no further
   from the source's float32 logits than twice the source class itself in bfloat16).
2. bench: benchmarks/bench_runtime.py in bfloat16 at --size ref (271M) and --size wide (4 layers
   of a 7B's width), lean (route cache 0) and with the CUDA default cache (auto), each against
   plain transformers in the same process; plus a profile of one lean composite prefill (top
   ops) in DIR/profile-SIZE.txt.
3. compose: the same tiny-family MMER composite composed on CPU and with the merge arithmetic on
   CUDA (`MergeOptions.device`), compared file by file, byte for byte.

Prints one summary at the end; the logs (8 small files) go to DIR (default: a temporary directory),
the generated checkpoints to a temporary directory.
Needs the packages of `pip install -e '.[test]'`; never run in CI (CI has no GPU).
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENCE = ("tests/test_runtime.py", "tests/test_processor.py")
SELECT = {"float32": "reproduce or source or cache or greedy", "bfloat16": "reproduce or source or cache"}
MODALITY = {"llava": "image", "video_llava": "video", "qwen2_audio": "audio"}


def run(cmd, log: Path, env=None, timeout=240) -> tuple:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout}s", 124
    log.write_text(out)
    return rc, out, time.perf_counter() - t0


def tests(out: Path, work: Path) -> list:
    rows = []
    for dtype, select in SELECT.items():
        rc, text, secs = run([sys.executable, "-m", "pytest", *EQUIVALENCE, "-q", "-p", "no:cacheprovider", "-k", select],
                             out / f"tests-{dtype}.txt", {"MERGEKIT_MM_TEST_DEVICE": "cuda", "MERGEKIT_MM_TEST_DTYPE": dtype})
        last = next((l for l in reversed(text.strip().splitlines()) if " in " in l and ("passed" in l or "failed" in l)),
                    text.strip().splitlines()[-1] if text.strip() else "no output")
        rows.append((f"equivalence tests, cuda {dtype}", "ok" if rc == 0 else f"FAILED (rc {rc})", f"{last.strip('= ')} [{secs:.0f} s]"))
    return rows


def bench(out: Path, work: Path) -> list:
    rows = []
    for size, repeats, timeout in (("ref", 5, 120), ("wide", 2, 180)):
        cmd = [sys.executable, "benchmarks/bench_runtime.py", "--size", size, "--device", "cuda", "--dtype", "bfloat16",
               "--repeats", str(repeats), "--route-cache", "0", "auto", "--work", str(work / "bench"),
               "--profile", str(out / f"profile-{size}.txt")]
        rc, text, secs = run(cmd, out / f"bench-runtime-{size}.txt", timeout=timeout)
        if rc != 0:
            rows.append((f"runtime bench ({size}, bf16)", f"FAILED (rc {rc})", text.strip().splitlines()[-1] if text.strip() else ""))
            continue
        found, setting = [], None
        for line in text.splitlines():
            m = re.match(r"(composite, cache \S+) / plain", line)
            if m:
                setting = m.group(1)
            m = re.match(r"\s+(prefill|decode|memory \(resident\)|peak CUDA memory \(prefill\))\s+([0-9.]+x)", line)
            if m and setting:
                found.append((f"{size}: {setting}: {m.group(1)}", m.group(2),
                              line.split("(goal", 1)[1].rstrip(")") if "(goal" in line else ""))
        rows += found or [(f"runtime bench ({size}, bf16)", "no ratios found", str(out / f"bench-runtime-{size}.txt"))]
    return rows


def digests(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def compose_check(out: Path, work: Path) -> list:
    from mergekit.options import MergeOptions

    from mergekit_multimodal import compose
    from mergekit_multimodal.testing import build_tiny_family

    fam = build_tiny_family(work / "fam", tuple(MODALITY), hidden_size=256, num_layers=8)
    cfg = {"merge_method": "mmer", "base_model": str(fam.base),
           "models": [{"model": str(fam.sources[k]), "modality": m} for k, m in MODALITY.items()]}
    times = {}
    for dev in ("cpu", "cuda"):
        t0 = time.perf_counter()
        # one directory name for both: the model card's title is the output's name
        compose(cfg, str(work / dev / "composite"), MergeOptions(device=dev, quiet=True), overwrite=True)
        times[dev] = time.perf_counter() - t0
    a, b = digests(work / "cpu" / "composite"), digests(work / "cuda" / "composite")
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    (out / "compose.txt").write_text("\n".join(f"{k} cpu {a.get(k)} cuda {b.get(k)}" for k in sorted(set(a) | set(b))))
    status = "byte-identical" if not differ else f"DIFFER: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}"
    return [("compose cpu vs --cuda (mmer, 3 sources)", status,
             f"{len(a)} files; cpu {times['cpu']:.2f} s, cuda {times['cuda']:.2f} s")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where the logs go (default: a temporary directory)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: tests, bench, compose")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("device_check: torch sees no CUDA device; this script is for a GPU machine (CI never runs it)")
    out = Path(args.out or tempfile.mkdtemp(prefix="device-check-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="device-check-work-"))  # checkpoints and composites, not logs
    t0 = time.perf_counter()
    rows = []
    for name, part in (("compose", compose_check), ("tests", tests), ("bench", bench)):
        if name in skip:
            continue
        try:
            rows += part(out, work)
        except Exception as exc:  # one broken part must not hide the others' numbers
            rows.append((name, "FAILED", f"{type(exc).__name__}: {exc}"))
        print(f"[{time.perf_counter() - t0:.0f} s] {name} done", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n== device check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s; logs in {out} ==")
    for label, value, note in rows:
        print(f"{label:{width}}  {value:>16}  {note}")
    (out / "summary.txt").write_text("\n".join(f"{l}\t{v}\t{n}" for l, v, n in rows) + "\n")
    sys.exit(1 if any("FAIL" in v or "DIFFER" in v for _, v, _ in rows) else 0)


if __name__ == "__main__":
    main()
