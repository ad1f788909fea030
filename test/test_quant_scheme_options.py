"""[H] The quantization-scheme options (rotation, activation_scales): the node's parameters,
the quantized cache, the CLI tools, and the scheme a calibration records."""

from __future__ import annotations

import logging
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dyqvla_ros.calibration import calibration_scheme, load_calibration, scheme_mismatch
from dyqvla_ros.model import CheckpointError
from dyqvla_ros.model import loader as loader_module
from dyqvla_ros.model.embedded import embedded_calibration_path
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.params import DEFAULT_ACTIVATION_SCALES, DEFAULT_ROTATION, PolicyParams
from dyqvla_ros.quant import QuantLinear, quantize_weight
from dyqvla_ros.tools import eval_sim, profile

Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"
SCHEMES = [(r, a) for r in ("none", "hadamard") for a in ("token", "group")]
REPO = Path(__file__).resolve().parents[1]


# --- node parameters --------------------------------------------------------------------


def test_scheme_parameters_default_to_hadamard_and_group_and_restart():
    params = PolicyParams()
    assert (params.rotation, params.activation_scales) == ("hadamard", "group")
    assert (DEFAULT_ROTATION, DEFAULT_ACTIVATION_SCALES) == ("hadamard", "group")
    declared = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())["/**"]["ros__parameters"]
    assert (declared["rotation"], declared["activation_scales"]) == ("hadamard", "group")
    with pytest.raises(ValueError, match="'rotation' applies when the model is loaded"):
        params.changed({"rotation": "none"}, configured=True)
    with pytest.raises(ValueError, match="'activation_scales' applies when the model is loaded"):
        params.changed({"activation_scales": "token"}, configured=True)
    for rotation, scales in SCHEMES:
        PolicyParams(rotation=rotation, activation_scales=scales, calibration_file="none").validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rotation": "givens"}, r"parameter 'rotation' must be one of \('none', 'hadamard'\), got 'givens'"),
        ({"rotation": ""}, r"parameter 'rotation' must be one of \('none', 'hadamard'\), got ''"),
        (
            {"activation_scales": "channel"},
            r"parameter 'activation_scales' must be one of \('token', 'group'\), got 'channel'",
        ),
    ],
)
def test_invalid_scheme_parameters_are_refused_naming_the_allowed_values(changes, message):
    with pytest.raises(ValueError, match=message):
        PolicyParams(**changes, calibration_file="none").validate()


# --- the quantized cache ------------------------------------------------------------------


def _layers(loaded) -> dict[str, QuantLinear]:
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    return layers


