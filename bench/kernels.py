"""W4A{2,4,8,16} linear layers vs torch bf16 matmul at OpenVLA-7B language-model shapes.

For each layer shape of the Llama-2-7B backbone (hidden 4096, MLP 11008) and
M in {1, 16, 280} tokens, times every activation bit-width of ``QuantLinear`` and a
bf16 ``nn.Linear`` on the same device, in the same run (in ``ROUNDS`` alternating
rounds, each time the median of its rounds, so machine drift hits all alike), and prints
the ratio
(bf16 time / ours: > 1 means faster than bf16), achieved weight GB/s at M = 1 and
TOP/s at M = 280. On CUDA the Triton backend runs; on the CPU the reference, the
``cpu`` backend (torch built-ins, portable layout) and ``cpu_int4`` (torch's int4 GEMM
on the runtime layout, ``quant.to_cpu_runtime``), side by side (Triton's interpreter is
far too slow for these shapes). ``--dtype float32`` feeds the layers fp32 activations
(the CPU model's dtype today; the baseline stays bf16). ``--routes`` (CPU) also times
both paths of ``cpu_int4`` at each M -- the int4 GEMM ("int4 mm") and dequantize + dense
matmul ("int4 deq": bf16 on CPUs with AMX, fp32 without; the header names the CPU's
features, ``w4a_cpu.cpu_features``) -- from which ``w4a_cpu.DEQUANT_MIN_ROWS`` is chosen.

``--schemes`` times the [H] outlier schemes instead: one ``QuantLinear`` forward per
rotation (none / hadamard) x activation scales (token / group) at M in {1, 280} (or
``--m``) and every bit-width, on the default path -- backend auto after
``to_cpu_runtime`` (cpu_int4) on the CPU, triton on CUDA -- and the ratio of each to the
plain path (none/token). The four are timed in alternating rounds (``ROUNDS``, order
reversed every other round) and each time is the median of its rounds, so machine
drift hits all of them alike.

``--inductor`` (CPU, [L]) times, side by side at M = 280 (or ``--m``), the cpu_int4
layer as it runs (16 bits: the int4 GEMM, or from ``DEQUANT_MIN_ROWS`` rows on
dequantize + dense matmul), torch's int4 GEMM op alone, the same op compiled by inductor
with ``max-autotune`` and frozen weights (where inductor has its AMX / AVX512 WoQ-int4
GEMM template, it autotunes it against the op), and the dense bf16 ``nn.Linear``: the
fused-kernel figure behind [L]'s M = 280 target. The compiled variant is measured
here only; the node does not use it (it needs every layer's weights as compile-time
constants).

``--sweep`` (CUDA; under ``--quick`` also in the interpreter) times the bare ``w4a_gemm``
kernel with other launch configurations (tiles, split-K, warps) beside the default
``launch_config``, so the decode and prefill tilings can be chosen from measurements.

On CUDA every time is the median of ``triton.testing.do_bench`` (CUDA events; the L2 is
flushed before each call, so weights come from HBM as they do in a model's forward).

    python bench/kernels.py                 # all shapes
    python bench/kernels.py --sweep         # + launch-configuration sweep (CUDA)
    python bench/kernels.py --quick         # small shapes, seconds (CI keeps it alive)
    python bench/kernels.py --m 1 280 --backends cpu_int4 --reps 5   # a short CPU run
    python bench/kernels.py --schemes       # [H] rotation / activation-scale overheads
    python bench/kernels.py --schemes --quick   # the same on the small shape (seconds)
    python bench/kernels.py --inductor      # [L] int4 GEMM: eager vs inductor's template vs dense
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import torch
from torch import nn

from dyqvla_ros.kernels.w4a_cpu import cpu_features, w4a_gemm_int4pack
from dyqvla_ros.kernels.w4a_gemm import LaunchConfig, launch_config, w4a_gemm
from dyqvla_ros.quant import QuantLinear, to_cpu_runtime, weight_bytes

# (name, in_features K, out_features N) of one Llama-2-7B decoder layer.
LLAMA7B_LINEARS = [
    ("q/k/v/o_proj", 4096, 4096),
    ("gate/up_proj", 4096, 11008),
    ("down_proj", 11008, 4096),
]
QUICK_LINEARS = [("quick", 256, 384)]
BITS = (16, 8, 4, 2)
GROUP = 128
CPU_BACKENDS = ("reference", "cpu", "cpu_int4")
# [H] (rotation, activation scales); the first is the plain path the others are compared to.
SCHEMES = (("none", "token"), ("hadamard", "token"), ("none", "group"), ("hadamard", "group"))
ROUNDS = 3  # alternating rounds of time_ms per timed variant (time_side_by_side)
BF16 = "dense bf16"  # the baseline's label among the variants timed side by side
# Alternatives to launch_config's defaults: (M, configurations tried at that M); the
# dequant_matmul variant is timed at 16 bits only.
SWEEP = [
    (
        1,
        [LaunchConfig(1, bn, sk, gemv=True) for bn in (64, 128, 256) for sk in (4, 8, 16)]
        + [LaunchConfig(16, bn, sk, unpack=u) for u in (0, 1, 2) for bn in (64, 128) for sk in (8, 16)],
    ),
    (
        280,
        [LaunchConfig(64, 64, dequant_matmul=True)]
        + [LaunchConfig(64, bn, 1, nw, unpack=u) for u in (0, 1, 2) for bn in (64, 128) for nw in (4, 8)],
    ),
]
QUICK_SWEEP = [
    (1, [LaunchConfig(16, 32, 2, unpack=1), LaunchConfig(16, 64, 2)]),
    (40, [LaunchConfig(32, 32, 1, 2, unpack=2), LaunchConfig(64, 64, dequant_matmul=True)]),
]


def sync(device: torch.device) -> None:
    """Wait for the device, so wall-clock timings include the work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median time of one call of ``fn`` in ms, after one warm-up call.

    CUDA: ``do_bench`` with ~``reps`` ms of repetitions (events, L2 flushed per call);
    CPU: wall clock over ``reps`` calls.
    """
    fn()
    sync(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(5, reps // 4), rep=reps, return_mode="median")
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def rates(ms: float, bf16_ms: float, layer: QuantLinear, m: int) -> dict:
    """A timing's ratio to bf16, weight GB/s and TOP/s for ``m`` rows through ``layer``."""
    return {
        "ms": ms,
        "speedup_vs_bf16": bf16_ms / ms,
        "weight_GBps": weight_bytes(layer)["total"] / (ms * 1e-3) / 1e9,
        "TOPps": 2 * m * layer.in_features * layer.out_features / (ms * 1e-3) / 1e12,
    }


