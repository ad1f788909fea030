"""[C, second part] Behaviour cloning on collected expert episodes: learns, saves, resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco", reason="mujoco is not installed")

from test_sim import _renderer_available

from dyqvla_ros.bags.store import BagError
from dyqvla_ros.model import VLAPolicy, load_openvla
from dyqvla_ros.model.tiny import ensure_tiny_openvla
from dyqvla_ros.sim.collect import collect
from dyqvla_ros.sim.expert import STATE_FIELDS
from dyqvla_ros.tools import train
from dyqvla_ros.training import (
    AUX_FILE,
    STATE_FILE,
    UNNORM_KEY,
    BehaviourCloning,
    action_statistics,
    load_samples,
    patch_blocks,
)


@pytest.fixture(scope="module")
def expert_bag(tmp_path_factory):
    reason = _renderer_available()
    if reason:
        pytest.skip(reason)
    bag = tmp_path_factory.mktemp("sim") / "expert"
    collect(bag, episodes=1, seed=2, size=64)
    return bag


def test_samples_and_statistics(expert_bag):
    samples = load_samples([expert_bag])
    assert len(samples) >= 20 and all(s.action.shape == (7,) for s in samples)
    assert samples[0].instruction.startswith("put the ")
    stats = action_statistics(np.stack([s.action for s in samples]))
    assert stats["mask"] == [True] * 6 + [False]
    assert all(lo <= hi for lo, hi in zip(stats["q01"], stats["q99"], strict=True))
    assert all(s.state.shape == (len(STATE_FIELDS),) for s in samples)


def test_auxiliary_targets_are_learned_and_need_sim_state(expert_bag):
    torch.manual_seed(0)
    samples = load_samples([expert_bag])[:8]
    run = BehaviourCloning(
        load_openvla(ensure_tiny_openvla()), samples, 1e-3, 0, total_steps=30, shift=0, aux_weight=1.0
    )
    aux = [run.train_step(8)[1] for _ in range(30)]
    assert aux[-1] < 0.5 * aux[0]
    samples[0].state = None
    with pytest.raises(BagError, match="/sim_state"):
        BehaviourCloning(load_openvla(ensure_tiny_openvla()), samples, 1e-3, 0, aux_weight=1.0)


def test_loss_decreases_when_fitting_one_sample(expert_bag):
    torch.manual_seed(0)
    samples = load_samples([expert_bag])[:1]
    run = BehaviourCloning(
        load_openvla(ensure_tiny_openvla()), samples, lr=1e-3, seed=0, total_steps=20, shift=0
    )
    losses = [run.train_step(1)[0] for _ in range(20)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.85 * losses[0]


def test_batched_loss_equals_the_mean_of_single_sample_losses(expert_bag):
    """Right padding never leaks into the action positions: a batch of prompts of different
    lengths gives the mean of each sample's own loss."""
    samples = load_samples([expert_bag])
    samples[1].instruction = "put the green cube on the blue target"  # a longer prompt than [0]
    run = BehaviourCloning(load_openvla(ensure_tiny_openvla()), samples[:2], lr=1e-3, seed=0, shift=0)
    run.model.eval()
    with torch.no_grad():
        batch = run.loss(np.array([0, 1]), augment=False)
        single = [run.loss(np.array([i]), augment=False) for i in (0, 1)]
    assert len(run.prompts[0]) != len(run.prompts[1])
    assert float(batch) == pytest.approx(float(sum(single)) / 2, rel=1e-5)


def test_token_noise_corrupts_only_the_teacher_forced_inputs(expert_bag):
    """With token noise the inputs after the prompt are random action tokens (the labels
    stay), so the batch loss changes; without augmentation (evaluation) it is the clean one."""
    samples = load_samples([expert_bag])[:4]
    run = BehaviourCloning(load_openvla(ensure_tiny_openvla()), samples, 1e-3, 0, shift=0, token_noise=1.0)
    run.model.eval()
    clean = BehaviourCloning(load_openvla(ensure_tiny_openvla()), samples, 1e-3, 0, shift=0)
    clean.model.eval()
    batch = np.arange(4)
    with torch.no_grad():
        assert float(run.loss(batch, augment=False)) == pytest.approx(float(clean.loss(batch, augment=False)))
        assert float(run.loss(batch)) != pytest.approx(float(clean.loss(batch)), rel=1e-4)


