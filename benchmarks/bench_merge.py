"""Composition-engine benchmark: our `mmer` / `naive_mc` against mergekit's `ties` / `linear`.

What it measures
    Wall time, peak resident memory (RSS) and CPU time of one whole merge command, end to end
    (interpreter start, imports, planning, reading, merging, writing), for four methods on the
    SAME inputs: a random bf16 Llama base and N=4 sources = base + 0.05 * std * randn per tensor.
    mergekit's methods run through `mergekit-yaml`, ours through `mergekit-mm-yaml` with a
    composite YAML whose sources carry a `layout:` override (they are plain causal LMs).
    Pairs compared: mmer vs ties (both elect a sign with TIES trimming at density 0.5; mmer also
    writes its routes: the task vector and one 1-bit mask per source) and naive_mc vs linear
    (both the plain mean of the 4 sources; neither reads the base).

Why subprocesses
    Every run is a fresh process, started with `subprocess.Popen` and reaped with `os.wait4`,
    whose rusage gives that child's own peak RSS (ru_maxrss) and CPU time. In-process runs would
    share one high-water mark, and allocator/import state would leak from one run to the next.
    Methods alternate (ties, mmer, linear, naive_mc, ties, ...) for --repeats rounds so drift
    (page cache, thermal, other load) hits all of them alike; the table shows medians.
    Inputs are generated once and cached under --work; they sit in the page cache during the
    runs, so this measures compute + memory, not cold-disk reads.

    python benchmarks/bench_merge.py --size tiny --repeats 1     # smoke check, seconds
    python benchmarks/bench_merge.py --size ref --repeats 2      # ~271M params, minutes
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
N_SOURCES = 4
ORDER = ("ties", "mmer", "linear", "naive_mc")
# vocab 32000, untied head, full attention heads; `ref` matches the 271M-param reference model
PRESETS = {
    "tiny": dict(hidden_size=72, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),
    "ref": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
    # 4 layers of a 7B Llama's width (1.07B params): per-layer work the size of real checkpoints' (GPU runs)
    "wide": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32),
}
GOALS = (  # (label, our method, mergekit method, metric, goal ratio)
    ("mmer / ties wall", "mmer", "ties", "wall", 0.5),
    ("mmer / ties peak RSS", "mmer", "ties", "rss", 0.5),
    ("naive_mc / linear wall", "naive_mc", "linear", "wall", 1.1),
    ("naive_mc / linear peak RSS", "naive_mc", "linear", "rss", None),
)


def generate(root: Path, size: str) -> int:
    """Write base/ and src0..src3/ (once), in a child process; return the parameter count.

    In a child: Linux keeps a process's peak RSS across fork + exec, so inputs generated in this
    process would count in every merge's measured peak (naive_mc read 1.92 GiB instead of 0.72).
    """
    marker = root / "params.txt"
    if not marker.exists():
        subprocess.run([sys.executable, __file__, "--generate-only", "--size", size, "--work", str(root.parent)],
                       check=True)
    return int(marker.read_text())


def _generate(root: Path, size: str) -> None:
    import torch
    import transformers as T

    T.utils.logging.disable_progress_bar()
    shutil.rmtree(root, ignore_errors=True)
    cfg = T.LlamaConfig(vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
                        **PRESETS[size])
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(N_SOURCES):
            for name, p in model.named_parameters():
                t = base[name].float()
                delta = 0.05 * t.std() * torch.randn(t.shape, generator=gen)
                p.copy_((t + delta).to(torch.bfloat16))
            model.save_pretrained(root / f"src{i}")
    (root / "params.txt").write_text(str(n_params))


def write_configs(root: Path) -> dict:
    """One YAML per method; returns method -> command (without the output path)."""
    srcs = [str(root / f"src{i}") for i in range(N_SOURCES)]
    layout = {"llm_prefix": "model.", "lm_head": "lm_head.weight", "modality_prefixes": []}
    composite = lambda params, per_model: {  # noqa: E731
        "base_model": str(root / "base"), "dtype": "bfloat16", "parameters": params,
        "models": [{"model": s, "modality": f"m{i}", "layout": dict(layout), **per_model} for i, s in enumerate(srcs)]}
    cfgs = {
        "ties": {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "bfloat16",
                 "models": [{"model": s, "parameters": {"weight": 1.0, "density": 0.5}} for s in srcs]},
        # no base_model: linear would take the base as a fifth input; naive_mc does not read it
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": s, "parameters": {"weight": 1.0}} for s in srcs]},
        "mmer": {"merge_method": "mmer", **composite({"election": "ties", "density": 0.5}, {})},
        "naive_mc": {"merge_method": "naive_mc", **composite({}, {"parameters": {"weight": 1.0}})},
    }
    cmds = {}
    for method, cfg in cfgs.items():
        path = root / f"{method}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if method in ("ties", "linear"):
            cmds[method] = [str(BIN / "mergekit-yaml"), str(path), "--no-copy-tokenizer", "--no-write-model-card"]
        else:
            cmds[method] = [str(BIN / "mergekit-mm-yaml"), str(path)]
    return cmds


def run_once(cmd: list, out: Path, log: Path) -> dict:
    """Run one merge in a fresh process; its own peak RSS and CPU time come from os.wait4."""
    shutil.rmtree(out, ignore_errors=True)
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd + [str(out)], stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"FAILED ({proc.returncode}): {shlex.join(cmd + [str(out)])}\n{log.read_text()[-3000:]}")
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "rss": ru.ru_maxrss * 1024, "cpu": ru.ru_utime + ru.ru_stime, "out": out_bytes}


def code_digest() -> str:
    """Hash of the package sources, so a table can be tied to the code it measured."""
    src = Path(__file__).resolve().parents[1] / "mergekit_multimodal"
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(src.rglob("*.py")))).hexdigest()[:12]


def describe() -> str:
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) * 1024
    import mergekit.merge  # noqa: F401  (version only)
    from importlib.metadata import version
    return (f"mergekit_multimodal sources sha256:{code_digest()}, load average {os.getloadavg()[0]:.2f}\n"
            f"machine: {len(os.sched_getaffinity(0))} CPUs, {mem / 2**30:.1f} GiB RAM, Python {sys.version.split()[0]}, "
            f"torch {version('torch')}, transformers {version('transformers')}, mergekit {version('mergekit')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=PRESETS, default="tiny")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the 4 methods (medians reported)")
    ap.add_argument("--work", default="./bench-work", help="cache for the generated checkpoints")
    ap.add_argument("--shard-size", default=None,
                    help="--out-shard-size passed to every run (default: mergekit's default, 5B)")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        _generate(Path(args.work).resolve() / args.size, args.size)
        return

    print("$ python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    digest = code_digest()
    print("code:", describe())
    root = Path(args.work).resolve() / args.size
    t0 = time.perf_counter()
    n_params = generate(root, args.size)
    print(f"inputs: {root} ({args.size}): base + {N_SOURCES} sources, {n_params:,} params each "
          f"({n_params / 1e6:.1f}M, bf16) [ready in {time.perf_counter() - t0:.1f} s]")
    cmds = write_configs(root)
    if args.shard_size:
        cmds = {m: c + ["--out-shard-size", args.shard_size] for m, c in cmds.items()}

    for name in ("mergekit-yaml", "mergekit-mm-yaml"):  # interpreter start + imports, no merge
        t = time.perf_counter()
        subprocess.run([str(BIN / name), "--help"], stdout=subprocess.DEVNULL, check=True)
        print(f"startup: {name} --help takes {time.perf_counter() - t:.2f} s")
    runs = {m: [] for m in ORDER}
    for r in range(args.repeats):
        for m in ORDER:
            res = run_once(cmds[m], root / f"out-{m}", root / f"{m}.log")
            runs[m].append(res)
            print(f"  round {r + 1}/{args.repeats} {m:9s} wall {res['wall']:7.2f} s  "
                  f"peak RSS {res['rss'] / 2**30:6.2f} GiB  cpu {res['cpu']:7.1f} s", flush=True)

    print(f"load average after the runs: {os.getloadavg()[0]:.2f} (1 min)")
    if code_digest() != digest:
        print(f"WARNING: mergekit_multimodal sources changed during the runs ({digest} -> {code_digest()})")
    med = {m: {k: statistics.median(x[k] for x in runs[m]) for k in runs[m][0]} for m in ORDER}
    print(f"\n| method | wall s (median of {args.repeats}) | peak RSS GiB | CPU s (user+sys) | output MiB |")
    print("|---|---:|---:|---:|---:|")
    for m in ORDER:
        d = med[m]
        print(f"| {m} | {d['wall']:.2f} | {d['rss'] / 2**30:.2f} | {d['cpu']:.1f} | {d['out'] / 2**20:.0f} |")
    print("\n| ratio | measured | goal | met |\n|---|---:|---:|---|")
    for label, ours, theirs, key, goal in GOALS:
        ratio = med[ours][key] / med[theirs][key]
        met = "-" if goal is None else ("yes" if ratio <= goal else "NO")
        print(f"| {label} | {ratio:.3f}x | {'-' if goal is None else f'<= {goal}x'} | {met} |")


if __name__ == "__main__":
    main()