def shape_row(name: str, k: int, n: int, m: int, **values: object) -> dict:
    """One result row: the layer, its shape and M first, then ``values``."""
    return {"layer": name, "K": k, "N": n, "M": m, **values}


def quant_layer(
    dense: nn.Linear, backend: str, rotation: str = "none", activation_scales: str = "token"
) -> QuantLinear:
    """``dense`` quantized for ``backend`` (cpu_int4, and auto on the CPU: in the runtime
    layout, as a CPU model is loaded)."""
    layer = QuantLinear.from_linear(
        dense, GROUP, backend=backend, rotation=rotation, activation_scales=activation_scales
    )
    cpu_runtime = backend == "cpu_int4" or (backend == "auto" and dense.weight.device.type == "cpu")
    return to_cpu_runtime(layer) if cpu_runtime else layer


def int4_route(layer: QuantLinear, x: torch.Tensor, dequantize: bool) -> torch.Tensor:
    """One forced path of the cpu_int4 GEMM (no bias: ``bench`` layers have none)."""
    return w4a_gemm_int4pack(x, layer.int4pack, layer.scale_zeros, layer.precision.bits, GROUP, dequantize)


def run(
    linears: list[tuple[str, int, int]],
    ms: list[int],
    device: torch.device,
    reps: int,
    backends: list[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    routes: bool = False,
) -> list[dict]:
    """Every bit-width of QuantLinear on each of ``backends`` beside a bf16 ``nn.Linear``.

    ``backends``: None for triton on CUDA, every CPU backend on the CPU; ``dtype``: the
    activations the quantized layers get (the baseline always runs bf16); ``routes``: also
    both forced paths of cpu_int4 (rows "int4 mm" and "int4 deq").
    """
    if backends is None:
        backends = ["triton"] if device.type == "cuda" else list(CPU_BACKENDS)
    rows = []
    for name, k, n in linears:
        dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        layers = {b: quant_layer(dense, b) for b in backends}
        timed: dict[str, tuple[QuantLinear, Callable]] = {b: (layer, layer) for b, layer in layers.items()}
        if routes:
            int4 = layers["cpu_int4"] if "cpu_int4" in layers else quant_layer(dense, "cpu_int4")
            for label, dequantize in (("int4 mm", False), ("int4 deq", True)):
                timed[label] = (int4, partial(int4_route, int4, dequantize=dequantize))
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            xq = x.to(dtype)
            with torch.no_grad():
                for bits in BITS:
                    for layer, _ in timed.values():
                        layer.precision.set(bits)
                    fns = {label: partial(fn, xq) for label, (_, fn) in timed.items()}
                    times = time_side_by_side({BF16: partial(dense, x)} | fns, device, reps)
                    base = times[BF16]
                    for backend, (layer, _) in timed.items():
                        timing = rates(times[backend], base, layer, m)
                        row = shape_row(name, k, n, m, bits=bits, backend=backend, bf16_ms=base)
                        rows.append(row | timing)
    return rows


def time_side_by_side(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, rounds: int = ROUNDS
) -> dict[str, float]:
    """``time_ms`` of each of ``fns`` in ``rounds`` alternating rounds (order reversed
    every other round); per label, the median of its rounds."""
    samples: dict[str, list[float]] = {label: [] for label in fns}
    order = list(fns)
    for i in range(rounds):
        for label in order if i % 2 == 0 else order[::-1]:
            samples[label].append(time_ms(fns[label], device, reps))
    return {label: statistics.median(times) for label, times in samples.items()}


def schemes(
    linears: list[tuple[str, int, int]],
    ms: list[int],
    device: torch.device,
    reps: int,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """One QuantLinear forward per [H] scheme and bit-width on the default path (auto:
    cpu_int4 on the CPU, triton on CUDA), timed side by side; ratio = time / plain time."""
    rows = []
    plain = "/".join(SCHEMES[0])
    for name, k, n in linears:
        dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        layers = {"/".join(s): quant_layer(dense, "auto", *s) for s in SCHEMES}
        del dense
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            backend = layers[plain].backend_for(x).value
            for bits in BITS:
                for layer in layers.values():
                    layer.precision.set(bits)  # one holder per layer: set each
                with torch.no_grad():
                    times = time_side_by_side(
                        {s: partial(layer, x) for s, layer in layers.items()}, device, reps
                    )
                for scheme, ms_ in times.items():
                    rows.append(
                        shape_row(
                            name,
                            k,
                            n,
                            m,
                            bits=bits,
                            backend=backend,
                            scheme=scheme,
                            ms=ms_,
                            ratio_vs_plain=ms_ / times[plain],
                        )
                    )
    return rows


def print_schemes(rows: list[dict], device: str) -> None:
    """One line per (layer, M, bits): each scheme's ms and its ratio to none/token."""
    print(
        f"[H] schemes on {device}: ms per QuantLinear forward (rotation/activation scales); "
        f"(x) = time / none/token time, timed side by side ({ROUNDS} alternating rounds)"
    )
    labels = ["/".join(s) for s in SCHEMES]
    head = f"{'layer':<14}{'M':>5}{'bits':>6}{'backend':>10}"
    print(head + "".join(f"{label:>22}" for label in labels))
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["layer"], r["M"], r["bits"], r["backend"]), {})[r["scheme"]] = r
    for (layer, m, bits, backend), by_scheme in cases.items():
        cells = "".join(
            f"{by_scheme[label]['ms']:>13.3f} ({by_scheme[label]['ratio_vs_plain']:>5.2f}x)"
            for label in labels
        )
        print(f"{layer:<14}{m:>5}{bits:>6}{backend:>10}{cells}")