def test_learning_rate_warms_up_then_decays_to_a_tenth(expert_bag):
    run = BehaviourCloning(
        load_openvla(ensure_tiny_openvla()),
        load_samples([expert_bag])[:1],
        1e-3,
        0,
        total_steps=100,
        warmup=10,
    )
    assert run.learning_rate(0) == pytest.approx(1e-4)
    assert run.learning_rate(9) == pytest.approx(1e-3)
    assert run.learning_rate(10) == pytest.approx(1e-3)
    assert run.learning_rate(55) == pytest.approx(0.55e-3)
    assert run.learning_rate(100) == pytest.approx(1e-4)


def test_random_shift_moves_frames_within_bounds(expert_bag):
    run = BehaviourCloning(
        load_openvla(ensure_tiny_openvla()), load_samples([expert_bag])[:4], 1e-3, 0, shift=4
    )
    frames = run.frames[:4]
    shifted, moved = run._augment(frames)
    assert shifted.shape == frames.shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, frames)
    # interior pixels are the originals moved by the reported (right, down) offset
    assert moved.shape == (4, 2) and moved.abs().max() <= 4
    for k in range(4):
        dx, dy = (int(v) for v in moved[k])
        inner = frames[k, 8:-8, 8:-8]
        h, w = inner.shape[:2]
        assert torch.equal(shifted[k, 8 + dy : 8 + dy + h, 8 + dx : 8 + dx + w], inner)


def test_patch_blocks_are_the_four_patches_around_a_point():
    mask, inside = patch_blocks(torch.tensor([[20.0, 40.0], [2.0, 2.0], [-1.0, 5.0]]), patch=16, grid=4)
    grid = mask.reshape(3, 4, 4)  # (point, row, column)
    assert grid[0].nonzero().tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]  # at (0.75, 2.0) patch centres
    assert grid[1].nonzero().tolist() == [[0, 0]]  # corner: the block is clipped to the image
    assert inside.tolist() == [True, True, False]


def test_attention_supervision_points_heads_at_the_instructed_objects(expert_bag):
    """The supervised heads learn to look at the instructed cube, target zone and hand
    (the loss is -log of their attention mass there), and the supervision needs /ee_pose."""
    torch.manual_seed(0)
    samples = load_samples([expert_bag])[:8]
    assert all(s.hand is not None and s.hand.shape == (3,) for s in samples)
    run = BehaviourCloning(
        load_openvla(ensure_tiny_openvla()), samples, 3e-3, 0, total_steps=40, shift=2, attention_weight=1.0
    )
    attention = [run.train_step(8)[2] for _ in range(40)]
    assert attention[0] > 1.0  # about uniform over the image at first
    assert attention[-1] < 0.5 * attention[0]
    samples[0].hand = None
    with pytest.raises(BagError, match="/ee_pose"):
        BehaviourCloning(load_openvla(ensure_tiny_openvla()), samples, 1e-3, 0, attention_weight=1.0)


def test_train_saves_a_loadable_checkpoint_and_resumes(expert_bag, tmp_path):
    out = tmp_path / "policy"
    common = ["--batch", "1", "--aux-weight", "0.5", "--attention-weight", "0.5"]
    train.main([str(expert_bag), "--out", str(out), "--steps", "2", "--save-every", "1", *common])
    assert (out / AUX_FILE).is_file()
    stats = json.loads((out / "dataset_statistics.json").read_text())
    assert list(stats) == [UNNORM_KEY]
    policy = VLAPolicy(load_openvla(out), restrict_to_actions=True)
    assert policy.stats.key == UNNORM_KEY and policy.action_decoding == "argmax"
    assert np.isfinite(
        policy.predict(np.zeros((64, 64, 3), np.uint8), "put the red cube on the blue target").action
    ).all()
    train.main(
        [
            str(expert_bag),
            "--out",
            str(out),
            "--steps",
            "3",
            "--resume",
            "--action-decoding",
            "median",
            *common,
        ]
    )
    assert VLAPolicy(load_openvla(out)).action_decoding == "median"  # written to config.json
    from safetensors import safe_open

    with safe_open(str(out / STATE_FILE), framework="pt") as f:
        assert f.metadata()["step"] == "3"
    with pytest.raises(SystemExit):
        train.main([str(expert_bag), "--out", str(tmp_path / "none"), "--steps", "1", "--resume"])
