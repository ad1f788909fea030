"""[M] Loading OpenVLA checkpoint directories: shards, statistics, the quantized cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dyqvla_ros.model import CheckpointError, LoadedOpenVLA, VLAPolicy, load_openvla
from dyqvla_ros.model import loader as loader_module
from dyqvla_ros.model.loader import default_cache_dir, inspect_checkpoint, load_quantized_openvla
from dyqvla_ros.model.tiny import TINY_ACTION_STATS, TINY_UNNORM_KEY
from dyqvla_ros.quant import QuantLinear, quantize_model, save_quantized

INSTRUCTION = "put the red cube on the blue target"
N_SHARDS = 3
INDEX = "model.safetensors.index.json"
Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"  # a linear quantized by default
# Statistics put in config.json: the key of dataset_statistics.json with other values, so
# the numbers tell which of the two was read.
CONFIG_STATS = {
    TINY_UNNORM_KEY: {
        "action": {
            "q01": [-0.5, -0.4, -0.3, -2.0, -1.5, -1.0, 0.0],
            "q99": [0.7, 0.4, 0.9, 1.0, 2.5, 3.0, 1.0],
            "mask": [True, True, True, True, True, True, False],
        }
    }
}


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def shard_name(i: int) -> str:
    return f"model-{i:05d}-of-{N_SHARDS:05d}.safetensors"


def shard_checkpoint(src: Path, dst: Path) -> dict[str, str]:
    """Copy ``src`` with its weights split as Hugging Face writes them: consecutive tensors
    in ``N_SHARDS`` files plus the index; no model.safetensors left. (Split by tensor count:
    by bytes the embedding and lm_head of the tiny model would fill two shards alone.)"""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = sorted(tensors)
    size = -(-len(names) // N_SHARDS)
    shards = [{name: tensors[name] for name in names[i * size : (i + 1) * size]} for i in range(N_SHARDS)]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        assert shard, "every shard holds tensors"
        save_file(shard, str(dst / shard_name(i)), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, shard_name(i))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / INDEX).write_text(json.dumps(index, indent=2))
    return weight_map


@pytest.fixture(scope="module")
def sharded_dir(tiny_openvla, tmp_path_factory) -> Path:
    """The tiny checkpoint in 3 shards (read-only: tests copy it before changing it)."""
    path = tmp_path_factory.mktemp("sharded") / "openvla-tiny"
    shard_checkpoint(tiny_openvla, path)
    return path


def packed(loaded: LoadedOpenVLA) -> dict[str, torch.Tensor]:
    """Every QuantLinear's packed weights and scales (portable layout), by name."""
    buffers = {
        f"{name}.{buffer}": tensor
        for name, module in loaded.model.named_modules()
        if isinstance(module, QuantLinear)
        for buffer, tensor in zip(("qweight", "scales"), module.portable_tensors(), strict=True)
    }
    assert buffers, "the model is quantized"
    return buffers


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert different == []


def rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}, indent=2))


def forbid_full_precision_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the full-precision weights now fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the full-precision weights were read")

    for name in ("read_tensors", "load_openvla", "read_each", "_stream_into", "quantize_weight"):
        monkeypatch.setattr(loader_module, name, refuse)


# --- sharded checkpoints ----------------------------------------------------------------


def test_sharded_checkpoint_loads_as_the_single_file(tiny_openvla, sharded_dir):
    """openvla-7b ships in shards: they must give the very same model as one file."""
    weight_map = json.loads((sharded_dir / INDEX).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [shard_name(i) for i in range(1, N_SHARDS + 1)]
    assert not (sharded_dir / "model.safetensors").exists()
    single, split = load_openvla(tiny_openvla), load_openvla(sharded_dir)
    assert_same_tensors(single.model.state_dict(), split.model.state_dict())
    assert split.norm_stats == single.norm_stats
    for seed in (0, 1):
        a = VLAPolicy(single).predict(image(seed), INSTRUCTION)
        b = VLAPolicy(split).predict(image(seed), INSTRUCTION)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.action, b.action)


def test_sharded_checkpoint_quantizes_as_the_single_file(tiny_openvla, sharded_dir, tmp_path):
    """The W4 weights of the shards are those of the single file, tensor for tensor."""
    single = load_quantized_openvla(tiny_openvla, cache_dir=tmp_path / "single")
    split = load_quantized_openvla(sharded_dir, cache_dir=tmp_path / "split")
    assert not single.from_cache and not split.from_cache
    assert_same_tensors(packed(single), packed(split))
    assert_same_tensors(single.model.state_dict(), split.model.state_dict())


