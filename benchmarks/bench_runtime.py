"""Loader benchmark: a 4-route MMER composite against the plain transformers model of the same LLM.

What it measures
    In ONE process, on the SAME inputs: prefill tokens/s, decode tokens/s and memory of
    (a) the composite's merged LLM loaded as a plain `AutoModelForCausalLM` (the reference), and
    (b) `CompositeModel` over the same directory: every linear layer routed, tau_* and 4 packed
        masks resident, per-token route map set as a multimodal prompt would set it.
    The LLM is what is compared; encoders are the sources' own and cost the same either way.
    The prompt holds 4 modality spans (one per route) inside text; decode steps take the text
    route (as generated tokens do). Runs alternate plain / composite for --repeats rounds and the
    table shows medians, so drift and other load hit both alike.
    Memory: resident bytes of parameters + buffers (exact; what stays on the device) plus the
    route cache's kept weights, and on CUDA also the peak during prefill (resident bytes + what
    the prefill allocates on top; other models of the process are not counted). Goals (issue 3): decode >= 0.95x, prefill >= 0.67x,
    memory <= 2.2x the plain model's weights.

Inputs come from bench_merge.py's generator (random Llama base + 4 perturbed sources; `ref` is the
271M-parameter model); the composite is composed once with `mmer` defaults and cached under --work.

    python benchmarks/bench_runtime.py --size tiny --repeats 1           # smoke check
    python benchmarks/bench_runtime.py --size ref --device cuda --dtype bfloat16 --route-cache 0 auto
    python benchmarks/bench_runtime.py --size ref --route-cache 0 all     # CPU: lean and every route kept
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import N_SOURCES, describe, generate, write_configs  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compose_once(root: Path) -> Path:
    out = root / "composite-mmer"
    if (out / "composite_config.json").exists():
        return out
    import yaml

    from mergekit_multimodal import compose

    write_configs(root)
    cfg = yaml.safe_load((root / "mmer.yml").read_text())
    cfg["parameters"] = {}  # mmer defaults, as users get them
    compose(cfg, str(out))
    return out


def resident_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run(llm, state, embeds, route_ids, new_tokens: int, device: str) -> dict:
    """Prefill once (timed), then `new_tokens` cached decode steps (timed) with greedy tokens."""
    if state is not None:
        state.set_tokens(route_ids)
    if device.startswith("cuda"):  # other models of this process stay resident: count only what this forward adds
        sync(device)
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)  # as generate() prefills
    sync(device)
    prefill = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - resident if device.startswith("cuda") else None
    past, tok = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = llm(input_ids=tok, cache=past, use_cache=True)
        past, tok = out.cache, out.logits[:, -1:].argmax(-1)
    sync(device)
    decode = time.perf_counter() - t0
    if state is not None:
        state.set_tokens(None)
    return {"prefill": prefill, "decode": decode, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "small", "ref", "wide"), default="small")
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompt", type=int, default=1280, help="prompt length (tokens)")
    ap.add_argument("--span", type=int, default=256, help="tokens per modality span (4 spans; LLaVA-1.5 images are 576)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--route-cache", nargs="+", default=["0"], metavar="SIZE",
                    help="composite settings to measure, each against the same plain model: 0 (lean, the CPU "
                         "default), all (every route's weights resident, +1x the routed weights per route), "
                         "auto (the CUDA default), or a size such as 2GiB")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="also profile one prefill of the first composite setting and write torch.profiler's top ops to FILE")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    if args.prompt < N_SOURCES * (args.span + 1):
        sys.exit("--prompt must leave text between the modality spans")

    import transformers

    from mergekit_multimodal.runtime import CompositeModel

    transformers.utils.logging.disable_progress_bar()
    root = Path(args.work) / args.size
    n_params = generate(root, args.size)
    path = compose_once(root)
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    comps = {f"composite, cache {c}": CompositeModel.from_pretrained(str(path), torch_dtype=dtype, device=args.device,
                                                                      modalities=[], route_cache=c)
             for c in args.route_cache}

    g = torch.Generator().manual_seed(0)
    hidden = plain.config.hidden_size
    embeds = (0.02 * torch.randn(1, args.prompt, hidden, generator=g)).to(args.device, dtype)
    route_ids = torch.zeros(1, args.prompt, dtype=torch.long)
    gap = (args.prompt - N_SOURCES * args.span) // (N_SOURCES + 1)
    for r in range(N_SOURCES):  # text, span 1, text, span 2, ... text
        start = gap + r * (args.span + gap)
        route_ids[0, start:start + args.span] = r + 1
    route_ids = route_ids.to(args.device)

    runs = {"plain": [], **{k: [] for k in comps}}
    run(plain, None, embeds, route_ids, 2, args.device)  # warm-up all (and fill the route caches)
    for comp in comps.values():
        run(comp.llm, comp.state, embeds, route_ids, 2, args.device)
    for _ in range(args.repeats):
        runs["plain"].append(run(plain, None, embeds, route_ids, args.new_tokens, args.device))
        for k, comp in comps.items():
            runs[k].append(run(comp.llm, comp.state, embeds, route_ids, args.new_tokens, args.device))
        gc.collect()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        comp = next(iter(comps.values()))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            run(comp.llm, comp.state, embeds, route_ids, 0, args.device)
        key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        Path(args.profile).write_text(f"one prefill of {next(iter(comps))}, sorted by {key}\n"
                                      + prof.key_averages().table(sort_by=key, row_limit=25)
                                      + "\n\nsorted by cpu_time_total\n"
                                      + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("prefill", "decode")} for k, v in runs.items()}
    tps = {k: {"prefill": args.prompt / v["prefill"], "decode": args.new_tokens / v["decode"]} for k, v in med.items()}
    mem = {"plain": resident_bytes(plain),
           **{k: resident_bytes(c) + c.state.cache.resident_bytes() for k, c in comps.items()}}
    print(describe())
    print(f"model: {args.size} ({n_params / 1e6:.0f}M params), {dtype}, device {args.device}, "
          f"threads {torch.get_num_threads()}; prompt {args.prompt} tokens ({N_SOURCES} spans of {args.span}), "
          f"{args.new_tokens} decode steps, median of {args.repeats}")
    width = max(map(len, runs)) + 2
    print(f"{'':{width}}{'prefill tok/s':>15}{'decode tok/s':>15}{'resident MiB':>15}")
    for k in runs:
        print(f"{k:{width}}{tps[k]['prefill']:>15.1f}{tps[k]['decode']:>15.2f}{mem[k] / 2**20:>15.1f}")
    for k in comps:
        rows = [("prefill", tps[k]["prefill"] / tps["plain"]["prefill"], ">=", 0.67),
                ("decode", tps[k]["decode"] / tps["plain"]["decode"], ">=", 0.95),
                ("memory (resident)", mem[k] / mem["plain"], "<=", 2.2)]
        if args.device.startswith("cuda"):  # the model's resident bytes + what its prefill allocates on top
            peak = {j: mem[j] + statistics.median(r["peak"] for r in runs[j]) for j in ("plain", k)}
            rows.append(("peak CUDA memory (prefill)", peak[k] / peak["plain"], "<=", 2.2))
        per_round = [p["prefill"] / c["prefill"] for p, c in zip(runs["plain"], runs[k])]
        print(f"\n{k} / plain; prefill ratio per round (paired, same inputs back to back): "
              + ", ".join(f"{r:.3f}x" for r in per_round))
        for label, ratio, op, goal in rows:
            ok = ratio >= goal if op == ">=" else ratio <= goal
            print(f"  {label:44} {ratio:6.3f}x  (goal {op} {goal}x: {'met' if ok else 'MISSED'})")
        if args.route_cache != ["0"]:
            print(f"  routes kept: {len(comps[k].state.cache.keep)} of {N_SOURCES} "
                  f"(budget {comps[k].state.cache.budget / 2**20:.0f} MiB, one route {comps[k].state.cache.route_bytes / 2**20:.0f} MiB)")

if __name__ == "__main__":
    main()
