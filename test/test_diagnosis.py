"""[C] Failure analysis: the policy's distributions, episode outcomes, stalls, dyqvla-diagnose."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dyqvla_ros.model import VLAPolicy
from dyqvla_ros.model.embedded import embedded_policy_path
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.sim.diagnosis import OUTCOMES, STALL_MOVE, is_stall, summarize
from dyqvla_ros.sim.env import TabletopEnv
from dyqvla_ros.sim.expert import PHASES, ScriptedExpert
from dyqvla_ros.tools import diagnose


def test_distributions_are_kept_only_when_asked(tiny_openvla):
    policy = VLAPolicy(load_quantized_openvla(tiny_openvla), restrict_to_actions=True)
    image, instruction = np.zeros((224, 224, 3), np.uint8), "put the red cube on the blue target"
    assert policy.predict(image, instruction).distributions is None
    policy.keep_distributions = True
    out = policy.predict(image, instruction)
    ids = policy.action_tokenizer.token_ids
    assert out.distributions.shape == (len(out.tokens), len(ids))
    np.testing.assert_allclose(out.distributions.sum(axis=1), 1.0, rtol=1e-5)
    # Greedy over the action tokens: each token is its row's most likely id.
    np.testing.assert_array_equal(out.tokens, ids.start + out.distributions.argmax(axis=1))


def _step(stay: bool, expert_xy=(0.0, 0.0), lean=(0.0, 0.0), holding=False, closing=False, yaw=0.0):
    return {
        "stay_xy": stay,
        "expert": [*expert_xy, 0.0, 0.0, 0.0, 0.0, 1.0],
        "lean": [*lean, 0.0, 0.0, 0.0, 0.0, 0.0],
        "holding": holding,
        "closing": closing,
        "yaw_error": yaw,
    }


def test_summary_counts_outcomes_stalls_and_lean():
    hover = _step(True, expert_xy=(-0.006, 0.001), lean=(-0.3, 0.2))  # leans the expert's way in x only
    carry = _step(True, expert_xy=(0.0, -0.04), lean=(0.0, 0.1), holding=True)  # leans away
    still = _step(True, expert_xy=(0.002, 0.002))  # the expert barely moves: no stall
    moving = _step(False, expert_xy=(0.04, 0.0))
    assert is_stall(hover) and is_stall(carry) and not is_stall(still) and not is_stall(moving)
    episodes = [
        {"success": True, "outcome": "success", "steps": [hover, _step(False, closing=True, yaw=0.5)]},
        {"success": False, "outcome": "never closed", "steps": [hover, hover, still, moving]},
        {
            "success": False,
            "outcome": "carrying at the limit",
            "steps": [_step(False, closing=True, yaw=-0.1), carry],
        },
    ]
    summary = summarize(episodes, np.array([0.0003, -0.0001, 0.001, 0, 0, 0, 0]))
    assert summary["outcomes"] == {kind: int(kind in {e["outcome"] for e in episodes}) for kind in OUTCOMES}
    assert summary["failure_steps"] == 6  # the success's steps are not counted
    assert summary["stall_steps"] == {"approach": 2, "carrying": 1}
    # Pairs with the expert moving >= STALL_MOVE on that axis: hover's x twice (agrees), carry's y (not).
    assert summary["stall_lean_pairs"] == 3 and summary["stall_lean_agrees"] == pytest.approx(2 / 3)
    # First closes: the success at |0.5| rad, the carrying failure at |-0.1| rad.
    bins = [(b["successes"], b["episodes"]) for b in summary["first_close_yaw"]]
    assert bins == [(0, 1), (0, 0), (0, 0), (1, 1)]
    assert STALL_MOVE == 0.004


def test_diagnose_cli_labels_the_state_each_step_was_decided_in(renderer, tmp_path, capsys):
    out = tmp_path / "diagnosis.json"
    diagnose.main(["--episodes", "1", "--seed", "200000", "--max-steps", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "1 episodes:" in printed and '"stay" (the middle bin) moves the hand' in printed
    report = json.loads(out.read_text())
    (episode,) = report["episodes"]
    assert episode["outcome"] in OUTCOMES[1:] and len(episode["steps"]) == 6  # 6 steps cannot finish
    first = episode["steps"][0]
    assert first["phase"] in PHASES and len(first["lean"]) == 7 and len(first["policy"]) == 7
    env = TabletopEnv(render_size=0)
    env.reset(200000)
    hand, (cube, _) = env.ee_pose()[0], env.cube_pose(env.task[0])
    np.testing.assert_allclose(first["hand_to_cube"], hand - cube, atol=1e-9)  # before the step ran
    np.testing.assert_allclose(first["expert"], ScriptedExpert().act(env), atol=1e-9)
    stats = json.loads((embedded_policy_path() / "dataset_statistics.json").read_text())
    action = next(iter(stats.values()))["action"]
    midpoint = (np.array(action["q01"]) + np.array(action["q99"])) / 2
    np.testing.assert_allclose(report["summary"]["stay_motion"][:3], midpoint[:3], rtol=1e-6)
    with pytest.raises(SystemExit) as stop:
        diagnose.main(["--episodes", "0"])
    assert stop.value.code == 2
