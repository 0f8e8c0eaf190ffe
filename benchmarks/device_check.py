"""Compose the same tiny-family sources on CPU and with `--cuda`, compare the outputs, print both times.

Usage: python benchmarks/device_check.py [--hidden 256 --layers 8]
The merge arithmetic runs on `MergeOptions.device`; reading and writing stay on CPU. The two
composites must agree (elementwise max/sign/compare ops; sums may differ in the last bit).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from mergekit.options import MergeOptions
from safetensors import safe_open

from mergekit_multimodal import compose
from mergekit_multimodal.testing import build_tiny_family

MODALITY = {"llava": "image", "video_llava": "video", "qwen2_audio": "audio"}


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fam = build_tiny_family(root / "fam", tuple(MODALITY), hidden_size=args.hidden, num_layers=args.layers)
        cfg = {"merge_method": "mmer", "base_model": str(fam.base),
               "models": [{"model": str(fam.sources[k]), "modality": m} for k, m in MODALITY.items()]}
        times = {}
        for dev in ("cpu", device):
            t0 = time.perf_counter()
            compose(cfg, str(root / dev), MergeOptions(device=dev, quiet=True), overwrite=True)
            times[dev] = time.perf_counter() - t0
        a, b = tensors(root / "cpu"), tensors(root / device)
        a.update({"routes/" + k: v for k, v in tensors(root / "cpu" / "routes").items()})
        b.update({"routes/" + k: v for k, v in tensors(root / device / "routes").items()})
        assert set(a) == set(b)
        worst = max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), (b[k] for k in a)))
        same = sum(torch.equal(a[k], b[k]) for k in a)
        print(f"device={device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'})")
        print(f"tensors: {len(a)}, bit-identical: {same}, max abs diff: {worst:.3g}")
        print(f"compose time: cpu {times['cpu']:.2f}s, {device} {times[device]:.2f}s")


if __name__ == "__main__":
    main()
