"""[M] OpenVLA implementation: tiny model round trips, tokenizers, loader errors, 7B names."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from dyqvla_ros.model import ActionStats, ActionTokenizer, CheckpointError, VLAPolicy, load_openvla
from dyqvla_ros.model.config import OpenVLAConfig
from dyqvla_ros.model.loader import LoadedOpenVLA, build_model, load_quantized_openvla
from dyqvla_ros.model.policy import _CACHE_KWARG, median_action_token
from dyqvla_ros.model.processing import EMPTY_TOKEN_ID, PROMPT_TEMPLATE, prompt_ids, validate_image
from dyqvla_ros.model.tiny import TINY_UNNORM_KEY, build_tokenizer, make_tiny_openvla
from dyqvla_ros.quant import activation_bits

FIXTURES = Path(__file__).parent / "fixtures"
INSTRUCTION = "put the red cube on the blue target"


@pytest.fixture(scope="module")
def tiny_dir(tiny_openvla) -> Path:
    return tiny_openvla


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_openvla(tiny_dir)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tiny_is_deterministic_and_small(tiny_dir, tmp_path):
    again = make_tiny_openvla(tmp_path / "again", seed=0)
    a, b = load_file(str(tiny_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    size = sum(f.stat().st_size for f in tiny_dir.iterdir())
    assert size < 25e6
    config = json.loads((tiny_dir / "config.json").read_text())
    published = json.loads((FIXTURES / "openvla7b_config.json").read_text())
    assert set(published) <= set(config)  # every published field is present


def test_save_load_gives_identical_actions(tiny_dir, tiny):
    again = load_openvla(tiny_dir)
    file = load_file(str(tiny_dir / "model.safetensors"))
    state = again.model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in file.items())
    a = VLAPolicy(tiny).predict(image(), INSTRUCTION)
    b = VLAPolicy(again).predict(image(), INSTRUCTION)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.action, b.action)


def test_tiny_tokenizer_has_whole_words_and_falls_back_to_characters():
    tokenizer = build_tokenizer()
    ids = prompt_ids(tokenizer, "put the red cube on the green target")[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for word in ("put", "red", "cube", "green", "target", "What", "robot"):
        assert f"▁{word}" in tokens
    assert len(ids) == 25  # 85 with characters only
    assert len(set(ids)) > 15 and max(ids) < 32000 - 256  # no word token among the action tokens
    text = "stack the mauve prism, then reddish ünïcode"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids[1:]) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "▁the" in tokens and "▁stack" not in tokens and "k" in tokens  # unlisted words: pieces


def test_prompt_follows_openvla(tiny):
    ids = prompt_ids(tiny.tokenizer, INSTRUCTION)
    assert ids[0, 0].item() == tiny.tokenizer.bos_token_id == 1
    assert ids[0, -1].item() == EMPTY_TOKEN_ID  # appended after "Out:"
    text = tiny.tokenizer.decode(ids[0, 1:-1])
    assert text == PROMPT_TEMPLATE.format(instruction=INSTRUCTION)
    assert tiny.tokenizer.convert_tokens_to_ids("<PAD>") == 32000
    assert len(tiny.tokenizer) == 32001
    with pytest.raises(ValueError, match="instruction"):
        prompt_ids(tiny.tokenizer, "  ")


def test_action_tokenizer_against_hand_computed_values():
    tok = ActionTokenizer(vocab_size=32000, n_bins=256)
    assert tok.token_ids == range(31744, 32000)
    # token 31999 -> bin 0 -> centre of [-1, -1 + 2/255]; 31744 -> bin 255 -> clipped to 254
    expected = [-1 + 1 / 255, -1 + 3 / 255, 1 - 1 / 255, 1 - 1 / 255, -1 + 1 / 255]
    assert np.allclose(tok.decode([31999, 31998, 31745, 31744, 32063]), expected)
    assert np.allclose(tok.decode(tok.encode(np.array([-0.5, 0.0, 0.7]))), [-0.5, 0.0, 0.7], atol=1 / 255)


def test_unnormalisation_and_keys():
    norm_stats = {
        "a": {"action": {"q01": [-1.0, 0.0, 0.0], "q99": [1.0, 2.0, 1.0], "mask": [True, True, False]}},
        "b": {"action": {"q01": [0.0], "q99": [1.0]}},
    }
    stats = ActionStats.select(norm_stats, "a")
    # 0.5 * (a + 1) * (q99 - q01) + q01 where masked; the gripper stays as is
    assert np.allclose(stats.unnormalize(np.array([0.5, -1.0, 0.25])), [0.5, 0.0, 0.25])
    assert np.allclose(stats.normalize(stats.unnormalize(np.array([0.5, -0.2, 1.0]))), [0.5, -0.2, 1.0])
    with pytest.raises(ValueError, match=r"several datasets.*\['a', 'b'\]"):
        ActionStats.select(norm_stats, None)
    with pytest.raises(ValueError, match=r"'c' not found; available keys: \['a', 'b'\]"):
        ActionStats.select(norm_stats, "c")
    assert ActionStats.select({"only": norm_stats["b"]}, None).key == "only"


def test_decode_at_16_bits_matches_transformers_generate(tiny):
    policy = VLAPolicy(tiny)
    img = image(1)
    action = policy.predict(img, INSTRUCTION, bits=16)
    with torch.inference_mode():
        ids = prompt_ids(tiny.tokenizer, INSTRUCTION)
        embeds = tiny.model.embed(ids, policy.preprocess(img))
        generated = tiny.model.language_model.generate(
            inputs_embeds=embeds, max_new_tokens=7, do_sample=False
        )
    assert generated[0].tolist() == action.tokens.tolist()
    assert action.action.shape == (7,)


def test_median_action_token_is_the_median_bin_in_value_order():
    ids = range(92, 100)  # 8 action tokens; id 99 decodes to the lowest bin, 92 (clipped) the highest
    probs = torch.full((1, 100), 1e-12)
    probs[0, [99, 98, 97, 96]] = 0.19  # a move whose length the model is unsure of: 76 % ...
    probs[0, 94] = 0.24  # ... against "stay", the most likely single bin
    probs[0, 10] = 1e6  # a text token: not an action, ignored
    logits = probs.log()
    assert logits[:, ids.start :].argmax().item() + ids.start == 94
    assert median_action_token(logits, ids).tolist() == [[97]]  # cumulative 0.19, 0.38, 0.57
    one = torch.full((2, 100), -1e9)
    one[0, 95], one[1, 92] = 0.0, 0.0  # all mass on one bin (the last one clipped): that bin
    assert median_action_token(one, ids).tolist() == [[95], [92]]


def test_action_decoding_comes_from_the_checkpoint(tiny, tiny_dir, tmp_path):
    assert VLAPolicy(tiny).action_decoding == "argmax"  # OpenVLA's, and any checkpoint without the field
    copy = tmp_path / "median"
    shutil.copytree(tiny_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "dyqvla_action_decoding": "median"}))
    policy = VLAPolicy(load_openvla(copy))
    assert policy.action_decoding == "median"
    action = policy.predict(image(5), INSTRUCTION)
    assert all(t in policy.action_tokenizer.token_ids for t in action.tokens)
    assert VLAPolicy(load_openvla(copy), action_decoding="argmax").action_decoding == "argmax"
    with pytest.raises(ValueError, match="action_decoding must be one of"):
        VLAPolicy(tiny, action_decoding="mode")
    (copy / "config.json").write_text(json.dumps({**config, "dyqvla_action_decoding": "mode"}))
    with pytest.raises(CheckpointError, match="dyqvla_action_decoding must be one of"):
        load_openvla(copy)


def test_prefill_can_be_decoded_repeatedly(tiny):
    policy = VLAPolicy(tiny)
    state = policy.prefill(image(2), INSTRUCTION)
    first = policy.decode(state, 16)
    assert state.cache.get_seq_length() == state.length + 7  # last prompt token + 6 generated fed back
    assert np.array_equal(policy.decode(state, 16).tokens, first.tokens)


def test_every_bit_width_on_the_quantized_tiny_model(tiny_dir, tmp_path):
    loaded = load_quantized_openvla(tiny_dir, cache_dir=tmp_path)
    policy = VLAPolicy(loaded, restrict_to_actions=True)
    state = policy.prefill(image(3), INSTRUCTION)
    for bits in (16, 8, 4, 2):
        action = policy.decode(state, bits)
        assert action.bits == bits and action.action.shape == (7,)
        assert np.all(np.isfinite(action.action))
        assert all(t in policy.action_tokenizer.token_ids for t in action.tokens)
        stats = policy.stats
        assert np.all(action.action[stats.mask] >= stats.q01[stats.mask] - 1e-9)
    with pytest.raises(ValueError, match="not quantized"):
        VLAPolicy(load_openvla(tiny_dir)).predict(image(), INSTRUCTION, bits=4)


# "The same computation": tighter than any bit-width changes the tiny model's distributions.
SAME = {"rtol": 1e-5, "atol": 1e-8}


@pytest.fixture(scope="module")
def quantized_tiny(tiny_dir, tmp_path_factory) -> LoadedOpenVLA:
    return load_quantized_openvla(tiny_dir, cache_dir=tmp_path_factory.mktemp("w4"))


def decode_by_hand(
    loaded: LoadedOpenVLA, image: np.ndarray, prefill_bits: int, bits: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy decode over the action tokens, written out here: the prompt (all but its last
    token) under ``activation_bits(prefill_bits)``, the 7 tokens under ``activation_bits(bits)``.
    Returns the tokens and each step's softmax over the action tokens."""
    model, lm = loaded.model, loaded.model.language_model
    actions = ActionTokenizer(loaded.config.text_vocab_size, loaded.config.n_action_bins).token_ids
    ids = prompt_ids(loaded.tokenizer, INSTRUCTION)
    pixels = VLAPolicy(loaded).preprocess(image)
    cache = DynamicCache(config=lm.config)
    with torch.inference_mode():
        with activation_bits(model, prefill_bits):
            embeds = model.embed(ids[:, :-1], pixels)
            lm(inputs_embeds=embeds, use_cache=True, **{_CACHE_KWARG: cache})
        token, tokens, probs = ids[:, -1:], [], []
        with activation_bits(model, bits):
            for _ in range(7):
                logits = lm(input_ids=token, use_cache=True, **{_CACHE_KWARG: cache}).logits[0, -1]
                scores = logits[actions.start : actions.stop].float()
                probs.append(torch.softmax(scores, -1))
                token = torch.tensor([[actions.start + int(scores.argmax())]])
                tokens.append(int(token))
    return tokens, torch.stack(probs)


