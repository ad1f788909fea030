"""Load an OpenVLA checkpoint directory without executing any code from it.

A directory as published (``openvla/openvla-7b``) or as ``dyqvla-make-tiny`` writes it:

    config.json                         OpenVLA config (model_type "openvla")
    model.safetensors                   or model.safetensors.index.json + shards
    tokenizer.json / tokenizer.model    + tokenizer_config.json
    dataset_statistics.json             un-normalisation statistics (else config.norm_stats)

The model is built on the meta device and filled one tensor at a time
(``tensor_files.read_each``): each is read, cast to the model's dtype, moved to the
device and, for a linear of the quantized scope, quantized to INT4 at once (on the target
device), so neither the checkpoint nor the full-precision model is ever resident; the
peak is the loaded model plus one tensor. ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dyqvla_ros.model.config import OpenVLAConfig, UnsupportedConfigError
from dyqvla_ros.model.modeling import OpenVLA
from dyqvla_ros.quant import (
    FORMAT_VERSION,
    QuantLinear,
    Scheme,
    empty_quantized_layers,
    load_quantized,
    quantize_weight,
    save_quantized,
    to_cpu_runtime,
)
from dyqvla_ros.tensor_files import TensorFileError, assign_tensor, read_each

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dyqvla_ros`` (``~/.cache/dyqvla_ros`` when unset), read at each call
    so that a process (or a test session) can move the cache by setting the variable."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dyqvla_ros"


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or does not match the model."""


@dataclass
class LoadedOpenVLA:
    model: OpenVLA
    tokenizer: PreTrainedTokenizerBase
    config: OpenVLAConfig
    norm_stats: dict[str, Any]
    path: Path
    # load_quantized_openvla only: the packed-weights cache file, and whether this load read
    # it (True) or quantized the full-precision weights and wrote it (False).
    quantized_cache: Path | None = None
    from_cache: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path} is missing weight shards: {missing}")
    return files


def _each_tensor(files: list[Path]):
    try:
        yield from read_each(files)
    except TensorFileError as err:
        raise CheckpointError(str(err)) from err


def read_tensors(files: list[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of the (sharded) weight files, floating ones cast to ``dtype`` (None: as
    stored), all at once: for training, which needs them together anyway."""
    return {
        name: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        for name, tensor, _file in _each_tensor(files)
    }


def _stream_into(
    model: nn.Module,
    shapes: dict[str, torch.Size],
    files: list[Path],
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Fill ``model`` (on the meta device; the linears to quantize already empty QuantLinear)
    from the weight files one tensor at a time; ``shapes``: the unquantized model's state dict.

    Each floating tensor is cast to ``dtype`` first and then, for a QuantLinear's weight,
    quantized: exactly what loading in ``dtype`` and then ``quantize_model`` computes.
    Returns the number of tensors read.
    """
    placed: set[str] = set()
    for name, tensor, file in _each_tensor(files):
        expected = shapes.get(name)
        if expected is None:
            raise CheckpointError(f"{file}: tensor {name!r} is not a parameter of this model")
        if tensor.shape != expected:
            shape = tuple(tensor.shape)
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {shape}, the model expects {tuple(expected)}"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.to(device)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, QuantLinear) and attr == "weight":
            module.qweight, module.scales = quantize_weight(tensor, module.group_size, module.rotation)
        else:
            assign_tensor(model, name, tensor)
        placed.add(name)
    missing = sorted(set(shapes) - placed)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}"
        )
    return len(placed)


def rebuild_rotary(model: OpenVLA, device: str | torch.device = "cpu") -> None:
    """The rotary inverse frequencies are a non-persistent buffer: recompute them."""
    decoder = model.language_model.model
    with torch.device(device):
        decoder.rotary_emb = type(decoder.rotary_emb)(model.language_model.config)


def build_model(config: OpenVLAConfig, device: str | torch.device = "meta") -> OpenVLA:
    with torch.device(device):
        return OpenVLA(config)


@dataclass
class Checkpoint:
    config: OpenVLAConfig
    norm_stats: dict[str, Any]
    weight_files: list[Path]