class _FrozenInt4Mm(nn.Module):
    """torch's int4 GEMM op on one layer's runtime-layout weights, held as buffers, so
    that inductor's freezing turns them into constants (its WoQ template needs that)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.group_size = layer.group_size
        self.register_buffer("int4pack", layer.int4pack)
        self.register_buffer("scale_zeros", layer.scale_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4pack, self.group_size, self.scale_zeros)


def inductor(linears: list[tuple[str, int, int]], ms: list[int], reps: int) -> list[dict]:
    """[L]: cpu_int4 as it runs, the int4 op, the op compiled by inductor, dense bf16 (CPU,
    16-bit activations), side by side; ratio = dense time / time (> 1: faster than dense)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    # Probed once, before compiling: on torch 2.14.1 here the first probe made inside a
    # compilation found no vector ISA, and inductor then offered no template at all.
    isa = pick_vec_isa()
    cpu = torch.device("cpu")
    rows = []
    for name, k, n in linears:
        dense = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        layer = quant_layer(dense, "cpu_int4")
        op = _FrozenInt4Mm(layer).eval()
        # Caches off: a cached graph compiled while no template was offered would be reused.
        with inductor_config.patch(freezing=True, force_disable_caches=True), torch.no_grad():
            compiled = torch.compile(op, mode="max-autotune")
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                t0 = time.perf_counter()
                out = compiled(x)
                compile_s = time.perf_counter() - t0
                eager = op(x)
                error = ((out.float() - eager.float()).abs().max() / eager.float().abs().max()).item()
                times = time_side_by_side(
                    {
                        "cpu_int4 layer": partial(layer, x),
                        "int4 op": partial(op, x),
                        "int4 op, inductor": partial(compiled, x),
                        "dense bf16": partial(dense, x),
                    },
                    cpu,
                    reps,
                )
                rows += [
                    shape_row(
                        name,
                        k,
                        n,
                        m,
                        variant=variant,
                        ms=t,
                        speedup_vs_bf16=times["dense bf16"] / t,
                        compile_s=compile_s,
                        max_rel_diff_vs_op=error,
                        isa=str(isa),
                    )
                    for variant, t in times.items()
                ]
        torch._dynamo.reset()
    return rows