def test_decode_runs_at_the_bits_it_reports(quantized_tiny):
    """decode(state, b) is the computation under activation_bits(model, b), token for token
    and distribution for distribution; and a 2-bit decode is not the 16-bit one."""
    policy = VLAPolicy(quantized_tiny, restrict_to_actions=True)
    policy.keep_distributions = True
    state = policy.prefill(image(3), INSTRUCTION)
    decoded = {}
    for bits in (16, 8, 4, 2):
        action = policy.decode(state, bits)
        tokens, probs = decode_by_hand(quantized_tiny, image(3), 16, bits)
        assert action.bits == bits and policy.active_bits() == 16  # restored after the step
        assert action.tokens.tolist() == tokens, bits
        torch.testing.assert_close(torch.from_numpy(action.distributions), probs, **SAME)
        decoded[bits] = probs
    assert not torch.allclose(decoded[2], decoded[16], **SAME)


def test_prefill_bits_below_16_and_follow(quantized_tiny):
    """``prefill_bits`` 8 runs the prompt at 8 bits; ``follow`` at the previous decode's bits
    (16 before any decode). Each equals the computation written out by hand."""
    at8 = VLAPolicy(quantized_tiny, prefill_bits=8, restrict_to_actions=True)
    at8.keep_distributions = True
    state = at8.prefill(image(4), INSTRUCTION)
    action = at8.decode(state, 16)
    tokens, probs = decode_by_hand(quantized_tiny, image(4), 8, 16)
    assert state.bits == 8 and action.tokens.tolist() == tokens
    torch.testing.assert_close(torch.from_numpy(action.distributions), probs, **SAME)
    assert not torch.allclose(probs, decode_by_hand(quantized_tiny, image(4), 16, 16)[1], **SAME)

    follow = VLAPolicy(quantized_tiny, prefill_bits="follow", restrict_to_actions=True)
    follow.keep_distributions = True
    assert follow.prefill(image(4), INSTRUCTION).bits == 16  # nothing decoded yet
    follow.decode(follow.prefill(image(4), INSTRUCTION), 4)
    state = follow.prefill(image(5), INSTRUCTION)
    action = follow.decode(state, 2)
    tokens, probs = decode_by_hand(quantized_tiny, image(5), 4, 2)
    assert state.bits == 4 and action.tokens.tolist() == tokens
    torch.testing.assert_close(torch.from_numpy(action.distributions), probs, **SAME)
    assert follow.prefill(image(5), INSTRUCTION).bits == 2
    with pytest.raises(ValueError, match="needs a quantized model"):
        VLAPolicy(load_openvla(quantized_tiny.path), prefill_bits=8)