def test_sharded_checkpoint_errors_are_specific(sharded_dir, tmp_path):
    """An incomplete download names what is missing, as a CheckpointError (not a KeyError
    or a RuntimeError from torch)."""
    weight_map = json.loads((sharded_dir / INDEX).read_text())["weight_map"]
    in_shard_2 = next(name for name, shard in weight_map.items() if shard == shard_name(2))

    def drop_tensor(p: Path) -> None:  # still named by the index, in no shard
        tensors = load_file(str(p / shard_name(2)))
        del tensors[in_shard_2]
        save_file(tensors, str(p / shard_name(2)))

    def extra_tensor(p: Path) -> None:
        tensors = load_file(str(p / shard_name(3)))
        tensors["projector.fc4.weight"] = torch.zeros(2, 2)
        save_file(tensors, str(p / shard_name(3)))

    cases = {
        re.escape(f"is missing weight shards: ['{shard_name(2)}']"): lambda p: (p / shard_name(2)).unlink(),
        re.escape(f"1 tensors missing from the checkpoint, e.g. ['{in_shard_2}']"): drop_tensor,
        re.escape("tensor 'projector.fc4.weight' is not a parameter of this model"): extra_tensor,
        "has no weight_map": lambda p: (p / INDEX).write_text(json.dumps({"metadata": {}})),
    }
    for i, (message, damage) in enumerate(cases.items()):
        broken = tmp_path / f"case{i}"
        shutil.copytree(sharded_dir, broken)
        damage(broken)
        with pytest.raises(CheckpointError, match=message):
            load_openvla(broken)


# --- statistics -------------------------------------------------------------------------


def expected_action(stats: dict, normalized: np.ndarray) -> np.ndarray:
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    return np.where(stats["mask"], 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)


def every_load(path: Path, cache: Path) -> list[LoadedOpenVLA]:
    """The three ways a checkpoint is read: full precision, quantized, and from the cache."""
    return [
        load_openvla(path),
        load_quantized_openvla(path, cache_dir=cache),
        load_quantized_openvla(path, cache_dir=cache),  # from the cache
    ]


def test_statistics_from_config_json_without_dataset_statistics(tiny_openvla, tmp_path):
    """Checkpoints saved without dataset_statistics.json carry norm_stats in config.json."""
    path = tmp_path / "openvla-tiny"
    shutil.copytree(tiny_openvla, path)
    (path / "dataset_statistics.json").unlink()
    rewrite_config(path, norm_stats=CONFIG_STATS)
    ours = CONFIG_STATS[TINY_UNNORM_KEY]["action"]
    for loaded in every_load(path, tmp_path / "cache"):
        policy = VLAPolicy(loaded)
        assert np.array_equal(policy.stats.q01, ours["q01"]) and np.array_equal(policy.stats.q99, ours["q99"])
        action = policy.predict(image(2), INSTRUCTION)
        assert np.allclose(action.action, expected_action(ours, action.normalized))
        assert not np.allclose(action.action, expected_action(TINY_ACTION_STATS, action.normalized))
    assert loaded.from_cache


def test_dataset_statistics_json_wins_over_config_json(tiny_openvla, tmp_path):
    """Both present (as in openvla-7b): dataset_statistics.json is the one used."""
    path = tmp_path / "openvla-tiny"
    shutil.copytree(tiny_openvla, path)
    rewrite_config(path, norm_stats=CONFIG_STATS)
    theirs = CONFIG_STATS[TINY_UNNORM_KEY]["action"]
    for loaded in every_load(path, tmp_path / "cache"):
        policy = VLAPolicy(loaded)
        assert np.array_equal(policy.stats.q01, TINY_ACTION_STATS["q01"])
        assert np.array_equal(policy.stats.q99, TINY_ACTION_STATS["q99"])
        action = policy.predict(image(2), INSTRUCTION)
        assert np.allclose(action.action, expected_action(TINY_ACTION_STATS, action.normalized))
        assert not np.allclose(action.action, expected_action(theirs, action.normalized))
    assert loaded.from_cache