def inspect_checkpoint(path: Path) -> Checkpoint:
    """Validate the directory's files (not the tensors) with a specific message each."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = OpenVLAConfig.from_dict(_read_json(path / "config.json"))
    except UnsupportedConfigError as err:
        raise CheckpointError(f"{path / 'config.json'}: unsupported config: {err}") from err
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    stats_file = path / "dataset_statistics.json"
    norm_stats = _read_json(stats_file) if stats_file.is_file() else config.norm_stats
    if not norm_stats:
        raise CheckpointError(f"{path} has no dataset_statistics.json and config.json has no norm_stats")
    return Checkpoint(config, norm_stats, _weight_files(path))


# glibc's mallopt parameter for the size from which allocations are mapped on their own.
M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD = 1 << 20
# After loading: glibc's own adaptive threshold settles at its maximum, 32 MiB on 64-bit
# systems, once a large block has been freed; set it there at once.
RUN_MMAP_THRESHOLD = 32 << 20


@contextlib.contextmanager
def _large_frees_returned() -> Iterator[None]:
    """While loading, glibc maps every allocation of 1 MiB or more on its own (``mallopt``),
    so that a freed tensor goes back to the system at once. Loading frees large tensors all
    along (each read copy, the portable layout of each layer moved to the CPU kernel's); by
    default glibc keeps them as heap holes that the next, slightly larger tensor cannot
    reuse. Measured on the 7B (bench/load_7b.py): peak RSS of a cold load 7.03 -> 6.31 GiB,
    of a cached reload 6.56 -> 6.28 GiB. Running with it would map and fault in every
    large activation of every step (the 7B's CPU prefill took 19.3 s instead of 10.2), so
    the threshold then goes to 32 MiB, where glibc's adaptive one settles by itself. A
    no-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)


# From this many parameters the CPU runs the unquantized parts in bf16 (``default_dtype``).
BF16_ON_CPU_FROM_PARAMETERS = 10**9


def default_dtype(path: str | Path, device: str | torch.device) -> torch.dtype:
    """The dtype of the unquantized parts (vision towers, projector, embeddings, lm_head).

    bf16 on CUDA, as OpenVLA. On the CPU, measured (BENCHMARKS.md [L]): bf16 matmuls run
    5.1-6.6x faster than fp32 at OpenVLA-7B's vision and prefill shapes (AMX) and halve
    the 4.3 GB those parts take in fp32, which a 7B needs to load within 8 GB; on the tiny
    tabletop policy bf16 gains nothing (21-22 ms per step either way) and changes 1.1 % of
    the 16-bit action tokens (10 % at 4 bits). So: bf16 for models of
    ``BF16_ON_CPU_FROM_PARAMETERS`` or more, fp32 below. Without AMX fp32 matmuls are
    1.5-1.8x faster than bf16 at those shapes (BENCHMARKS.md [L]), but a 7B still needs
    bf16 for memory; ``dtype: float32`` is the operator's trade there.
    """
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    model = build_model(inspect_checkpoint(Path(path).expanduser()).config)  # meta: no memory
    count = sum(p.numel() for p in model.parameters())
    return torch.bfloat16 if count >= BF16_ON_CPU_FROM_PARAMETERS else torch.float32


def _load_tokenizer(path: Path, config: OpenVLAConfig) -> PreTrainedTokenizerBase:
    try:
        # config= keeps transformers from reading config.json as a model config of its own.
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=config.llama_config())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {err}") from err


def _finish(model: OpenVLA, device: str | torch.device, path: Path) -> OpenVLA:
    """Recompute non-persistent buffers, move to ``device``, check nothing is left on meta."""
    rebuild_rotary(model)
    model.to(torch.device(device))
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: tensors left uninitialised after loading: {leftover[:3]}")
    return model.eval()