def test_quantized_checkpoint_round_trip(tiny_dir, tmp_path):
    first = load_quantized_openvla(tiny_dir, cache_dir=tmp_path, group_size=64)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1
    second = load_quantized_openvla(tiny_dir, cache_dir=tmp_path, group_size=64)
    for bits in (16, 4):
        a = VLAPolicy(first).predict(image(4), INSTRUCTION, bits)
        b = VLAPolicy(second).predict(image(4), INSTRUCTION, bits)
        assert np.array_equal(a.tokens, b.tokens)
    assert second.model.language_model.model.layers[0].self_attn.q_proj.group_size == 64


def test_quantize_vision_and_projector_too(tiny_dir, tmp_path):
    loaded = load_quantized_openvla(tiny_dir, cache_dir=tmp_path, group_size=32, quantize_vision=True)
    from dyqvla_ros.quant import QuantLinear

    model = loaded.model
    assert isinstance(model.projector.fc1, QuantLinear)
    assert isinstance(model.vision_backbone.featurizer.blocks[0].attn.qkv, QuantLinear)
    assert not isinstance(model.language_model.lm_head, QuantLinear)
    action = VLAPolicy(loaded).predict(image(5), INSTRUCTION, bits=8)
    assert np.all(np.isfinite(action.action))


def test_center_crop_keeps_the_middle(tiny):
    """LIBERO-style crop: 90 % of the area around the centre, resized back to 224."""
    img = np.zeros((100, 100, 3), np.uint8)
    img[:2] = 255  # a white band at the top: the crop keeps the central 95 x 95 (rows 2..96)
    black = (0.0 - 0.485) / 0.229  # DINOv2 normalisation of a black pixel, red channel
    assert VLAPolicy(tiny).preprocess(img)[0, 0, 0, 112] > 0  # band visible without the crop
    assert VLAPolicy(tiny, center_crop=True).preprocess(img)[0, 0, 0, 112] == pytest.approx(black, abs=1e-4)