def print_inductor(rows: list[dict], device: str) -> None:
    print(f"[L] int4 GEMM at 16 bits on {device}: ms (dense bf16 time / time)")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"{'layer':<14}{'M':>5}" + "".join(f"{v:>24}" for v in variants) + f"{'compile s':>11}{'diff':>9}")
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["layer"], r["M"]), {})[r["variant"]] = r
    for (layer, m), by_variant in cases.items():
        cells = "".join(
            f"{by_variant[v]['ms']:>15.2f} ({by_variant[v]['speedup_vs_bf16']:>5.2f}x)" for v in variants
        )
        first = next(iter(by_variant.values()))
        print(f"{layer:<14}{m:>5}{cells}{first['compile_s']:>11.1f}{first['max_rel_diff_vs_op']:>9.1e}")


def sweep(
    linears: list[tuple[str, int, int]],
    plan: list[tuple[int, list[LaunchConfig]]],
    device: torch.device,
    reps: int,
    deadline: float = float("inf"),
) -> list[dict]:
    """The bare kernel at A16 and A8 under each configuration of ``plan`` and the default.

    Stops (rows so far, the last one saying so) once ``time.perf_counter()`` passes
    ``deadline``, so a time-boxed GPU run still returns what it measured.
    """
    rows = []
    for name, k, n in linears:
        dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        layer = QuantLinear.from_linear(dense, GROUP, backend="triton")
        for m, configs in plan:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                base = time_ms(partial(dense, x), device, reps)
                for bits in (16, 8):
                    default = launch_config(m, n, layer.scales.shape[0], device, bits)
                    tried = [c for c in configs if c != default and (bits == 16 or not c.dequant_matmul)]
                    for cfg in [default, *tried]:
                        if time.perf_counter() > deadline:
                            rows.append({"stopped": "time budget spent"})
                            return rows
                        kernel = partial(w4a_gemm, x, layer.qweight, layer.scales, bits, GROUP, cfg)
                        ms = time_ms(kernel, device, reps)
                        rows.append(
                            {
                                "layer": name,
                                "M": m,
                                "bits": bits,
                                "config": asdict(cfg),
                                "default": cfg == default,
                                **rates(ms, base, layer, m),
                            }
                        )
    return rows


def config_text(c: dict) -> str:
    """A LaunchConfig (as a dict) in the sweep table's notation."""
    if c["dequant_matmul"]:
        return "dequant+mm"
    if c["gemv"]:
        return f"gemv {c['block_n']}/{c['split_k']}"
    return f"{c['block_m']}x{c['block_n']}/{c['split_k']}/{c['num_warps']}/{c['num_stages']}/{c['unpack']}"


