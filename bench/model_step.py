"""Per-step prefill and decode time, and weight bytes, at each activation bit-width.

CPU (default): the tiny OpenVLA (built on first use) through ``VLAPolicy``, the same
path the node runs. ``--shape 7b`` (CUDA only): the real OpenVLA-7B shapes with random
weights (no download), quantized to W4 with the Triton backend.

    python bench/model_step.py [--steps 20] [--shape tiny|7b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dyqvla_ros.model import VLAPolicy, load_openvla
from dyqvla_ros.model.config import OpenVLAConfig
from dyqvla_ros.model.loader import LoadedOpenVLA, build_model, load_quantized_openvla, rebuild_rotary
from dyqvla_ros.model.tiny import build_tokenizer, ensure_tiny_openvla
from dyqvla_ros.quant import quantize_model, weight_bytes
from kernels import sync  # bench/kernels.py, beside this script

FIXTURE_7B = Path(__file__).resolve().parents[1] / "test" / "fixtures" / "openvla7b_config.json"
BITS = (16, 8, 4, 2)


def random_7b(device: torch.device, quantize: bool = True) -> LoadedOpenVLA:
    """OpenVLA-7B shapes, random bf16 weights on ``device`` (W4 language model if ``quantize``)."""
    config = OpenVLAConfig.from_dict(json.loads(FIXTURE_7B.read_text()))
    model = build_model(config, device="meta").to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    rebuild_rotary(model, device)
    if quantize:
        quantize_model(model, 128, include=["language_model.*"], backend="triton")
    stats = {"random": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}}}
    return LoadedOpenVLA(model.eval(), build_tokenizer(), config, stats, FIXTURE_7B)


def measure(loaded: LoadedOpenVLA, steps: int, device: torch.device) -> list[dict]:
    policy = VLAPolicy(loaded, restrict_to_actions=True)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(4)]
    rows = []
    for bits in BITS:
        prefill_ms, decode_ms = [], []
        for i in range(steps + 2):  # two warm-up steps
            sync(device)
            t0 = time.perf_counter()
            state = policy.prefill(frames[i % 4], "put the red cube on the blue target")
            sync(device)
            t1 = time.perf_counter()
            policy.decode(state, bits)
            sync(device)
            t2 = time.perf_counter()
            if i >= 2:
                prefill_ms.append((t1 - t0) * 1e3)
                decode_ms.append((t2 - t1) * 1e3)
        rows.append(
            {
                "bits": bits,
                "prefill_ms_p50": statistics.median(prefill_ms),
                "decode_ms_p50": statistics.median(decode_ms),
                "decode_ms_p99": float(np.percentile(decode_ms, 99)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "7b":
        if device.type != "cuda":
            parser.error("--shape 7b needs a CUDA GPU")
        loaded = random_7b(device)
        full_precision_bytes = None
    else:
        path = ensure_tiny_openvla()
        full_precision_bytes = weight_bytes(load_openvla(path).model)["total"]
        loaded = load_quantized_openvla(path, device=device)
    wb = weight_bytes(loaded.model)
    rows = measure(loaded, args.steps, device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"model: {args.shape}  device: {where}  torch {torch.__version__}  steps: {args.steps}")
    print(f"weights (quantized language model): {wb}")
    if full_precision_bytes:
        print(f"weights (fp32, unquantized): {full_precision_bytes} B")
    print("prefill runs at 16 bits (default prefill_bits); decode of 7 action tokens at <bits>")
    print(f"{'bits':>5}{'prefill p50 ms':>16}{'decode p50 ms':>15}{'decode p99 ms':>15}")
    for r in rows:
        print(
            f"{r['bits']:>5}{r['prefill_ms_p50']:>16.2f}{r['decode_ms_p50']:>15.2f}{r['decode_ms_p99']:>15.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "weights": wb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