def test_each_scheme_has_its_own_cache_entry_and_layers_of_that_scheme(tiny_openvla, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    files = {}
    for rotation, scales in SCHEMES:
        loaded = load_quantized_openvla(
            tiny_openvla, cache_dir=cache, rotation=rotation, activation_scales=scales
        )
        assert not loaded.from_cache, (rotation, scales)
        assert {(m.rotation, m.activation_scales) for m in _layers(loaded).values()} == {(rotation, scales)}
        files[rotation, scales] = loaded.quantized_cache
    assert len(set(files.values())) == len(SCHEMES)
    assert sorted(cache.iterdir()) == sorted(files.values())
    keys = {loader_module._cache_key(tiny_openvla, 128, False, torch.float32, r, a) for r, a in SCHEMES}
    assert len(keys) == len(SCHEMES)

    def refuse(*_args, **_kwargs):
        raise AssertionError("quantized again instead of read from the cache")

    monkeypatch.setattr(loader_module, "_stream_into", refuse)
    for rotation, scales in SCHEMES:
        again = load_quantized_openvla(
            tiny_openvla, cache_dir=cache, rotation=rotation, activation_scales=scales
        )
        assert again.from_cache and again.quantized_cache == files[rotation, scales]
        assert {(m.rotation, m.activation_scales) for m in _layers(again).values()} == {(rotation, scales)}


def test_streamed_hadamard_weights_are_rotated_before_quantization(tiny_openvla, tmp_path):
    weight = load_file(str(tiny_openvla / "model.safetensors"))[f"{Q_PROJ}.weight"].float()
    for rotation in ("none", "hadamard"):
        loaded = load_quantized_openvla(tiny_openvla, cache_dir=tmp_path, rotation=rotation)
        qweight, scales = loaded.model.get_submodule(Q_PROJ).portable_tensors()
        expected_q, expected_s = quantize_weight(weight, 128, rotation)
        assert torch.equal(qweight, expected_q) and torch.equal(scales, expected_s), rotation
    plain, rotated = quantize_weight(weight, 128, "none"), quantize_weight(weight, 128, "hadamard")
    assert not torch.equal(plain[0], rotated[0])  # the comparison above tells them apart


def test_a_cache_file_of_another_scheme_is_refused(tiny_openvla, tmp_path):
    cache = tmp_path / "cache"
    plain = load_quantized_openvla(tiny_openvla, cache_dir=cache, rotation="none", activation_scales="token")
    rotated = load_quantized_openvla(
        tiny_openvla, cache_dir=cache, rotation="hadamard", activation_scales="group"
    )
    shutil.copyfile(plain.quantized_cache, rotated.quantized_cache)  # e.g. copied in by hand
    with pytest.raises(CheckpointError, match=r"quantized cache .* has .*'rotation': 'none'.* asks for"):
        load_quantized_openvla(tiny_openvla, cache_dir=cache, rotation="hadamard", activation_scales="group")


# --- the calibration's scheme -------------------------------------------------------------


def _calibration(path: Path, **scheme) -> Path:
    body = {"version": 1, "theta_24": 0.1, "theta_48": 0.3, **scheme}
    path.write_text(yaml.safe_dump({"dyqvla_calibration": body}))
    return path


def test_a_calibration_without_a_scheme_is_the_former_one(tmp_path):
    old = load_calibration(_calibration(tmp_path / "old.yaml"))  # written before [H]
    assert calibration_scheme(old) == {
        "rotation": "none",
        "activation_scales": "token",
        "group_size": 128,
    }
    assert scheme_mismatch(old, "c.yaml", {"rotation": "none", "activation_scales": "token"}) is None
    message = scheme_mismatch(old, "c.yaml", {"rotation": "hadamard", "activation_scales": "token"})
    assert "c.yaml" in message and "rotation none" in message and "rotation hadamard" in message


def test_node_warns_when_its_calibration_was_made_for_another_scheme(tmp_path):
    # The embedded policy's shipped calibration was made with the default scheme.
    shipped = load_calibration(embedded_calibration_path())
    assert calibration_scheme(shipped) == {
        "rotation": "hadamard",
        "activation_scales": "group",
        "group_size": 128,
    }
    assert PolicyParams().calibration_scheme_warning() is None
    warning = PolicyParams(rotation="none", activation_scales="token").calibration_scheme_warning()
    assert warning is not None and str(embedded_calibration_path()) in warning
    assert "rotation hadamard, activation_scales group" in warning
    assert "rotation none, activation_scales token" in warning
    assert (
        PolicyParams(weight_bits=16, rotation="none").calibration_scheme_warning() is None
    )  # nothing quantized
    assert PolicyParams(calibration_file="none", rotation="none").calibration_scheme_warning() is None
    made = _calibration(tmp_path / "c.yaml", rotation="hadamard", activation_scales="group", group_size=128)
    assert PolicyParams(calibration_file=str(made)).calibration_scheme_warning() is None
    warning = PolicyParams(calibration_file=str(made), group_size=64).calibration_scheme_warning()
    assert warning is not None and "group_size 128" in warning and "group_size 64" in warning


def _loop_args(calibration: Path, **options) -> Namespace:
    defaults = {
        "rotation": DEFAULT_ROTATION,
        "activation_scales": DEFAULT_ACTIVATION_SCALES,
        "group_size": 128,
    }
    return Namespace(model=None, calibration=str(calibration), **{**defaults, **options})


def test_eval_sim_warns_once_when_the_calibration_is_of_another_scheme(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(eval_sim, "_warned", set())
    old = _calibration(tmp_path / "old.yaml")  # no scheme recorded: none / token
    with caplog.at_level(logging.WARNING, logger=eval_sim.__name__):
        assert eval_sim.calibration_thresholds(_loop_args(old)) == {"theta_24": 0.1, "theta_48": 0.3}
        eval_sim.calibration_thresholds(_loop_args(old))  # a second mode: said once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(old) in warnings[0] and "rotation none" in warnings[0] and "rotation hadamard" in warnings[0]
    assert "activation_scales token" in warnings[0] and "activation_scales group" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=eval_sim.__name__):
        eval_sim.calibration_thresholds(_loop_args(old, rotation="none", activation_scales="token"))
        made = _calibration(
            tmp_path / "new.yaml", rotation="hadamard", activation_scales="group", group_size=128
        )
        eval_sim.calibration_thresholds(_loop_args(made))
    assert not caplog.records


def test_eval_sim_and_sensitivity_load_the_scheme_asked_for(tmp_path, monkeypatch):
    asked = []

    def spy(path, **kwargs):
        asked.append(kwargs)
        raise CheckpointError("stop here")

    monkeypatch.setattr(eval_sim, "load_quantized_openvla", spy)
    from dyqvla_ros.tools import sensitivity

    for main, argv in (
        (eval_sim.main, ["--rotation", "none", "--activation-scales", "token"]),
        (eval_sim.main, []),
        (sensitivity.main, ["--rotation", "hadamard", "--activation-scales", "token", "--group-size", "32"]),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert [(k["rotation"], k["activation_scales"], k["group_size"]) for k in asked] == [
        ("none", "token", 128),
        (DEFAULT_ROTATION, DEFAULT_ACTIVATION_SCALES, 128),
        ("hadamard", "token", 32),
    ]
    with pytest.raises(SystemExit):
        eval_sim.main(["--rotation", "givens"])


def test_profile_records_the_scheme_it_profiled_with(tiny_openvla, tmp_path, monkeypatch, capsys):
    from dyqvla_ros.bags.synthetic import write_episodes

    bag = write_episodes(tmp_path / "bag", episodes=1, seed=3)
    asked = []
    real = profile.load_quantized_openvla

    def spy(path, device, **kwargs):
        asked.append(kwargs)
        return real(path, device, **kwargs)

    monkeypatch.setattr(profile, "load_quantized_openvla", spy)
    out = tmp_path / "calib"
    options = ["--model", str(tiny_openvla), "--rate", "3", "--bins", "3", "--w-macro", "4", "--w-micro", "2"]
    profile.main(
        [str(bag), "--out", str(out), *options, "--rotation", "none", "--activation-scales", "group"]
    )
    assert [(k["rotation"], k["activation_scales"]) for k in asked] == [("none", "group")]
    calibration = load_calibration(out / "calibration.yaml")
    assert calibration_scheme(calibration) == {
        "rotation": "none",
        "activation_scales": "group",
        "group_size": 128,
    }
    assert {"rotation", "activation_scales", "group_size"} <= set(calibration)  # written, not defaulted
    path = str(out / "calibration.yaml")
    assert PolicyParams(calibration_file=path, rotation="none").calibration_scheme_warning() is None
    warning = PolicyParams(calibration_file=path).calibration_scheme_warning()
    assert "rotation none" in warning and "rotation hadamard" in warning
