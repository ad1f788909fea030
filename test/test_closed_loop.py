"""[C] Closed loop: the node's policy/precision stack in the tabletop, evaluation, sensitivity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dyqvla_ros.bags.store import deserialize, iter_messages, typestore
from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.kinematics import KinematicMonitor
from dyqvla_ros.model import VLAPolicy
from dyqvla_ros.model.embedded import embedded_policy_path
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.precision import PrecisionController
from dyqvla_ros.sim.collect import collect
from dyqvla_ros.sim.env import TabletopEnv
from dyqvla_ros.sim.evaluation import paired_comparison, paired_table, summarize_mode, table, wilson_interval
from dyqvla_ros.sim.rollout import ClosedLoop
from dyqvla_ros.sim.sensitivity import Perturbation, correlations, perturb_episode
from dyqvla_ros.tools import compare, eval_sim


@pytest.fixture(scope="module")
def tiny_policy(tiny_openvla):
    """The random-weight tiny model, W4-quantized as the node loads it."""
    return VLAPolicy(load_quantized_openvla(tiny_openvla), restrict_to_actions=True)


def _loop(policy, mode: str, max_steps: int, source: str = "command") -> ClosedLoop:
    controller = PrecisionController(KinematicMonitor(w_macro=3, w_micro=2), Dispatcher(), mode)
    return ClosedLoop(TabletopEnv(render_size=32, max_steps=max_steps), policy, controller, source)


def test_dagger_collection_executes_the_policy_and_records_the_expert(renderer, tiny_policy, tmp_path):
    driven = collect(tmp_path / "dagger", episodes=1, seed=3, size=32, policy=tiny_policy, beta=0.0)
    assert driven["policy_steps"] == driven["steps"] == 60  # the random policy never succeeds
    expert = collect(tmp_path / "expert", episodes=1, seed=3, size=32, policy=tiny_policy, beta=1.0)
    assert expert["policy_steps"] == 0 and expert["successes"] == 1
    store = typestore()
    labels, poses = {}, {}
    for name in ("dagger", "expert"):
        bag = tmp_path / name
        labels[name] = [deserialize(store, m).data for m in iter_messages(bag, ["/expert_action"])]
        poses[name] = [deserialize(store, m).pose.position for m in iter_messages(bag, ["/ee_pose"])]
    np.testing.assert_array_equal(labels["dagger"][0], labels["expert"][0])  # same state, same label
    assert poses["dagger"][2] != poses["expert"][2]  # but the policy's action was executed
    assert max(np.linalg.norm(a[:3]) for a in labels["dagger"]) <= 0.04 + 1e-6  # the expert's steps
    with pytest.raises(ValueError, match="beta"):
        collect(tmp_path / "bad", episodes=1, policy=tiny_policy, beta=1.5)


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_summary_and_table_rows():
    episodes = [
        {"seed": 1, "success": True, "bits": [16, 16, 2, 4], "latency_s": [0.01, 0.02, 0.01, 0.01]},
        {"seed": 2, "success": False, "bits": [16, 8], "latency_s": [0.01, 0.03]},
    ]
    row = summarize_mode("dynamic", episodes, 1_000_000)
    assert row["successes"] == 1 and row["success_rate"] == 0.5 and row["failed_seeds"] == [2]
    assert row["bit_share"] == {"2": 1 / 6, "4": 1 / 6, "8": 1 / 6, "16": 0.5}
    assert row["mean_bits"] == pytest.approx(62 / 6) and row["below_16"] == pytest.approx(0.5)
    reference = summarize_mode("16", [{**e, "bits": [16] * len(e["bits"])} for e in episodes], 1_000_000)
    lines = table([reference, row]).splitlines()
    assert lines[0].startswith("| precision | success | 95 % CI | rel. to A16")
    assert lines[2].startswith("| W4A16 | 1/2 (50.0%)") and "16.00" in lines[2]
    assert lines[3].startswith("| dynamic (DyQ) | 1/2 (50.0%)") and "| 100.0% |" in lines[3]


def _episodes(solved: set[int], seeds: range = range(10)) -> list[dict]:
    return [{"seed": s, "success": s in solved, "bits": [16], "latency_s": [0.01]} for s in seeds]


def test_paired_comparison_counts_discordant_episodes():
    # 6 episodes only the second run solved, none only the first: p = 2 * 0.5**6.
    pair = paired_comparison(_episodes({0, 1}), _episodes({0, 1, 2, 3, 4, 5, 6, 7}))
    assert pair == {"only_first": 0, "only_second": 6, "p": pytest.approx(0.03125)}
    pair = paired_comparison(_episodes({0, 1, 2}), _episodes({2, 3}))  # 2 vs 1: p = 1
    assert (pair["only_first"], pair["only_second"], pair["p"]) == (2, 1, pytest.approx(1.0))
    assert paired_comparison(_episodes(set()), _episodes(set()))["p"] == 1.0  # nothing differs
    with pytest.raises(ValueError, match="not the same seeds: 2 seeds"):
        paired_comparison(_episodes(set()), _episodes(set(), range(1, 11)))
    row = {"mode": "dynamic", "paired": paired_comparison(_episodes({0}), _episodes({1, 2}))}
    assert paired_table([{"mode": "16"}, row]).splitlines()[2] == "| dynamic | 1 | 2 | 1 |"


def test_compare_cli_pairs_two_runs(tmp_path, capsys):
    a, b, both = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "both.json"
    a.write_text(json.dumps({"episodes": {"16": _episodes({0, 1})}}))
    b.write_text(json.dumps({"episodes": {"dynamic": _episodes({0, 1, 2, 3, 4, 5, 6, 7})}}))
    both.write_text(json.dumps({"episodes": {"16": _episodes({0}), "4": _episodes({0, 1})}}))
    compare.main([str(a), str(b)])
    printed = capsys.readouterr().out
    assert f"{a}:16: 2/10  {b}:dynamic: 8/10" in printed
    assert "by the first only: 0, by the second only: 6, exact McNemar p = 0.031" in printed
    compare.main([f"{both}:16", str(a)])
    assert "by the first only: 0, by the second only: 1, exact McNemar p = 1" in capsys.readouterr().out
    for bad, message in (
        ([str(both), str(a)], "name one as"),
        ([f"{both}:8", str(a)], "has no mode '8'"),
        ([str(tmp_path / "missing.json"), str(a)], "not a dyqvla-eval-sim output"),
    ):
        with pytest.raises(SystemExit) as stop:
            compare.main(bad)
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("source", ["command", "ee_pose"])
def test_closed_loop_runs_the_node_stack(renderer, tiny_policy, source):
    loop = _loop(tiny_policy, "dynamic", max_steps=8, source=source)
    result = loop.run(seed=3)
    assert len(result.steps) == 8 and not result.success
    assert result.instruction == loop.env.instruction
    bits = [s.bits for s in result.steps]
    assert bits[:3] == [16, 16, 16]  # no motion, then the monitor warms up: fail-safe 16
    assert set(bits) <= {2, 4, 8, 16}
    assert math.isnan(result.steps[0].motion_fineness)  # step 0 has no motion yet
    assert all(math.isfinite(s.motion_fineness) for s in result.steps[1:])
    assert all(s.latency_s > 0 and s.action.shape == (7,) for s in result.steps)
    fixed = _loop(tiny_policy, "4", max_steps=4).run(seed=3)
    assert [s.bits for s in fixed.steps] == [4, 4, 4, 4]


def test_failed_reference_episodes_are_not_perturbed(renderer, tiny_policy):
    reference, records = perturb_episode(_loop(tiny_policy, "16", max_steps=3), seed=5, bits=2)
    assert not reference.success and len(reference.steps) == 3 and records == []


def test_correlations_of_log_sensitivity():
    rng = np.random.default_rng(0)
    records = []
    for t in range(60):
        m, j = rng.uniform(0, 1), rng.uniform(0, 1)
        s = math.exp(3 * m + rng.normal(0, 0.3))
        records.append(Perturbation(0, t, m, j, 0.5, 0.5 * s, s, True))
    records.append(Perturbation(0, 60, 0.5, 0.5, 0.0, math.nan, math.nan, True))  # nothing injected
    records.append(Perturbation(0, 61, 0.5, 0.5, 0.2, 0.0, 0.0, True))  # ended exactly as the reference
    records.append(Perturbation(0, 62, math.nan, 0.0, 0.2, 0.1, 0.5, True))  # no monitor state
    out = correlations(records)
    assert (out["steps"], out["injected"], out["zero_deviation"], out["usable"]) == (63, 62, 1, 60)
    assert out["motion_fineness"]["r"] > 0.9 and out["motion_fineness"]["p"] < 1e-6
    assert abs(out["angular_jerk"]["r"]) < 0.3
    assert "note" in correlations(records[60:])


def test_eval_sim_cli_writes_json_and_table(renderer, tiny_openvla, tmp_path, capsys):
    out = tmp_path / "eval.json"
    eval_sim.main(
        [
            "--model", str(tiny_openvla), "--precision", "16", "2", "--episodes", "2",
            "--max-steps", "3", "--size", "32", "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| W4A16 | 0/2 (0.0%)" in printed and "| W4A2 | 0/2 (0.0%)" in printed
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["rows"]] == ["16", "2"]
    assert report["rows"][1]["bit_share"]["2"] == 1.0 and report["rows"][1]["steps"] == 6
    assert "paired" not in report["rows"][0]
    assert report["rows"][1]["paired"] == {"only_first": 0, "only_second": 0, "p": 1.0}
    assert "| A2 | 0 | 0 | 1 |" in printed
    assert report["episodes"]["2"][0]["seed"] == eval_sim.DEFAULT_EVAL_SEED
    with pytest.raises(SystemExit):
        eval_sim.main(["--episodes", "0"])


def test_sensitivity_cli_reports_what_it_could_measure(renderer, tiny_openvla, tmp_path, capsys):
    from dyqvla_ros.tools import sensitivity

    out = tmp_path / "sens"
    sensitivity.main(
        [
            "--model",
            str(tiny_openvla),
            "--seeds",
            "7",
            "--max-steps",
            "2",
            "--size",
            "32",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "0/1 A16 reference episodes succeeded" in printed and "no correlation" in printed
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["references"] == [{"seed": 7, "success": False, "steps": 2}] and report["steps"] == []
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.json"]  # no empty CSV or plot


def test_eval_sim_defaults_to_the_embedded_policy(renderer, tmp_path):
    out = tmp_path / "eval.json"
    eval_sim.main(["--precision", "dynamic", "--episodes", "1", "--max-steps", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["model"] == str(embedded_policy_path()) and report["kinematic_source"] == "ee_pose"
    assert report["rows"][0]["steps"] == 2
    assert report["action_decoding"] == "median"  # the embedded checkpoint's choice (TRAINING.md)
    eval_sim.main(["--precision", "16", "--episodes", "1", "--max-steps", "1", "--action-decoding", "argmax",
                   "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["action_decoding"] == "argmax"


def test_eval_sim_runs_the_embedded_policy_with_its_shipped_calibration(tmp_path):
    """As the node: the embedded policy's own calibration by default, none for another
    checkpoint, 'none' for the default thresholds, a given file wins."""
    from argparse import Namespace

    from dyqvla_ros.model.embedded import embedded_calibration_path

    assert eval_sim.calibration_file(Namespace(model=None, calibration=None)) == embedded_calibration_path()
    assert eval_sim.calibration_file(Namespace(model=tmp_path, calibration=None)) is None
    assert eval_sim.calibration_file(Namespace(model=None, calibration="none")) is None
    assert eval_sim.calibration_file(Namespace(model=None, calibration="c.yaml")) == Path("c.yaml")
