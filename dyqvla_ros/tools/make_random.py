"""``dyqvla-make-random OUT --size 7b|tiny``: an OpenVLA checkpoint with random weights,
in the files and layout of ``openvla/openvla-7b``, for benchmarks without the download.

Written to OUT, as Hugging Face writes a sharded checkpoint:

    model-00001-of-0000N.safetensors    bf16 tensors, at most ``--max-shard-size`` of
    ...                                 tensor bytes each (default 5GB; a tensor larger
                                        than that gets a shard of its own), or a single
                                        ``model.safetensors`` when everything fits one
    model.safetensors.index.json        ``metadata.total_size`` and ``weight_map``
    tokenizer.json                      the tiny model's tokenizer (``tiny.build_tokenizer``,
    tokenizer_config.json               characters and a few words) in the real vocabulary
                                        layout: 32000 text tokens, the 256 action tokens
                                        last, ``<PAD>`` at 32000 (embeddings padded to 32064)
    dataset_statistics.json             one ``bridge_orig`` entry in the published format
    config.json                         the published config's fields, written last, so an
                                        interrupted run leaves a directory the loader refuses

``--size 7b`` is openvla-7b's architecture (DINOv2 ViT-L + SigLIP So400M at 224 px,
Llama-2-7B: 7.5e9 parameters, 15 GB); ``--size tiny`` the ``dyqvla-make-tiny`` sizes.
``--layers N`` keeps only N decoder layers of the LLM, for quick tests.

The model is built on the meta device for the tensor names, shapes and the shard plan;
each tensor is then drawn from a generator seeded by (``--seed``, its name), so files are
reproducible and a tensor does not depend on the others (``--layers`` keeps the first
layers' weights), and only one shard is in memory at a time (peak RSS about one shard).
Init: biases 0, other 1-D weights (norms, LayerScale) 1, everything else N(0, 0.02²), so
the forward pass stays finite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards
from safetensors.torch import save_file

from dyqvla_ros.model.config import OpenVLAConfig
from dyqvla_ros.model.loader import build_model
from dyqvla_ros.model.tiny import TINY_ACTION_STATS, build_tokenizer, tiny_config_dict

SIZES = ("7b", "tiny")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # save_pretrained's default
INDEX_FILE = "model.safetensors.index.json"
UNNORM_KEY = "bridge_orig"
DTYPE = torch.bfloat16
INIT_STD = 0.02
# openvla-7b: timm's default ViT sizes at 224 px and Llama-2-7B (the published config
# leaves these to the LlamaConfig defaults; written out here so --layers can change one).
IMAGE_SIZE_7B = 224
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes from ``5000``, ``"5GB"`` (10^9, as Hugging Face counts) or ``"4.5GiB"`` (2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS:
        raise ValueError(f"size must be bytes or a number with KB/MB/GB/TB/KiB/MiB/GiB, got {size!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def random_config_dict(size: str, seed: int, layers: int | None = None) -> dict:
    """config.json without norm_stats: the tiny model's (the published fields) resized to
    openvla-7b for ``"7b"``; ``layers`` replaces the LLM depth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    data = tiny_config_dict(seed)
    del data["dyqvla_tiny_seed"]  # not dyqvla-make-tiny's weights
    if size == "7b":
        del data["dyqvla_timm_overrides"]  # timm's defaults are the published backbones
        data["image_sizes"] = [IMAGE_SIZE_7B, IMAGE_SIZE_7B]
        data["text_config"].update(LLAMA2_7B)
    if layers is not None:
        data["text_config"]["num_hidden_layers"] = layers
    data["dyqvla_random_seed"] = seed
    return data


