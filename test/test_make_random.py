"""[M] dyqvla-make-random: random-weight checkpoints in openvla-7b's files, written shard by shard.

The tiny size is loaded and run; the 7b size (two LLM layers, ~3 GB, conftest's
``random_7b``) is only checked through the safetensors headers and a few tensors here,
never loaded as a model (test_loader.py streams it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RANDOM_7B_SHARD
from safetensors import safe_open
from tokenizers import Tokenizer

from dyqvla_ros.model import ActionStats, VLAPolicy, load_openvla
from dyqvla_ros.model.config import OpenVLAConfig
from dyqvla_ros.model.loader import build_model, inspect_checkpoint
from dyqvla_ros.model.processing import EMPTY_TOKEN_ID
from dyqvla_ros.tools.make_random import (
    INDEX_FILE,
    INIT_STD,
    UNNORM_KEY,
    main,
    make_random_openvla,
    parse_size,
    plan_shards,
    random_config_dict,
)

FIXTURES = Path(__file__).parent / "fixtures"
INSTRUCTION = "put the red cube on the blue target"
SEED = 3
TINY_SHARD = "2MB"  # the tiny model's 9.8 MB of tensors in 4 shards (embeddings, lm_head alone)
SHARD_7B = RANDOM_7B_SHARD


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def headers(path: Path) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """{shard file: {tensor: (shape, safetensors dtype)}}, read from the headers only."""
    index = json.loads((path / INDEX_FILE).read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / name), framework="pt") as f:
            out[name] = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) checkpoint."""
    out = {}
    for file in inspect_checkpoint(path).weight_files:
        with safe_open(str(file), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def check_shards(path: Path, config: OpenVLAConfig, max_shard_size: str) -> int:
    """The shards and index as Hugging Face writes them, and exactly the model's tensors
    (names, shapes) in bf16; returns the number of shards."""
    index = json.loads((path / INDEX_FILE).read_text())
    found = headers(path)
    n = len(found)
    assert sorted(found) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (path / "model.safetensors").exists()
    assert index["weight_map"] == {k: file for file, names in found.items() for k in names}
    expected = {k: tuple(t.shape) for k, t in build_model(config, "meta").state_dict().items()}
    ours = {k: shape for names in found.values() for k, (shape, _) in names.items()}
    assert sorted(set(expected) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert {dtype for names in found.values() for _, dtype in names.values()} == {"BF16"}
    limit = parse_size(max_shard_size)
    sizes = {file: sum(2 * int(np.prod(s)) for s, _ in names.values()) for file, names in found.items()}
    assert all(size <= limit or len(found[file]) == 1 for file, size in sizes.items()), sizes
    assert index["metadata"]["total_size"] == sum(sizes.values())
    return n


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory) -> Path:
    return make_random_openvla(tmp_path_factory.mktemp("random") / "tiny", "tiny", SEED, None, TINY_SHARD)


def test_tiny_loads_in_shards_and_acts(tiny_random):
    assert check_shards(tiny_random, inspect_checkpoint(tiny_random).config, TINY_SHARD) >= 3
    loaded = load_openvla(tiny_random)
    policy = VLAPolicy(loaded, restrict_to_actions=True)
    action = policy.decode(policy.prefill(image(), INSTRUCTION), bits=16)
    assert np.isfinite(action.action).all()
    assert all(t in policy.action_tokenizer.token_ids for t in action.tokens)
    with torch.inference_mode():  # the whole forward is finite and not degenerate
        embeds = loaded.model.embed(policy.prompt_ids(INSTRUCTION), policy.preprocess(image()))
        logits = loaded.model.language_model(inputs_embeds=embeds).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_same_seed_same_files_other_seed_other_weights(tiny_random, tmp_path):
    again = make_random_openvla(tmp_path / "again", "tiny", SEED, None, TINY_SHARD)
    files = sorted(p.name for p in tiny_random.iterdir())
    assert sorted(p.name for p in again.iterdir()) == files
    assert [n for n in files if (tiny_random / n).read_bytes() != (again / n).read_bytes()] == []
    first, other = tensors(tiny_random), tensors(make_random_openvla(tmp_path / "other", "tiny", SEED + 1))
    drawn = [k for k, t in first.items() if t.dim() > 1]
    assert drawn and all(not torch.equal(first[k], other[k]) for k in drawn)


def test_layers_shorten_the_llm_and_keep_each_tensor(tiny_random, tmp_path):
    """Each tensor is drawn from its own name and the seed: one layer fewer changes no other."""
    fewer = make_random_openvla(tmp_path / "fewer", "tiny", SEED, layers=1, max_shard_size=TINY_SHARD)
    config = json.loads((fewer / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1
    check_shards(fewer, OpenVLAConfig.from_dict(config), TINY_SHARD)
    first, short = tensors(tiny_random), tensors(fewer)
    assert not any(".layers.1." in k for k in short) and any(".layers.2." in k for k in first)
    assert all(torch.equal(t, first[k]) for k, t in short.items())


def test_initialisation_keeps_the_forward_sane(tiny_random):
    weights = {k: t.float() for k, t in tensors(tiny_random).items()}
    assert all(bool((t == 0).all()) for k, t in weights.items() if k.endswith(".bias"))
    ones = [k for k, t in weights.items() if t.dim() == 1 and not k.endswith(".bias")]
    assert any("scale_factor" in k for k in ones) and any("layernorm" in k for k in ones)
    assert all(bool((weights[k] == 1).all()) for k in ones)
    embed = weights["language_model.model.embed_tokens.weight"]
    assert abs(embed.mean()) < 1e-3 and embed.std() == pytest.approx(INIT_STD, rel=0.02)


def test_7b_config_is_the_published_one():
    ours = random_config_dict("7b", seed=0)
    published = json.loads((FIXTURES / "openvla7b_config.json").read_text())
    differ = {k: (v, ours.get(k)) for k, v in published.items() if k != "text_config" and ours.get(k) != v}
    assert differ.keys() == {"transformers_version"}
    assert published["text_config"].items() <= ours["text_config"].items()
    a, b = OpenVLAConfig.from_dict(ours).llama_config(), OpenVLAConfig.from_dict(published).llama_config()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(a, field) == getattr(b, field), field
    split, meta = plan_shards(OpenVLAConfig.from_dict(ours), parse_size("5GB"))  # the default
    assert list(split.filename_to_tensors) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert split.metadata["total_size"] == sum(2 * t.numel() for t in meta.values())
    assert 15.0e9 < split.metadata["total_size"] < 15.2e9


def test_7b_files_match_the_model_without_loading_it(random_7b):
    path, _ = random_7b
    checkpoint = inspect_checkpoint(path)
    assert checkpoint.config.llama_config().num_hidden_layers == 2
    assert checkpoint.config.llama_config().hidden_size == 4096 and checkpoint.config.image_size == 224
    assert check_shards(path, checkpoint.config, SHARD_7B) == len(checkpoint.weight_files) >= 5
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    first = path / weight_map["vision_backbone.featurizer.blocks.0.attn.qkv.weight"]
    with safe_open(str(first), framework="pt") as f:
        assert bool((f.get_tensor("vision_backbone.featurizer.blocks.0.ls1.scale_factor") == 1).all())
        assert bool((f.get_tensor("vision_backbone.featurizer.blocks.0.attn.qkv.bias") == 0).all())
        assert f.get_tensor("vision_backbone.featurizer.blocks.0.attn.qkv.weight").float().std() == (
            pytest.approx(INIT_STD, rel=0.01)
        )
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))  # the real vocabulary layout
    assert tokenizer.get_vocab_size() == checkpoint.config.text_vocab_size + 1 == 32001
    assert tokenizer.token_to_id("<PAD>") == checkpoint.config.pad_token_id == 32000
    assert tokenizer.id_to_token(EMPTY_TOKEN_ID) == "▁"
    stats = json.loads((path / "dataset_statistics.json").read_text())
    assert ActionStats.select(stats, None).key == UNNORM_KEY and checkpoint.norm_stats == stats
    entry = stats[UNNORM_KEY]
    assert set(entry) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert set(entry["action"]) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert all(len(v) == 7 for v in [*entry["action"].values(), *entry["proprio"].values()])


def test_7b_peak_memory_is_one_shard(random_7b):
    path, stdout = random_7b
    match = re.search(r"peak RSS ([\d.]+) GB \(([\d.]+) GB before\)", stdout)
    assert match, stdout
    grown = (float(match.group(1)) - float(match.group(2))) * 1e9
    total = sum(f.stat().st_size for f in path.glob("model-*.safetensors"))
    assert total > 2e9 and grown < 1.5 * parse_size(SHARD_7B), stdout


def test_refuses_a_non_empty_directory_unless_forced(tiny_random, tmp_path, capsys):
    out = shutil.copytree(tiny_random, tmp_path / "out")
    (out / "notes.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), "--size", "tiny"])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    main([str(out), "--size", "tiny", "--force"])  # one shard now: no index, no old shard left
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "kept"
    assert load_openvla(out).config.raw["dyqvla_random_seed"] == 0
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "new"), "--max-shard-size", "5 parsecs"])
    assert exit_info.value.code == 2 and not (tmp_path / "new").exists()