def load_openvla(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedOpenVLA:
    """Load model, tokenizer and statistics from a local checkpoint directory."""
    path = Path(path).expanduser()
    checkpoint = inspect_checkpoint(path)
    model = build_model(checkpoint.config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    with _large_frees_returned():
        count = _stream_into(model, shapes, checkpoint.weight_files, path, dtype, torch.device(device))
        _finish(model, device, path)
    tokenizer = _load_tokenizer(path, checkpoint.config)
    log.info("loaded OpenVLA from %s (%d tensors) on %s", path, count, device)
    return LoadedOpenVLA(model, tokenizer, checkpoint.config, checkpoint.norm_stats, path)


def quantization_patterns(quantize_vision: bool) -> list[str]:
    """Module-name patterns quantized: the language model's linears (lm_head is skipped
    by ``quantize_model``), and optionally the vision backbones and the projector."""
    patterns = ["language_model.*"]
    if quantize_vision:
        patterns += ["vision_backbone.*", "projector.*"]
    return patterns


def _cache_key(
    path: Path,
    group_size: int,
    quantize_vision: bool,
    dtype: torch.dtype,
    rotation: str = "none",
    activation_scales: str = "token",
) -> str:
    """Identifies a quantized cache entry: the source files (name, size, mtime) + settings,
    the quantization scheme included (an entry of another scheme is never reused)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update(f"g{group_size}:v{int(quantize_vision)}:{dtype}:{FORMAT_VERSION}".encode())
    digest.update(f":r{rotation}:a{activation_scales}".encode())
    return digest.hexdigest()[:16]


def _check_scheme(
    model: nn.Module, cached: Path, group_size: int, rotation: str, activation_scales: str
) -> None:
    """CheckpointError unless every quantized layer read from ``cached`` has the scheme asked
    for (the cache key makes that so; a file copied or renamed into the cache would not)."""
    asked = Scheme(group_size, rotation, activation_scales)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.scheme != asked:
            raise CheckpointError(
                f"quantized cache {cached}: layer {name} has {module.scheme.as_dict()}, this load asks "
                f"for {asked.as_dict()}; delete the file to quantize again"
            )


def load_quantized_openvla(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    group_size: int = 128,
    quantize_vision: bool = False,
    cache_dir: str | Path | None = None,
    backend: str = "auto",
    rotation: str = "none",
    activation_scales: str = "token",
) -> LoadedOpenVLA:
    """``load_openvla`` + W4 quantization, quantized once and then reloaded fast.

    ``rotation`` ("none" or "hadamard": a block Hadamard rotation of each quantized
    linear's input features) and ``activation_scales`` ("token" or "group": one activation
    scale per token, or per token and weight group) choose the scheme (``quant``); the
    cache entry is keyed by them, and the layers of an entry read back must carry them.

    The first call streams the checkpoint, quantizing each linear of the scope as it is
    read (``_stream_into``: the full-precision model is never resident), and writes the
    packed model (``quant.save_quantized``, one tensor at a time) under ``cache_dir``,
    keyed by the checkpoint's files and the settings; later calls build the model on the
    meta device and read the packed weights from that file, one tensor at a time. On a
    CPU device the packed weights then move to the CPU int4 kernel's layout
    (``quant.to_cpu_runtime``, in place); the file keeps the portable format.
    """
    path = Path(path).expanduser()
    checkpoint = inspect_checkpoint(path)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = _cache_key(path, group_size, quantize_vision, dtype, rotation, activation_scales)
    cached = cache_dir / f"{path.name}-w4-{key}.safetensors"
    patterns = quantization_patterns(quantize_vision)
    device = torch.device(device)
    from_cache = cached.is_file()
    model = build_model(checkpoint.config)
    with _large_frees_returned():
        if from_cache:
            model.to(dtype)  # the dtype the entry was written in
            load_quantized(model, cached, backend=backend, device=device)
            _check_scheme(model, cached, group_size, rotation, activation_scales)
        else:
            shapes = {name: t.shape for name, t in model.state_dict().items()}
            empty_quantized_layers(
                model,
                group_size,
                include=patterns,
                backend=backend,
                rotation=rotation,
                activation_scales=activation_scales,
            )
            _stream_into(model, shapes, checkpoint.weight_files, path, dtype, device)
            cache_dir.mkdir(parents=True, exist_ok=True)
            save_quantized(model, cached)
            log.info(
                "quantized %s (group %d, rotation %s, activation scales per %s) and cached it at %s",
                path,
                group_size,
                rotation,
                activation_scales,
                cached,
            )
        _finish(model, device, path)
        if device.type == "cpu":
            to_cpu_runtime(model)
    tokenizer = _load_tokenizer(path, checkpoint.config)
    return LoadedOpenVLA(model, tokenizer, checkpoint.config, checkpoint.norm_stats, path, cached, from_cache)