def print_sweep(rows: list[dict]) -> None:
    """One line per configuration; ``*`` marks the default, ``<`` the fastest of its case."""
    timed = [r for r in rows if "ms" in r]
    best: dict[tuple, float] = {}
    for r in timed:
        case = (r["layer"], r["M"], r["bits"])
        best[case] = min(best.get(case, float("inf")), r["ms"])
    print("launch sweep: bare w4a_gemm; config = BLOCK_M x BLOCK_N / split-K / warps / stages / unpack")
    print(
        "(or 'gemv BLOCK_N/split-K': the M = 1 kernel without tensor cores; "
        "'dequant+mm': bf16 weight, then torch.matmul)"
    )
    print(f"{'layer':<14}{'M':>5}{'bits':>6}  {'config':<20}{'ms':>9}{'ratio':>8}{'GB/s':>9}{'TOP/s':>8}")
    for r in timed:
        text = config_text(r["config"])
        mark = ("*" if r["default"] else " ") + (
            "<" if r["ms"] == best[(r["layer"], r["M"], r["bits"])] else " "
        )
        print(
            f"{r['layer']:<14}{r['M']:>5}{r['bits']:>6}{mark}{text:<20}{r['ms']:>9.4f}"
            f"{r['speedup_vs_bf16']:>8.2f}{r['weight_GBps']:>9.1f}{r['TOPps']:>8.2f}"
        )
    if len(timed) < len(rows):
        print("sweep stopped early: time budget spent")


def print_table(rows: list[dict], device: str) -> None:
    print(f"device: {device}; ratio = bf16 matmul time / W4A<bits> time (same run)")
    head = f"{'layer':<14}{'M':>5}{'bits':>6}{'backend':>10}{'ms':>10}{'bf16 ms':>10}"
    print(f"{head}{'ratio':>8}{'GB/s':>9}{'TOP/s':>8}")
    for r in rows:
        print(
            f"{r['layer']:<14}{r['M']:>5}{r['bits']:>6}{r['backend']:>10}{r['ms']:>10.3f}{r['bf16_ms']:>10.3f}"
            f"{r['speedup_vs_bf16']:>8.2f}{r['weight_GBps']:>9.1f}{r['TOPps']:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    parser.add_argument("--m", type=int, nargs="+", help="rows (tokens) to time (default 1 16 280)")
    parser.add_argument("--backends", nargs="+", choices=CPU_BACKENDS, help="CPU backends to time (all)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the quantized layers' input"
    )
    parser.add_argument("--routes", action="store_true", help="also both paths of cpu_int4 (CPU)")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    parser.add_argument(
        "--schemes",
        action="store_true",
        help="time the [H] rotation / activation-scale schemes (default path) instead of the bf16 table",
    )
    parser.add_argument(
        "--inductor",
        action="store_true",
        help="[L] (CPU): the int4 GEMM eager, compiled by inductor, and dense bf16, at M = 280",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions (CPU) or milliseconds of them (CUDA)"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    linears = QUICK_LINEARS if args.quick else LLAMA7B_LINEARS
    ms = args.m or ([1, 16, 40] if args.quick else [1, 16, 280])
    if (
        args.sweep
        and device.type != "cuda"
        and not (args.quick and os.environ.get("TRITON_INTERPRET") == "1")
    ):
        parser.error("--sweep runs Triton kernels: it needs CUDA (or --quick with TRITON_INTERPRET=1)")
    reps = args.reps or (100 if device.type == "cuda" else 3)
    if device.type == "cuda" and (args.backends or args.routes):
        parser.error("--backends and --routes choose among the CPU backends; CUDA runs triton")
    threads = torch.get_num_threads()
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({threads} threads, {cpu_features()})"
    )
    described = f"{name}, torch {torch.__version__}, {args.dtype} activations"
    if args.inductor:
        if device.type != "cpu" or args.schemes or args.sweep:
            parser.error("--inductor times the CPU int4 GEMM alone (no CUDA, --schemes or --sweep)")
        rows = inductor(linears, args.m or [280], reps)
        print_inductor(rows, described)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "torch": torch.__version__, "inductor": rows}, f, indent=1)
        return
    if args.schemes:
        if args.backends or args.routes or args.sweep:
            parser.error("--schemes times the default path alone: no --backends, --routes or --sweep")
        rows = schemes(linears, args.m or [1, 280], device, reps, getattr(torch, args.dtype))
        print_schemes(rows, described)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"device": name, "torch": torch.__version__, "dtype": args.dtype, "schemes": rows},
                    f,
                    indent=1,
                )
        return
    rows = run(linears, ms, device, reps, args.backends, getattr(torch, args.dtype), args.routes)
    print_table(rows, described)
    swept = sweep(linears, QUICK_SWEEP if args.quick else SWEEP, device, reps) if args.sweep else []
    if swept:
        print_sweep(swept)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "dtype": args.dtype,
                    "rows": rows,
                    "sweep": swept,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
