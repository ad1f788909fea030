"""[C, second part] Behaviour cloning on collected expert episodes: learns, saves, resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dyqvla_ros.bags.store import BagError, iter_messages
from dyqvla_ros.model import CheckpointError, VLAPolicy, load_openvla
from dyqvla_ros.sim.collect import collect
from dyqvla_ros.sim.expert import STATE_FIELDS
from dyqvla_ros.tools import average, train
from dyqvla_ros.training import (
    AUX_FILE,
    EMA_WARMUP_POWER,
    RAW,
    STATE_FILE,
    UNNORM_KEY,
    BehaviourCloning,
    action_statistics,
    average_checkpoints,
    load_samples,
    patch_blocks,
)


@pytest.fixture(scope="module")
def expert_bag(renderer, tmp_path_factory):
    bag = tmp_path_factory.mktemp("sim") / "expert"
    collect(bag, episodes=1, seed=2, size=64)
    return bag


def test_samples_and_statistics(expert_bag):
    """One sample per labelled step, and the action statistics are OpenVLA's, value for value:
    they set every action bin's boundaries."""
    samples = load_samples([expert_bag])
    assert len(samples) >= 20 and all(s.action.shape == (7,) for s in samples)
    assert len(samples) == _labelled_steps(expert_bag)
    assert samples[0].instruction.startswith("put the ")
    actions = np.stack([s.action for s in samples])
    expected = _openvla_statistics(actions)
    assert action_statistics(actions) == expected
    # Here the 1st / 99th percentiles are not the extremes, so another level or method would show.
    assert expected["q01"] != expected["min"] and expected["q99"] != expected["max"]
    assert all(s.state.shape == (len(STATE_FIELDS),) for s in samples)


def _openvla_statistics(actions: np.ndarray) -> dict:
    """What OpenVLA's ``get_dataset_statistics`` computes (prismatic rlds/utils/data_utils.py:
    numpy's default "linear" quantiles, population std) with the mask of its 7-D datasets:
    the gripper, last, is not normalised."""
    q01, q99 = np.quantile(actions, [0.01, 0.99], axis=0, method="linear")
    return {
        "q01": q01.tolist(),
        "q99": q99.tolist(),
        "mask": [True] * 6 + [False],
        "mean": np.mean(actions, axis=0).tolist(),
        "std": np.std(actions, axis=0, ddof=0).tolist(),
        "min": np.min(actions, axis=0).tolist(),
        "max": np.max(actions, axis=0).tolist(),
    }


def _labelled_steps(bag: Path) -> int:
    """The bag's /expert_action messages: one per executed step (the last frame has none)."""
    return sum(1 for _ in iter_messages(bag, ["/expert_action"]))


def test_auxiliary_targets_are_learned_and_need_sim_state(tiny_openvla, expert_bag):
    torch.manual_seed(0)
    samples = load_samples([expert_bag])[:8]
    run = BehaviourCloning(
        load_openvla(tiny_openvla), samples, 1e-3, 0, total_steps=30, shift=0, aux_weight=1.0
    )
    aux = [run.train_step(8)[1] for _ in range(30)]
    assert aux[-1] < 0.5 * aux[0]
    samples[0].state = None
    with pytest.raises(BagError, match="/sim_state"):
        BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, aux_weight=1.0)


def test_loss_decreases_when_fitting_one_sample(tiny_openvla, expert_bag):
    torch.manual_seed(0)
    samples = load_samples([expert_bag])[:1]
    run = BehaviourCloning(load_openvla(tiny_openvla), samples, lr=1e-3, seed=0, total_steps=20, shift=0)
    losses = [run.train_step(1)[0] for _ in range(20)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.85 * losses[0]


def test_batched_loss_equals_the_mean_of_single_sample_losses(tiny_openvla, expert_bag):
    """Right padding never leaks into the action positions: a batch of prompts of different
    lengths gives the mean of each sample's own loss."""
    samples = load_samples([expert_bag])
    # A longer prompt than [0]'s ("put the C cube on the T target"): "gently" is not one of the
    # tiny tokenizer's whole words, so it is spelled out in characters.
    samples[1].instruction = "gently put the green cube on the blue target"
    run = BehaviourCloning(load_openvla(tiny_openvla), samples[:2], lr=1e-3, seed=0, shift=0)
    run.model.eval()
    with torch.no_grad():
        batch = run.loss(np.array([0, 1]), augment=False)
        single = [run.loss(np.array([i]), augment=False) for i in (0, 1)]
    assert len(run.prompts[0]) != len(run.prompts[1])
    assert float(batch) == pytest.approx(float(sum(single)) / 2, rel=1e-5)


def test_token_noise_corrupts_only_the_teacher_forced_inputs(tiny_openvla, expert_bag):
    """With token noise the inputs after the prompt are random action tokens (the labels
    stay), so the batch loss changes; without augmentation (evaluation) it is the clean one."""
    samples = load_samples([expert_bag])[:4]
    run = BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, shift=0, token_noise=1.0)
    run.model.eval()
    clean = BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, shift=0)
    clean.model.eval()
    batch = np.arange(4)
    with torch.no_grad():
        assert float(run.loss(batch, augment=False)) == pytest.approx(float(clean.loss(batch, augment=False)))
        assert float(run.loss(batch)) != pytest.approx(float(clean.loss(batch)), rel=1e-4)


