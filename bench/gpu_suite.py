"""The GPU benchmark suite for OpenVLA-7B shapes: one command, one JSON, one table.

    python bench/gpu_suite.py [--steps 50] [--json gpu_suite.json]   # CUDA, < 8 min on an H200
    python bench/gpu_suite.py --quick                                 # tiny shapes on the CPU (CI)

No network, no weights, no ROS: random weights with the real OpenVLA-7B shapes.

1. correctness: every Triton kernel against its PyTorch reference (all bit-widths, per-token
   and per-group activation scales), and graph-replayed decode against eager decode (same
   tokens);
2. kernels at the language model's shapes, M in {1, 16, 280}: each bit-width vs torch
   bf16, achieved weight GB/s (M = 1) and TOP/s (M = 280), beside the device's measured
   copy bandwidth;
3. the control step (prefill + 7-token decode): HF-eager BF16 (unquantized, dynamic
   cache) as the baseline; BF16 with static cache + CUDA graphs; static W4A16/A8/A4/A2;
   dynamic, following the bit trace the kinematic monitor produces on the synthetic
   pick-and-place episode; each eager and with CUDA graphs; p50/p99 ms over --steps
   steps after warm-up, speed-ups against the baseline measured in this run, and peak
   GPU memory per mode;
4. the cost of the [H] schemes (Hadamard rotation, per-group activation scales) per layer
   at M in {1, 280}, against the plain path in the same run (``bench/kernels.py --schemes``);
5. a launch-configuration sweep of the bare kernel (``bench/kernels.py --sweep``), while
   the time budget lasts.

A lent GPU comes with minutes, not hours: every section runs even if an earlier one
failed (its traceback goes into the JSON under "errors"), the JSON is rewritten after
each section, and modes / sweep cases past ``--budget-s`` are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

QUICK = "--quick" in sys.argv
if QUICK and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is launched

from dyqvla_ros.bags.synthetic import write_episodes  # noqa: E402
from dyqvla_ros.dispatcher import Dispatcher  # noqa: E402
from dyqvla_ros.kernels.int4 import pack_int4, quantize_activations  # noqa: E402
from dyqvla_ros.kernels.w4a_gemm import LaunchConfig, w4a_gemm, w4a_gemm_reference  # noqa: E402
from dyqvla_ros.kinematics import KinematicMonitor  # noqa: E402
from dyqvla_ros.model import VLAPolicy, load_openvla  # noqa: E402
from dyqvla_ros.model.tiny import ensure_tiny_openvla  # noqa: E402
from dyqvla_ros.precision import PrecisionController  # noqa: E402
from dyqvla_ros.profiling import control_steps, read_episodes  # noqa: E402
from dyqvla_ros.quant import quantize_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import model_step  # noqa: E402

import kernels as kernel_bench  # noqa: E402

BITS = (16, 8, 4, 2)
INSTRUCTION = "put the red cube on the blue target"


def kernel_correctness(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each bit-width with the default launch, and every unpack variant / the dequant path
    on one shape, against the reference; plus the reference's quantizer on this device
    against the CPU's (its integers must not depend on where it runs)."""
    shapes = [(1, 256, 384, 128), (5, 200, 96, 64), (40, 384, 256, 64)]
    if device.type == "cuda":
        shapes = [(1, 4096, 4096, 128), (16, 4096, 11008, 128), (280, 11008, 4096, 128), (3, 4000, 4000, 64)]
    variants = [
        LaunchConfig(16, 64, 4, unpack=1),
        LaunchConfig(64, 64, unpack=2),
        LaunchConfig(64, 64, unpack=0),
        LaunchConfig(1, 128, 8, gemv=True),
    ]
    rows, g = [], torch.Generator().manual_seed(0)
    for i, (m, k, n, group) in enumerate(shapes):
        k_pad = -(-k // group) * group
        q = torch.randint(-8, 8, (k_pad, n), generator=g, dtype=torch.int8)
        q[k:] = 0
        qweight = pack_int4(q).to(device)
        scales = (torch.rand(k_pad // group, n, generator=g) * 0.02 + 1e-3).half().to(device)
        x = (torch.randn(m, k, generator=g) * (1 + 20 * (torch.rand(k, generator=g) > 0.99))).to(
            device, dtype
        )
        for bits in BITS:
            tol = 1e-2 if bits == 16 and dtype != torch.float32 else 1e-4
            configs = [None] + (variants if i == 1 else [])
            if i == 2 and bits == 16:
                configs.append(LaunchConfig(64, 64))  # the fused kernel the dequant path replaces
            for scales_per in ("token", "group") if bits < 16 else ("token",):
                ref = w4a_gemm_reference(x, qweight, scales, bits, group, scales_per)
                for config in configs:
                    ours = w4a_gemm(x, qweight, scales, bits, group, config, scales_per)
                    err = ((ours - ref).abs().max() / ref.abs().max()).item()
                    name = "default" if config is None else str(config)
                    rows.append(
                        {
                            "M": m,
                            "K": k,
                            "N": n,
                            "group": group,
                            "bits": bits,
                            "config": name if scales_per == "token" else f"{name}, group scales",
                            "rel_err": err,
                            "ok": err <= tol,
                        }
                    )
        if i == 2:
            for bits in BITS[1:]:
                on_device = quantize_activations(x, bits)
                on_cpu = quantize_activations(x.cpu(), bits)
                same = all(torch.equal(a.cpu(), b) for a, b in zip(on_device, on_cpu, strict=True))
                check = {"config": "quantizer vs CPU", "rel_err": 0.0 if same else float("nan"), "ok": same}
                rows.append({"M": m, "K": k, "N": n, "group": group, "bits": bits, **check})
    return rows


def bit_trace(rate_hz: float = 5.0) -> list[int]:
    """b*_t of the kinematic monitor + dispatcher over the synthetic episode (no model)."""
    with tempfile.TemporaryDirectory() as tmp:
        bag = write_episodes(Path(tmp) / "episode", episodes=1, seed=0)
        (episode,) = read_episodes(bag, "/image", "/ee_pose", "/instruction", None)
        controller = PrecisionController(KinematicMonitor(), Dispatcher())
        return [controller.decide(step.motion).bits for step in control_steps(episode, rate_hz)]


def time_steps(
    policy: VLAPolicy, frames: list[np.ndarray], bits_per_step: list[int], device
) -> list[tuple[float, float]]:
    """(prefill ms, decode ms) of each step, the device synchronised around each part."""
    times = []
    for i, bits in enumerate(bits_per_step):
        kernel_bench.sync(device)
        start = time.perf_counter()
        state = policy.prefill(frames[i % len(frames)], INSTRUCTION)
        kernel_bench.sync(device)
        middle = time.perf_counter()
        policy.decode(state, bits)
        kernel_bench.sync(device)
        times.append(((middle - start) * 1e3, (time.perf_counter() - middle) * 1e3))
    return times


def run_mode(name: str, policy: VLAPolicy, graphs: bool, trace: list[int], steps: int, device) -> dict:
    """Time ``steps`` control steps at the bit-widths of ``trace`` (graphs only for those)."""
    frames = [np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8) for i in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    status = policy.enable_cuda_graphs(tuple(sorted(set(trace))), max_cache_len=512) if graphs else False
    warm = 3
    bits = [trace[i % len(trace)] for i in range(warm + steps)]
    parts = time_steps(policy, frames, bits, device)[warm:]
    times = [prefill + decode for prefill, decode in parts]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "mode": name,
        "graphs": status,
        "graph_status": policy.graph_status,
        "p50_ms": statistics.median(times),
        "p99_ms": float(np.percentile(times, 99)),
        "prefill_p50_ms": statistics.median(p for p, _ in parts),
        "decode_p50_ms": statistics.median(d for _, d in parts),
        "mean_bits": float(np.mean(bits[warm:])),
        "peak_gib": peak,
    }


def graphs_match_eager(policy_graphs: VLAPolicy, policy_eager: VLAPolicy) -> dict[int, bool]:
    frame = np.random.default_rng(9).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    a, b = policy_graphs.prefill(frame, INSTRUCTION), policy_eager.prefill(frame, INSTRUCTION)
    return {
        bits: bool(np.array_equal(policy_graphs.decode(a, bits).tokens, policy_eager.decode(b, bits).tokens))
        for bits in BITS
    }


def end_to_end(device: torch.device, steps: int, deadline: float) -> dict:
    """Control-step rows per mode, the graph-vs-eager token check and the trace's bit shares."""
    trace = bit_trace()
    if device.type == "cuda":
        loaded = model_step.random_7b(device, quantize=False)
    else:
        loaded = load_openvla(ensure_tiny_openvla())
    rows: list[dict] = []

    def mode(name: str, graphs: bool, bits: list[int]) -> None:
        """One mode's row; past the deadline a row that says it was skipped."""
        if time.perf_counter() > deadline:
            rows.append({"mode": name, "graphs": graphs, "skipped": "time budget spent"})
        else:
            rows.append(
                run_mode(name, VLAPolicy(loaded, restrict_to_actions=True), graphs, bits, steps, device)
            )
        print(
            f"[{time.strftime('%H:%M:%S')}] control step: {name} ({'graphs' if graphs else 'eager'})",
            flush=True,
        )

    mode("HF-eager BF16", False, [16])
    mode("BF16 + static cache + graphs", True, [16])
    quantize_model(loaded.model, 128 if device.type == "cuda" else 32, include=["language_model.*"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    checks = {}
    for graphs in (False, True):
        for bits in BITS:
            mode(f"W4A{bits}", graphs, [bits])
        mode("dynamic (trace)", graphs, trace)
    graphed = VLAPolicy(loaded, restrict_to_actions=True)
    if graphed.enable_cuda_graphs(max_cache_len=512):
        checks = graphs_match_eager(graphed, VLAPolicy(loaded, restrict_to_actions=True))
    base = rows[0].get("p50_ms")
    for row in rows:
        if base and "p50_ms" in row:
            row["speedup_vs_hf_eager"] = base / row["p50_ms"]
    return {
        "control_step": rows,
        "graph_tokens_match_eager": checks,
        "trace_share": {b: trace.count(b) / len(trace) for b in BITS},
    }


def copy_bandwidth_gbps(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    kernel_bench.sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    kernel_bench.sync(device)
    return 2 * 10 * src.numel() / (time.perf_counter() - start) / 1e9  # read + write


class Report:
    """The suite's JSON, rewritten after every section so a run cut short keeps its numbers."""

    def __init__(self, path: str, info: dict) -> None:
        self.path = Path(path)
        self.data: dict = {**info, "errors": {}}
        self.started = time.perf_counter()

    def section(self, name: str, run: Callable[[], object]) -> object:
        """``run()`` stored under ``name``; a failure is stored under "errors" instead."""
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            value = run()
        except Exception:
            value = None
            self.data["errors"][name] = traceback.format_exc()
            print(self.data["errors"][name], flush=True)
        self.data[name] = value
        self.data["seconds"] = time.perf_counter() - self.started
        self.path.write_text(json.dumps(self.data, indent=1))
        return value


def print_summary(data: dict) -> None:
    """The table of a (possibly partial) run: what each section measured, or why not."""
    print(f"{data['device']}  torch {data['torch']}  triton {data['triton']}  {data['date']}")
    correctness = data.get("correctness") or []
    bad = [r for r in correctness if not r["ok"]]
    print(f"kernel vs reference: {len(correctness) - len(bad)}/{len(correctness)} within tolerance")
    for r in bad:
        print(
            f"  MISMATCH M={r['M']} K={r['K']} N={r['N']} bits={r['bits']} {r['config']}: {r['rel_err']:.2e}"
        )
    print(f"device copy bandwidth: {data.get('copy_bandwidth_GBps') or float('nan'):.0f} GB/s")
    if data.get("kernels"):
        kernel_bench.print_table(data["kernels"], data["device"])
    if data.get("schemes"):
        kernel_bench.print_schemes(data["schemes"], data["device"])
    if data.get("sweep"):
        kernel_bench.print_sweep(data["sweep"])
    if data.get("end_to_end"):
        extra = data["end_to_end"]
        matches = extra["graph_tokens_match_eager"] or "n/a (no CUDA graphs here)"
        print(f"graph decode tokens == eager: {matches}")
        head = f"{'control step mode':<30}{'graphs':>7}{'p50 ms':>9}{'p99 ms':>9}{'speed-up':>10}"
        print(f"{head}{'peak GiB':>10}{'prefill':>9}{'decode':>8}")
        for r in extra["control_step"]:
            if "skipped" in r:
                print(f"{r['mode']:<30}{'yes' if r['graphs'] else 'no':>7}  skipped: {r['skipped']}")
                continue
            print(
                f"{r['mode']:<30}{'yes' if r['graphs'] else 'no':>7}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                f"{r.get('speedup_vs_hf_eager', float('nan')):>10.2f}{r['peak_gib']:>10.2f}"
                f"{r['prefill_p50_ms']:>9.2f}{r['decode_p50_ms']:>8.2f}"
            )
        print(f"bit trace share: {extra['trace_share']}")
    for name in data["errors"]:
        print(f"section {name} FAILED (traceback in the JSON)")
    print(f"total {data['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed control steps per mode")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start no control-step mode or sweep case after this"
    )
    parser.add_argument("--json", default="gpu_suite.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("no CUDA device: run with --quick (tiny shapes on the CPU)")
    steps = args.steps or (50 if device.type == "cuda" else 3)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = Report(
        args.json,
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    )
    deadline = report.started + args.budget_s
    linears = kernel_bench.QUICK_LINEARS if args.quick else kernel_bench.LLAMA7B_LINEARS
    reps = 3 if args.quick else 100  # calls on the CPU, milliseconds of calls on CUDA
    report.section("correctness", lambda: kernel_correctness(device, dtype))
    report.section("copy_bandwidth_GBps", lambda: copy_bandwidth_gbps(device))
    report.section(
        "kernels",
        lambda: kernel_bench.run(linears, [1, 16, 40] if args.quick else [1, 16, 280], device, reps),
    )
    report.section("end_to_end", lambda: end_to_end(device, steps, deadline))
    report.section(
        "schemes",
        lambda: kernel_bench.schemes(linears, [1, 40] if args.quick else [1, 280], device, reps),
    )
    plan = kernel_bench.QUICK_SWEEP if args.quick else kernel_bench.SWEEP
    sweep_reps = 3 if args.quick else 50
    report.section("sweep", lambda: kernel_bench.sweep(linears, plan, device, sweep_reps, deadline))
    print_summary(report.data)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