# --- the quantized-weights cache ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_quantization_is_load_then_quantize_bit_for_bit(sharded_dir, tmp_path, dtype):
    """Quantizing each tensor as it is read gives the file load-then-quantize gives: every
    packed weight, scale and full-precision tensor, bit for bit."""
    streamed = load_quantized_openvla(sharded_dir, dtype=dtype, cache_dir=tmp_path / "cache")
    layers = [m for m in streamed.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(layer.cpu_runtime for layer in layers)  # the CPU kernel's layout, in place
    whole = load_openvla(sharded_dir, dtype=dtype)
    quantize_model(whole.model, 128, include=loader_module.quantization_patterns(False))
    save_quantized(whole.model, tmp_path / "whole.safetensors")
    assert_same_tensors(
        load_file(str(streamed.quantized_cache)), load_file(str(tmp_path / "whole.safetensors"))
    )
    with (
        safe_open(str(streamed.quantized_cache), "pt") as a,
        safe_open(str(tmp_path / "whole.safetensors"), "pt") as b,
    ):
        assert a.metadata() == b.metadata()
    assert_same_tensors(
        packed(streamed), {k: v for k, v in whole.model.state_dict().items() if k in packed(streamed)}
    )
    # and, independently of the loader, from the files: cast, then quantized per layer
    expected = {}
    for shard in sorted(sharded_dir.glob("model-*.safetensors")):
        for name, tensor in load_file(str(shard)).items():
            module = name.removesuffix(".weight")
            if f"{module}.qweight" in packed(streamed):
                linear = torch.nn.Linear(*reversed(tensor.shape), bias=False)
                linear.weight.data = tensor.to(dtype)
                reference = QuantLinear.from_linear(linear, 128)
                expected[f"{module}.qweight"], expected[f"{module}.scales"] = (
                    reference.qweight,
                    reference.scales,
                )
            else:
                expected[name] = tensor.to(dtype)
    assert_same_tensors(load_file(str(streamed.quantized_cache)), expected)


def test_streamed_7b_width_checkpoint_quantizes_as_load_then_quantize(random_7b, tmp_path):
    """OpenVLA-7B widths (2 LLM layers, real vision towers, 3 GB of bf16 shards): each packed
    layer is ``QuantLinear.from_linear`` of the file's weight in the load dtype, and every
    other tensor the file's, cast: what load-then-quantize gives, without loading it whole."""
    path, _ = random_7b
    streamed = load_quantized_openvla(path, cache_dir=tmp_path)
    assert streamed.model.language_model.config.hidden_size == 4096
    cached = load_file(str(streamed.quantized_cache))
    layers = {n: m for n, m in streamed.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 2 * 7
    for name, tensor, _file in loader_module.read_each(inspect_checkpoint(path).weight_files):
        module_name = name.removesuffix(".weight")
        if module_name in layers:
            linear = torch.nn.Linear(*reversed(tensor.shape), bias=False)
            linear.weight.data = tensor.float()
            reference = QuantLinear.from_linear(linear, 128)
            assert torch.equal(cached[f"{module_name}.qweight"], reference.qweight), name
            assert torch.equal(cached[f"{module_name}.scales"], reference.scales), name
            qweight, scales = layers[module_name].portable_tensors()  # back from the CPU layout
            assert torch.equal(qweight, reference.qweight) and torch.equal(scales, reference.scales)
        else:
            assert cached[name].dtype == torch.float32 and torch.equal(cached[name], tensor.float()), name


def test_default_dtype_is_bf16_for_a_7b_on_the_cpu_fp32_for_the_tiny_policy(tiny_openvla, random_7b):
    assert loader_module.default_dtype(tiny_openvla, "cpu") == torch.float32
    assert loader_module.default_dtype(random_7b[0], "cpu") == torch.bfloat16  # 1.4B parameters
    assert loader_module.default_dtype(tiny_openvla, "cuda") == torch.bfloat16


def test_truncated_or_misshapen_tensors_name_the_tensor_and_the_file(sharded_dir, tmp_path):
    weight_map = json.loads((sharded_dir / INDEX).read_text())["weight_map"]
    cut = tmp_path / "cut"
    shutil.copytree(sharded_dir, cut)
    shard = cut / weight_map[f"{Q_PROJ}.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(shard.name)} is not a readable .*truncated: tensor '"
    ):
        load_quantized_openvla(cut, cache_dir=tmp_path / "cache")
    wrong = tmp_path / "wrong"
    shutil.copytree(sharded_dir, wrong)
    shard = wrong / weight_map[f"{Q_PROJ}.weight"]
    tensors = load_file(str(shard))
    tensors[f"{Q_PROJ}.weight"] = tensors[f"{Q_PROJ}.weight"][:, :-2].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(shard.name)}: tensor '{Q_PROJ}.weight' has shape"
    ):
        load_quantized_openvla(wrong, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # nothing cached from a broken checkpoint


def test_quantized_cache_is_written_once_then_read_without_the_full_precision_weights(
    tiny_openvla, tmp_path, monkeypatch
):
    """The point of the cache: a 7B restart must not read 15 GB and re-quantize."""
    cache = tmp_path / "cache"
    first = load_quantized_openvla(tiny_openvla, cache_dir=cache)
    assert first.from_cache is False
    assert list(cache.iterdir()) == [first.quantized_cache]
    assert first.quantized_cache.suffix == ".safetensors"

    forbid_full_precision_reads(monkeypatch)
    second = load_quantized_openvla(tiny_openvla, cache_dir=cache)
    assert second.from_cache is True and second.quantized_cache == first.quantized_cache
    assert list(cache.iterdir()) == [first.quantized_cache]
    assert_same_tensors(packed(first), packed(second))
    assert_same_tensors(first.model.state_dict(), second.model.state_dict())
    for bits in (16, 4):
        a = VLAPolicy(first).predict(image(3), INSTRUCTION, bits)
        b = VLAPolicy(second).predict(image(3), INSTRUCTION, bits)
        assert np.array_equal(a.tokens, b.tokens)


def test_quantized_cache_key_follows_the_settings(tiny_openvla, tmp_path, monkeypatch):
    """Each setting that changes the packed weights has a cache entry of its own."""
    cache = tmp_path / "cache"
    settings = {
        "default": {},
        "group 64": {"group_size": 64},
        "vision too": {"quantize_vision": True},
        "bf16": {"dtype": torch.bfloat16},
    }
    files = {}
    for label, kwargs in settings.items():
        loaded = load_quantized_openvla(tiny_openvla, cache_dir=cache, **kwargs)
        assert loaded.from_cache is False, label
        files[label] = loaded.quantized_cache
    assert len(set(files.values())) == len(settings)
    assert sorted(cache.iterdir()) == sorted(files.values())

    forbid_full_precision_reads(monkeypatch)
    group = load_quantized_openvla(tiny_openvla, cache_dir=cache, group_size=64)
    vision = load_quantized_openvla(tiny_openvla, cache_dir=cache, quantize_vision=True)
    assert group.from_cache and group.quantized_cache == files["group 64"]
    assert vision.from_cache and vision.quantized_cache == files["vision too"]
    assert group.model.get_submodule(Q_PROJ).group_size == 64
    assert isinstance(vision.model.projector.fc1, QuantLinear)
    assert not isinstance(group.model.projector.fc1, QuantLinear)


def test_bfloat16_cache_entry_is_read_back(tiny_openvla, tmp_path):
    """The node loads in bf16 on CUDA: its second start must come from the cache."""
    first = load_quantized_openvla(tiny_openvla, cache_dir=tmp_path, dtype=torch.bfloat16)
    second = load_quantized_openvla(tiny_openvla, cache_dir=tmp_path, dtype=torch.bfloat16)
    assert second.from_cache and second.quantized_cache == first.quantized_cache
    assert_same_tensors(first.model.state_dict(), second.model.state_dict())


def test_quantized_cache_key_follows_the_checkpoint_files(sharded_dir, tmp_path):
    """Re-downloaded or fine-tuned files in the same directory are quantized afresh."""
    path = tmp_path / "openvla-tiny"
    shutil.copytree(sharded_dir, path)
    cache = tmp_path / "cache"
    first = load_quantized_openvla(path, cache_dir=cache)

    rewrite_config(path, dyqvla_note="edited")
    edited = load_quantized_openvla(path, cache_dir=cache)
    assert edited.from_cache is False and edited.quantized_cache != first.quantized_cache
    assert_same_tensors(packed(first), packed(edited))  # same weights, but quantized again

    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    shard = path / weight_map[f"{Q_PROJ}.weight"]
    tensors = load_file(str(shard))
    tensors[f"{Q_PROJ}.weight"] = tensors[f"{Q_PROJ}.weight"].flip(0).contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    retrained = load_quantized_openvla(path, cache_dir=cache)
    assert retrained.from_cache is False
    assert retrained.quantized_cache not in (first.quantized_cache, edited.quantized_cache)
    assert not torch.equal(packed(retrained)[f"{Q_PROJ}.qweight"], packed(edited)[f"{Q_PROJ}.qweight"])
    assert len(list(cache.iterdir())) == 3


def test_default_cache_dir_is_xdg_cache_home(tiny_openvla, tmp_path, monkeypatch):
    """Without cache_dir the cache follows XDG_CACHE_HOME and stays out of the home directory."""
    xdg, home = tmp_path / "xdg", tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("HOME", str(home))
    assert default_cache_dir() == xdg / "dyqvla_ros"
    loaded = load_quantized_openvla(tiny_openvla)
    assert loaded.quantized_cache is not None and loaded.quantized_cache.parent == xdg / "dyqvla_ros"
    assert list((xdg / "dyqvla_ros").iterdir()) == [loaded.quantized_cache]
    assert list(home.iterdir()) == []
    assert load_quantized_openvla(tiny_openvla).from_cache  # read at each call, still there
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == home / ".cache" / "dyqvla_ros"