def test_static_cache_decode_matches_dynamic_cache(tiny_dir, tmp_path):
    loaded = load_quantized_openvla(tiny_dir, cache_dir=tmp_path)
    dynamic, static = VLAPolicy(loaded), VLAPolicy(loaded)
    static.use_static_cache(max_cache_len=400)
    for seed in (6, 7):
        d_state, s_state = dynamic.prefill(image(seed), INSTRUCTION), static.prefill(image(seed), INSTRUCTION)
        assert s_state.cache is static._static_cache  # one preallocated cache, reused
        for bits in (16, 4, 2):
            assert np.array_equal(static.decode(s_state, bits).tokens, dynamic.decode(d_state, bits).tokens)
    with pytest.raises(ValueError, match="does not fit the static cache"):
        VLAPolicy(loaded).use_static_cache(max_cache_len=80)  # 64 image patches + a ~50-token prompt


def test_cuda_graphs_fall_back_to_eager_on_the_cpu(tiny):
    policy = VLAPolicy(tiny)
    assert policy.enable_cuda_graphs() is False
    assert "need a CUDA device" in policy.graph_status
    assert policy.predict(image(), INSTRUCTION).tokens.shape == (7,)


def test_image_validation():
    for bad in (
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 4), np.uint8),
    ):
        with pytest.raises(ValueError, match="RGB uint8"):
            validate_image(bad)


