"""An OpenVLA-7B-sized checkpoint loaded from disk and run on the CPU, as a user would.

Makes (or reuses) the random 7B checkpoint ``dyqvla-make-random OUT --size 7b`` writes
(the real OpenVLA-7B format and sizes, 15 GB of bf16 shards), then measures, each in a
fresh process so that every peak is its own:

* cold load + quantize (``load_quantized_openvla`` with an empty cache): wall time and
  peak RSS (``VmHWM`` of ``/proc/self/status``);
* cached reload (the same call, the W4 cache now written): time and peak RSS;
* one full control step on the CPU (vision + the ~280-token prefill + the 7-token
  decode) at 16 and at 4 bits, after one warm-up step, with its latency split.

    python bench/load_7b.py [--checkpoint out/random-7b] [--dtype bf16|fp32] [--json out.json]

Prints one table; the figures go to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
INSTRUCTION = "pick up the cup"  # with the checkpoint's character-level tokenizer: ~280 tokens in all


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def _load(checkpoint: Path, cache: Path, dtype: str) -> tuple[object, float]:
    import torch

    from dyqvla_ros.model.loader import load_quantized_openvla

    start = time.perf_counter()
    loaded = load_quantized_openvla(checkpoint, "cpu", getattr(torch, DTYPES[dtype]), cache_dir=cache)
    return loaded, time.perf_counter() - start


def phase_load(checkpoint: Path, cache: Path, dtype: str) -> dict:
    """One load in this process: time, peak RSS and the loaded model's bytes."""
    from dyqvla_ros.model import loader  # noqa: F401  (torch, transformers, timm: in "before")
    from dyqvla_ros.quant import weight_bytes

    before = peak_rss_gb()  # the interpreter with torch, transformers and timm imported
    loaded, seconds = _load(checkpoint, cache, dtype)
    return {
        "from_cache": loaded.from_cache,
        "seconds": seconds,
        "rss_before_gb": before,
        "peak_rss_gb": peak_rss_gb(),
        "model_gb": weight_bytes(loaded.model)["total"] / 2**30,
    }


def phase_step(checkpoint: Path, cache: Path, dtype: str) -> dict:
    """A cached load, a warm-up step, then one timed control step at each bit-width."""
    import numpy as np
    import torch

    from dyqvla_ros.kernels.w4a_cpu import cpu_features
    from dyqvla_ros.model import VLAPolicy

    loaded, _ = _load(checkpoint, cache, dtype)
    policy = VLAPolicy(loaded, restrict_to_actions=True)
    frame = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    vision: list[float] = []
    model = policy.model
    model.vision_backbone.register_forward_pre_hook(lambda *_: vision.append(time.perf_counter()))
    model.projector.register_forward_hook(lambda *_: vision.append(time.perf_counter()))
    result = {
        "prompt_tokens": policy.prompt_length(INSTRUCTION)
        + model.vision_backbone.featurizer.patch_embed.num_patches,
        "threads": torch.get_num_threads(),
        "cpu": cpu_features(),
    }
    for label, bits in (("warm-up", 16), ("16", 16), ("4", 4)):
        vision.clear()
        t0 = time.perf_counter()
        state = policy.prefill(frame, INSTRUCTION)
        t1 = time.perf_counter()
        action = policy.decode(state, bits)
        t2 = time.perf_counter()
        if label != "warm-up":
            result[f"step_{label}"] = {
                "vision_s": vision[1] - vision[0],
                "llm_prefill_s": (t1 - t0) - (vision[1] - vision[0]),
                "decode_s": t2 - t1,
                "total_s": t2 - t0,
                "finite": bool(np.all(np.isfinite(action.action))),
            }
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def run_phase(phase: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--checkpoint", str(args.checkpoint)]
    command += ["--cache", str(args.cache), "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=REPO / "out" / "random-7b")
    parser.add_argument("--cache", type=Path, default=REPO / "out" / "load_7b-cache")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--phase", choices=("load", "step"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if args.phase == "load":
        print(json.dumps(phase_load(args.checkpoint, args.cache, args.dtype)))
        return
    if args.phase == "step":
        print(json.dumps(phase_step(args.checkpoint, args.cache, args.dtype)))
        return

    if not (args.checkpoint / "config.json").is_file():
        print(f"writing the random 7B checkpoint to {args.checkpoint} (once)", flush=True)
        maker = Path(sys.executable).parent / "dyqvla-make-random"
        subprocess.run([str(maker), str(args.checkpoint), "--size", "7b", "--seed", "0"], check=True)
    shutil.rmtree(args.cache, ignore_errors=True)
    shards = sorted(args.checkpoint.glob("*.safetensors"))
    size_gb = sum(f.stat().st_size for f in shards) / 2**30
    cold = run_phase("load", args)
    cached = run_phase("load", args)
    step = run_phase("step", args)
    assert not cold["from_cache"] and cached["from_cache"]
    model = cold["model_gb"]
    print(f"OpenVLA-7B-sized checkpoint {args.checkpoint}: {len(shards)} shards, {size_gb:.2f} GiB bf16")
    threads = step["threads"]
    described = f"CPU ({step['cpu']}), {threads} torch threads, {args.dtype} unquantized parts"
    print(f"{described}; loaded W4 model {model:.2f} GiB")
    print()
    print("| phase | time (s) | peak RSS (GiB) | peak / model | RSS before | (peak - before) / model |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in (("cold load + quantize", cold), ("cached reload", cached)):
        peak, before = r["peak_rss_gb"], r["rss_before_gb"]
        growth = (peak - before) / model
        cells = f"{r['seconds']:.1f} | {peak:.2f} | {peak / model:.2f}x | {before:.2f} | {growth:.2f}x"
        print(f"| {label} | {cells} |")
    print()
    print(f"One control step, {step['prompt_tokens']} prompt tokens (after a warm-up step):")
    print()
    print("| activations | vision (s) | LLM prefill (s) | decode 7 tokens (s) | step (s) | finite action |")
    print("| --- | --- | --- | --- | --- | --- |")
    for bits in ("16", "4"):
        s = step[f"step_{bits}"]
        times = " | ".join(f"{s[k]:.2f}" for k in ("vision_s", "llm_prefill_s", "decode_s", "total_s"))
        print(f"| A{bits} | {times} | {s['finite']} |")
    print(f"\npeak RSS of the step process: {step['peak_rss_gb']:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps({"cold": cold, "cached": cached, "step": step}, indent=2))


if __name__ == "__main__":
    main()
