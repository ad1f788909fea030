"""W4A{2,4,8,16} linear layers vs torch bf16 matmul at OpenVLA-7B language-model shapes.

For each layer shape of the Llama-2-7B backbone (hidden 4096, MLP 11008) and
M in {1, 16, 280} tokens, times every activation bit-width of ``QuantLinear`` and a
bf16 ``torch.matmul`` on the same device, in the same run, and prints the ratio
(bf16 time / ours: > 1 means faster than bf16), achieved weight GB/s at M = 1 and
TOP/s at M = 280. On CUDA the Triton backend runs; on the CPU the reference backend
(Triton's interpreter is far too slow for these shapes).

    python bench/kernels.py                 # all shapes
    python bench/kernels.py --quick         # small shapes, seconds (CI keeps it alive)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from dyqvla_ros.quant import QuantLinear

# (name, in_features K, out_features N) of one Llama-2-7B decoder layer.
LLAMA7B_LINEARS = [
    ("q/k/v/o_proj", 4096, 4096),
    ("gate/up_proj", 4096, 11008),
    ("down_proj", 11008, 4096),
]
QUICK_LINEARS = [("quick", 256, 384)]
BITS = (16, 8, 4, 2)


def sync(device: torch.device) -> None:
    """Wait for the device, so wall-clock timings include the work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA-synchronised), after one warm-up call."""
    fn()
    sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def run(linears: list[tuple[str, int, int]], ms: list[int], device: torch.device, reps: int) -> list[dict]:
    rows = []
    for name, k, n in linears:
        dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        backend = "triton" if device.type == "cuda" else "reference"
        layer = QuantLinear.from_linear(dense, 128, backend=backend)
        weight_bytes = layer.qweight.numel() + layer.scales.numel() * 2
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                base = time_ms(partial(dense, x), device, reps)
                for bits in BITS:
                    layer.precision.set(bits)
                    ours = time_ms(partial(layer, x), device, reps)
                    rows.append(
                        {
                            "layer": name,
                            "K": k,
                            "N": n,
                            "M": m,
                            "bits": bits,
                            "ms": ours,
                            "bf16_ms": base,
                            "speedup_vs_bf16": base / ours,
                            "weight_GBps": weight_bytes / (ours * 1e-3) / 1e9,
                            "TOPps": 2 * m * k * n / (ours * 1e-3) / 1e12,
                        }
                    )
    return rows


def print_table(rows: list[dict], device: str) -> None:
    print(f"device: {device}; ratio = bf16 matmul time / W4A<bits> time (same run)")
    print(f"{'layer':<14}{'M':>5}{'bits':>6}{'ms':>10}{'bf16 ms':>10}{'ratio':>8}{'GB/s':>9}{'TOP/s':>8}")
    for r in rows:
        print(
            f"{r['layer']:<14}{r['M']:>5}{r['bits']:>6}{r['ms']:>10.3f}{r['bf16_ms']:>10.3f}"
            f"{r['speedup_vs_bf16']:>8.2f}{r['weight_GBps']:>9.1f}{r['TOPps']:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    linears = QUICK_LINEARS if args.quick else LLAMA7B_LINEARS
    ms = [1, 16, 40] if args.quick else [1, 16, 280]
    reps = args.reps or (50 if device.type == "cuda" else 3)
    rows = run(linears, ms, device, reps)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    print_table(rows, f"{name}, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