def test_preprocessing_normalises_per_backbone(tiny):
    policy = VLAPolicy(tiny)
    pixels = policy.preprocess(np.full((50, 70, 3), 128, np.uint8))
    assert pixels.shape == (1, 6, 128, 128)  # the tiny model's image size
    v = 128 / 255
    dino = [(v - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert torch.allclose(pixels[0, :3, 100, 100], torch.tensor(dino), atol=1e-5)
    assert torch.allclose(pixels[0, 3:, 100, 100], torch.tensor([(v - 0.5) / 0.5] * 3), atol=1e-5)


def break_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_loader_errors_are_specific(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_openvla(tmp_path / "nope")

    cases = {}
    cases["no config.json"] = lambda p: (p / "config.json").unlink()
    cases["unsupported config: model_type must be 'openvla'"] = lambda p: break_config(p, model_type="llava")
    cases["text_config.model_type must be 'llama'"] = lambda p: break_config(
        p, text_config={"model_type": "mistral"}
    )
    cases["has no tokenizer"] = lambda p: (p / "tokenizer.json").unlink()
    cases["no dataset_statistics.json and config.json has no norm_stats"] = lambda p: (
        (p / "dataset_statistics.json").unlink(),
        break_config(p, norm_stats=None),
    )
    cases["no model.safetensors nor model.safetensors.index.json"] = lambda p: (
        p / "model.safetensors"
    ).unlink()
    cases["missing weight shards"] = lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    )
    cases["not a readable safetensors file"] = lambda p: (p / "model.safetensors").write_bytes(b"garbage")

    def reshape(p: Path) -> None:
        tensors = load_file(str(p / "model.safetensors"))
        tensors["projector.fc3.bias"] = torch.zeros(3)
        save_file(tensors, str(p / "model.safetensors"))

    cases[re.escape("tensor 'projector.fc3.bias' has shape (3,), the model expects (64,)")] = reshape

    def rename(p: Path) -> None:
        tensors = load_file(str(p / "model.safetensors"))
        tensors["projector.fc4.bias"] = tensors.pop("projector.fc3.bias")
        save_file(tensors, str(p / "model.safetensors"))

    cases[re.escape("model.safetensors: tensor 'projector.fc4.bias' is not a parameter of this model")] = (
        rename
    )

    def drop(p: Path) -> None:
        tensors = load_file(str(p / "model.safetensors"))
        del tensors["projector.fc3.bias"]
        save_file(tensors, str(p / "model.safetensors"))

    cases[r"1 tensors missing from the checkpoint, e.g. \['projector.fc3.bias'\]"] = drop

    for i, (message, damage) in enumerate(cases.items()):
        broken = copy_checkpoint(tiny_dir, tmp_path / f"case{i}")
        damage(broken)
        with pytest.raises(CheckpointError, match=message):
            load_openvla(broken)


def expand_fixture() -> dict[str, list[int]]:
    fixture = json.loads((FIXTURES / "openvla7b_params.json").read_text())
    expected = {}
    for group in fixture["groups"]:
        prefix = group["prefix"]
        expected |= {prefix + k: v for k, v in group["top"].items()}
        for i in range(group.get("count", 0)):
            expected |= {f"{prefix}{group['repeat']}.{i}.{k}": v for k, v in group["each"].items()}
    return expected


def test_7b_architecture_matches_published_checkpoint_names():
    config = OpenVLAConfig.from_dict(json.loads((FIXTURES / "openvla7b_config.json").read_text()))
    model = build_model(config, device="meta")
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    expected = expand_fixture()
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    mismatched = {k: (ours[k], v) for k, v in expected.items() if ours[k] != v}
    assert mismatched == {}
    assert 7.4e9 < sum(np.prod(v) for v in expected.values()) < 7.6e9
    assert config.text_vocab_size == 32000


def test_tiny_unnorm_key(tiny):
    assert VLAPolicy(tiny).stats.key == TINY_UNNORM_KEY
    assert VLAPolicy(tiny, unnorm_key=TINY_UNNORM_KEY).action_dim == 7


def test_ensure_tiny_rebuilds_what_older_code_left(tmp_path):
    """A tiny checkpoint is reused only if this code would build the same one: a directory
    left by older code (another build id, e.g. before whole-word tokens) is rebuilt."""
    from dyqvla_ros.model.tiny import ensure_tiny_openvla, tiny_build_id

    path = ensure_tiny_openvla(tmp_path / "tiny")
    weights = path / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert ensure_tiny_openvla(path) == path and weights.stat().st_mtime_ns == built  # reused
    config = json.loads((path / "config.json").read_text())
    assert config["dyqvla_tiny_build"] == tiny_build_id(0)
    (path / "config.json").write_text(json.dumps({**config, "dyqvla_tiny_build": "older"}))
    ensure_tiny_openvla(path)
    assert json.loads((path / "config.json").read_text())["dyqvla_tiny_build"] == tiny_build_id(0)
    assert weights.stat().st_mtime_ns != built  # rebuilt