def test_weight_average_follows_the_warmed_up_decay(tiny_openvla, expert_bag):
    """The averaged weights are the exponential moving average of the raw ones, with decay
    0 at the first step (the start is forgotten) and 1 - (1 + s)^(-3/4), capped, after."""
    samples = load_samples([expert_bag])[:4]
    run = BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, shift=0, ema_decay=0.6)
    expected = None
    for step in range(1, 5):
        run.train_step(2)
        raw = {k: v.detach().clone() for k, v in run.model.named_parameters()}
        decay = 0.0 if step == 1 else min(0.6, 1 - step**-EMA_WARMUP_POWER)
        expected = raw if expected is None else {k: decay * expected[k] + (1 - decay) * raw[k] for k in raw}
    averaged = dict(run.ema.module.named_parameters())
    assert all(torch.allclose(averaged[k], expected[k], atol=1e-6) for k in expected)
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)
    with pytest.raises(ValueError, match="ema_decay"):
        BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, ema_decay=1.0)


def test_averaged_run_saves_the_average_and_resumes_the_raw_weights(expert_bag, tmp_path):
    """The checkpoint holds the average, the training state the raw weights; a run killed after
    its step-3 checkpoint and resumed ends where the uninterrupted run does (average included)."""
    out, whole = tmp_path / "averaged", tmp_path / "whole"
    common = [str(expert_bag), "--steps", "6", "--save-every", "3", "--batch", "2", "--warmup", "2"]
    common += ["--ema", "0.9"]
    steps = _train([*common, "--out", str(out)], kill_at=3)
    saved = load_openvla(out).model.state_dict()
    with safe_open(str(out / STATE_FILE), framework="pt") as f:
        raw = {k.rsplit("/", 1)[0]: f.get_tensor(k) for k in f.keys() if k.endswith(f"/{RAW}")}
    assert raw and any(not torch.equal(saved[k], raw[k]) for k in raw)
    run = BehaviourCloning(load_openvla(out), load_samples([expert_bag])[:2], 1e-3, 0, ema_decay=0.9)
    run.resume(out)
    assert all(torch.equal(p, raw[k]) for k, p in run.model.named_parameters())
    assert all(torch.equal(p, saved[k]) for k, p in run.ema.module.named_parameters())
    plain = BehaviourCloning(load_openvla(out), load_samples([expert_bag])[:2], 1e-3, 0)
    with pytest.raises(CheckpointError, match=r"--ema 0\.9"):
        plain.resume(out)
    resumed = _train([*common, "--out", str(out), "--resume"])
    _assert_resumed_like_uninterrupted(out, steps + resumed, whole, _train([*common, "--out", str(whole)]))
    with pytest.raises(SystemExit):
        train.main([str(expert_bag), "--out", str(tmp_path / "bad"), "--ema", "1.5"])


