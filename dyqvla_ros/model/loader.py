"""Load an OpenVLA checkpoint directory without executing any code from it.

A directory as published (``openvla/openvla-7b``) or as ``dyqvla-make-tiny`` writes it:

    config.json                         OpenVLA config (model_type "openvla")
    model.safetensors                   or model.safetensors.index.json + shards
    tokenizer.json / tokenizer.model    + tokenizer_config.json
    dataset_statistics.json             un-normalisation statistics (else config.norm_stats)

The model is built on the meta device and the tensors are assigned in place, so a 7B
checkpoint needs its own size in memory once. ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dyqvla_ros.model.config import OpenVLAConfig, UnsupportedConfigError
from dyqvla_ros.model.modeling import OpenVLA
from dyqvla_ros.quant import FORMAT_VERSION, load_quantized, quantize_model, save_quantized

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


def read_tensors(files: list[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of the (sharded) weight files, floating ones cast to ``dtype`` (None: as stored)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
        for name, tensor in part.items():
            tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def _check_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensors the model does not have, e.g. {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )


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
    tensors = read_tensors(checkpoint.weight_files, dtype)
    _check_state(model, tensors, path)
    model.load_state_dict(tensors, strict=True, assign=True)
    _finish(model, device, path)
    tokenizer = _load_tokenizer(path, checkpoint.config)
    log.info("loaded OpenVLA from %s (%d tensors) on %s", path, len(tensors), device)
    return LoadedOpenVLA(model, tokenizer, checkpoint.config, checkpoint.norm_stats, path)


def quantization_patterns(quantize_vision: bool) -> list[str]:
    """Module-name patterns quantized: the language model's linears (lm_head is skipped
    by ``quantize_model``), and optionally the vision backbones and the projector."""
    patterns = ["language_model.*"]
    if quantize_vision:
        patterns += ["vision_backbone.*", "projector.*"]
    return patterns


def _cache_key(path: Path, group_size: int, quantize_vision: bool, dtype: torch.dtype) -> str:
    """Identifies a quantized cache entry: the source files (name, size, mtime) + settings."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update(f"g{group_size}:v{int(quantize_vision)}:{dtype}:{FORMAT_VERSION}".encode())
    return digest.hexdigest()[:16]


def load_quantized_openvla(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    group_size: int = 128,
    quantize_vision: bool = False,
    cache_dir: str | Path | None = None,
    backend: str = "auto",
) -> LoadedOpenVLA:
    """``load_openvla`` + W4 quantization, quantized once and then reloaded fast.

    The first call quantizes the loaded model and saves it (``quant.save_quantized``)
    under ``cache_dir``, keyed by the checkpoint's files and the settings; later calls
    build the model on the meta device and assign the packed weights from that file,
    without reading the full-precision weights or re-quantizing.
    """
    path = Path(path).expanduser()
    checkpoint = inspect_checkpoint(path)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = cache_dir / f"{path.name}-w4-{_cache_key(path, group_size, quantize_vision, dtype)}.safetensors"
    patterns = quantization_patterns(quantize_vision)
    if cached.is_file():
        model = build_model(checkpoint.config).to(dtype)  # the dtype the entry was written in
        load_quantized(model, cached, backend=backend)
        _finish(model, device, path)
        log.info("loaded quantized OpenVLA from cache %s", cached)
        tokenizer = _load_tokenizer(path, checkpoint.config)
        return LoadedOpenVLA(model, tokenizer, checkpoint.config, checkpoint.norm_stats, path, cached, True)
    loaded = load_openvla(path, "cpu", dtype)
    quantize_model(loaded.model, group_size, include=patterns, backend=backend)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_quantized(loaded.model, cached)
    log.info("quantized %s (group %d) and cached it at %s", path, group_size, cached)
    loaded.model.to(torch.device(device))
    loaded.quantized_cache = cached
    return loaded