def random_statistics() -> dict:
    """dataset_statistics.json as OpenVLA publishes it, one ``bridge_orig`` entry: the tiny
    model's q01/q99/mask (Bridge-sized deltas), mean/std/min/max consistent with them, and
    the all-zero proprio statistics Bridge has."""
    q01, q99 = TINY_ACTION_STATS["q01"], TINY_ACTION_STATS["q99"]
    action = {
        "mean": [round((lo + hi) / 2, 6) for lo, hi in zip(q01, q99, strict=True)],
        "std": [round((hi - lo) / 4.65, 6) for lo, hi in zip(q01, q99, strict=True)],  # q01..q99 of a normal
        "max": list(q99),
        "min": list(q01),
        **TINY_ACTION_STATS,
    }
    zeros = [0.0] * len(q01)
    proprio = {key: zeros for key in ("mean", "std", "max", "min", "q01", "q99")}
    entry = {"action": action, "proprio": proprio, "num_transitions": 0, "num_trajectories": 0}
    return {UNNORM_KEY: entry}


def plan_shards(config: OpenVLAConfig, max_shard_size: int) -> tuple[StateDictSplit, dict[str, torch.Tensor]]:
    """Hugging Face's shard plan (names, grouping) and the bf16 meta tensors, no memory used."""
    meta = {name: t.to(DTYPE) for name, t in build_model(config, "meta").state_dict().items()}
    return split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size), meta


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed per (seed, tensor name): tensors are independent of each other."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_tensor(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """The initial value of ``name`` (shape and dtype of the meta tensor ``like``)."""
    if name.endswith(".bias"):
        return torch.zeros(like.shape, dtype=like.dtype)
    if like.dim() == 1:  # norm weights, LayerScale
        return torch.ones(like.shape, dtype=like.dtype)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(like.shape, dtype=like.dtype).normal_(0.0, INIT_STD, generator=generator)


def make_random_openvla(
    out: str | Path,
    size: str = "7b",
    seed: int = 0,
    layers: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
) -> Path:
    """Write the checkpoint (module docstring) to ``out``; FileExistsError if ``out`` holds
    files and not ``force`` (which replaces the files this writes, leaving others)."""
    out = Path(out)
    max_bytes = parse_size(max_shard_size)
    data = random_config_dict(size, seed, layers)
    statistics = random_statistics()
    data["norm_stats"] = statistics
    config = OpenVLAConfig.from_dict(data)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (--force replaces the checkpoint in it)")
        for stale in [out / "config.json", out / INDEX_FILE, *out.glob("model*.safetensors")]:
            stale.unlink(missing_ok=True)  # a smaller plan must not leave shards of a larger one
    out.mkdir(parents=True, exist_ok=True)
    split, meta = plan_shards(config, max_bytes)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: random_tensor(name, meta[name], seed) for name in names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard  # one shard in memory at a time
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    build_tokenizer().save_pretrained(str(out))
    (out / "dataset_statistics.json").write_text(json.dumps(statistics, indent=2))
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), 0 where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output checkpoint directory (new or empty)")
    parser.add_argument("--size", choices=SIZES, default="7b", help="architecture sizes (default 7b)")
    parser.add_argument("--layers", type=int, help="LLM decoder layers (default: all of --size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="tensor bytes per shard: bytes, or e.g. 5GB, 500MB, 4GiB (default 5GB)",
    )
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT")
    args = parser.parse_args(argv)
    try:
        parse_size(args.max_shard_size)
        random_config_dict(args.size, args.seed, args.layers)
    except ValueError as err:
        parser.error(str(err))
    start, rss_at_start = time.perf_counter(), peak_rss_bytes()
    try:
        path = make_random_openvla(
            args.out, args.size, args.seed, args.layers, args.max_shard_size, args.force
        )
    except FileExistsError as err:
        parser.exit(2, f"dyqvla-make-random: {err}\n")
    shards = sorted(path.glob("model*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    elapsed = time.perf_counter() - start
    print(
        f"random OpenVLA ({args.size}, seed {args.seed}) written to {path}: {len(shards)} shard(s), "
        f"{size / 1e9:.2f} GB in {elapsed:.1f} s, peak RSS {peak_rss_bytes() / 1e9:.2f} GB "
        f"({rss_at_start / 1e9:.2f} GB before)"
    )


if __name__ == "__main__":
    main()