def test_average_of_checkpoints_is_the_mean_of_their_weights(tiny_openvla, tmp_path):
    tiny = tiny_openvla
    runs = []
    for i, shift in enumerate((0.0, 1.0, 5.0)):
        run = tmp_path / f"run{i}"
        shutil.copytree(tiny, run)
        with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
            moved = {k: (f.get_tensor(k).float() + shift).contiguous() for k in f.keys()}
        save_file(moved, str(run / "model.safetensors"))
        runs.append(run)
    average.main([*map(str, runs), "--out", str(tmp_path / "soup"), "--export", str(tmp_path / "ship")])
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        start = {k: f.get_tensor(k).float() for k in f.keys()}
    soup = load_openvla(tmp_path / "soup").model.state_dict()
    assert all(torch.allclose(soup[k], start[k] + 2.0, atol=1e-5) for k in start)
    with safe_open(str(tmp_path / "ship" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert VLAPolicy(load_openvla(tmp_path / "ship")).stats.key == VLAPolicy(load_openvla(tiny)).stats.key


def test_average_refuses_checkpoints_of_other_data_or_shapes(tiny_openvla, tmp_path):
    tiny = tiny_openvla
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    stats = json.loads((other / "dataset_statistics.json").read_text())
    next(iter(stats.values()))["action"]["q99"][0] += 0.1
    (other / "dataset_statistics.json").write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match="same action statistics"):
        average_checkpoints([tiny, other], tmp_path / "out")
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([tiny], tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        average_checkpoints([tiny, tmp_path], tmp_path / "out")
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny, reshaped)
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    key = next(iter(weights))
    weights[key] = weights[key].flatten()[:-1].contiguous()
    save_file(weights, str(reshaped / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key} is"):
        average_checkpoints([tiny, reshaped], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        average.main([str(tiny), str(other), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2


def test_learning_rate_warms_up_then_decays_to_a_tenth(tiny_openvla, expert_bag):
    run = BehaviourCloning(
        load_openvla(tiny_openvla),
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


def test_random_shift_moves_frames_within_bounds(tiny_openvla, expert_bag):
    run = BehaviourCloning(load_openvla(tiny_openvla), load_samples([expert_bag])[:4], 1e-3, 0, shift=4)
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


def test_attention_supervision_points_heads_at_the_instructed_objects(tiny_openvla, expert_bag):
    """The supervised heads learn to look at the instructed cube, target zone and hand
    (the loss is -log of their attention mass there), and the supervision needs /ee_pose."""
    torch.manual_seed(0)
    samples = load_samples([expert_bag])[:8]
    assert all(s.hand is not None and s.hand.shape == (3,) for s in samples)
    run = BehaviourCloning(
        load_openvla(tiny_openvla), samples, 3e-3, 0, total_steps=40, shift=2, attention_weight=1.0
    )
    attention = [run.train_step(8)[2] for _ in range(40)]
    assert attention[0] > 1.0  # about uniform over the image at first
    assert attention[-1] < 0.5 * attention[0]
    samples[0].hand = None
    with pytest.raises(BagError, match="/ee_pose"):
        BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, attention_weight=1.0)


def test_train_saves_a_loadable_checkpoint_and_resumes(expert_bag, tmp_path):
    """A run killed after its step-3 checkpoint and resumed with ``--resume`` ends bit for bit
    where the same 6-step run without the interruption does: weights, auxiliary heads, optimizer
    moments and counts, every step's loss and learning rate (past the warm-up, so the cosine part
    of the schedule), and the RNG of batches, shifts and token noise (the CPU run is deterministic)."""
    out, whole = tmp_path / "policy", tmp_path / "whole"
    common = [str(expert_bag), "--steps", "6", "--save-every", "3", "--batch", "1", "--warmup", "2"]
    common += ["--aux-weight", "0.5", "--attention-weight", "0.5", "--token-noise", "0.3"]
    steps = _train([*common, "--out", str(out)], kill_at=3)
    assert (out / AUX_FILE).is_file()
    stats = json.loads((out / "dataset_statistics.json").read_text())
    assert list(stats) == [UNNORM_KEY]
    actions = np.stack([s.action for s in load_samples([expert_bag])])
    assert stats[UNNORM_KEY]["action"] == _openvla_statistics(actions)
    # OpenVLA's files also hold num_trajectories; nothing here reads it.
    assert stats[UNNORM_KEY]["num_transitions"] == _labelled_steps(expert_bag)
    assert json.loads((out / "config.json").read_text())["norm_stats"] == stats
    policy = VLAPolicy(load_openvla(out), restrict_to_actions=True)
    assert policy.stats.key == UNNORM_KEY and policy.action_decoding == "argmax"
    assert np.isfinite(
        policy.predict(np.zeros((64, 64, 3), np.uint8), "put the red cube on the blue target").action
    ).all()
    resumed = _train([*common, "--out", str(out), "--resume", "--action-decoding", "median"])
    assert VLAPolicy(load_openvla(out)).action_decoding == "median"  # written to config.json
    _assert_resumed_like_uninterrupted(out, steps + resumed, whole, _train([*common, "--out", str(whole)]))
    with pytest.raises(SystemExit):
        train.main([str(expert_bag), "--out", str(tmp_path / "none"), "--steps", "1", "--resume"])


class _KilledError(Exception):
    """Stands for the training process dying (after its last checkpoint)."""


def _train(argv: list[str], kill_at: int | None = None) -> list[tuple]:
    """``train.main(argv)``; returns each step's (step, losses, learning rate, batch/augmentation
    RNG state after it). ``kill_at``: the process dies when that many steps are done."""
    steps = []
    train_step = BehaviourCloning.train_step

    def recorded(run: BehaviourCloning, batch: int) -> tuple:
        if run.step == kill_at:
            raise _KilledError
        losses = train_step(run, batch)
        steps.append((run.step, *losses, run.optimizer.param_groups[0]["lr"], run.rng.bit_generator.state))
        return losses

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BehaviourCloning, "train_step", recorded)
        if kill_at is None:
            train.main(argv)
        else:
            with pytest.raises(_KilledError):
                train.main(argv)
    return steps


def _assert_resumed_like_uninterrupted(resumed: Path, resumed_steps: list, whole: Path, steps: list) -> None:
    """Every tensor and the metadata of the two runs' checkpoint files are identical, and so
    are the runs step by step."""
    for name in ("model.safetensors", STATE_FILE, AUX_FILE):
        assert (resumed / name).is_file() == (whole / name).is_file(), name
        if not (whole / name).is_file():
            continue
        with safe_open(str(resumed / name), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        with safe_open(str(whole / name), framework="pt") as f:
            expected = {k: f.get_tensor(k) for k in f.keys()}
            assert metadata == f.metadata() and tensors.keys() == expected.keys(), name
        differ = {
            k: float((tensors[k].double() - v.double()).abs().max())
            for k, v in expected.items()
            if not torch.equal(tensors[k], v)
        }
        assert not differ, (
            f"resumed run's {name}: {len(differ)} of {len(expected)} tensors differ from the uninterrupted "
            f"run's (largest |diff| {max(differ.values()):.3g}): --resume must restore all a step depends on "
            "(weights, optimizer, step, and where the batch/shift/noise RNG stream was); action losses "
            f"by step, resumed {[round(s[1], 4) for s in resumed_steps]} vs {[round(s[1], 4) for s in steps]}"
        )
    assert resumed_steps == steps, "the resumed run's steps (losses, lr, RNG) are not the uninterrupted run's"
    statistics = "dataset_statistics.json"
    assert (resumed / statistics).read_text() == (whole / statistics).read_text()


def test_init_aux_heads_start_from_the_init_runs_heads(expert_bag, tmp_path, capsys):
    first, fresh, kept = tmp_path / "first", tmp_path / "fresh", tmp_path / "kept"
    common = ["--batch", "2", "--aux-weight", "1.0", "--steps", "1", "--lr", "0"]
    train.main([str(expert_bag), "--out", str(first), "--seed", "0", *common])
    saved = _heads(first)
    # lr 0: the saved heads are the ones each run started from.
    train.main([str(expert_bag), "--out", str(fresh), "--init", str(first), "--seed", "1", *common])
    keep = ["--init", str(first), "--seed", "1", "--init-aux-heads"]
    train.main([str(expert_bag), "--out", str(kept), *keep, *common])
    assert all(torch.equal(saved[k], v) for k, v in _heads(kept).items())
    assert not all(torch.equal(saved[k], v) for k, v in _heads(fresh).items())
    (first / AUX_FILE).unlink()
    for argv, message in (
        ([*common, "--init", str(first)], "has no auxiliary_heads.safetensors"),
        (["--batch", "2", "--steps", "1", "--init", str(kept)], "no auxiliary targets"),
    ):
        with pytest.raises(SystemExit) as stop:
            train.main([str(expert_bag), "--out", str(tmp_path / "bad"), "--init-aux-heads", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main([str(expert_bag), "--out", str(tmp_path / "bad"), "--init-aux-heads", *common])
    assert "--init-aux-heads needs --init" in capsys.readouterr().err


def _heads(checkpoint) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint / AUX_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_keep_statistics_tokenizes_with_the_inits_statistics(tiny_openvla, expert_bag, tmp_path, capsys):
    first, kept = tmp_path / "first", tmp_path / "kept"
    train.main([str(expert_bag), "--out", str(first), "--batch", "2", "--steps", "1"])
    stats_file = first / "dataset_statistics.json"
    bags_stats = json.loads(stats_file.read_text())
    wider = json.loads(stats_file.read_text())
    action = wider[UNNORM_KEY]["action"]
    action["q01"] = [2.0 * q for q in action["q01"]]  # another dataset's span of the same task
    action["q99"] = [2.0 * q for q in action["q99"]]
    stats_file.write_text(json.dumps(wider))
    samples = load_samples([expert_bag])
    runs = {
        keep: BehaviourCloning(load_openvla(first), samples, 1e-3, 0, keep_statistics=keep)
        for keep in (False, True)
    }
    assert runs[True].norm_stats == wider and runs[False].norm_stats == bags_stats
    moved = (runs[True].targets != runs[False].targets).float().mean()
    assert moved > 0.2  # the same actions fall in other bins under the kept statistics
    fine_tune = ["--init", str(first), "--keep-statistics", "--steps", "1"]
    train.main([str(expert_bag), "--out", str(kept), *fine_tune])
    assert json.loads((kept / "dataset_statistics.json").read_text()) == wider
    assert json.loads((kept / "config.json").read_text())["norm_stats"] == wider
    with pytest.raises(CheckpointError, match="no 'dyqvla_sim' action statistics to keep"):
        BehaviourCloning(load_openvla(tiny_openvla), samples, 1e-3, 0, keep_statistics=True)
    with pytest.raises(SystemExit):
        train.main([str(expert_bag), "--out", str(tmp_path / "bad"), "--keep-statistics"])
    assert "--keep-statistics needs --init" in capsys.readouterr().err
