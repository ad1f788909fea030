"""[G] The GPU suite's --quick mode runs here (CPU, interpreter), so the script stays alive."""

import json
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


def test_gpu_suite_quick_runs_and_reports_every_section(tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["correctness"] and all(r["ok"] for r in result["correctness"])
    assert {r["bits"] for r in result["kernels"]} == {2, 4, 8, 16}
    assert any("group scales" in r["config"] for r in result["correctness"])
    schemes = {(r["scheme"], r["M"], r["bits"]) for r in result["schemes"]}
    assert len(schemes) == 4 * 2 * 4 and all(r["ms"] > 0 for r in result["schemes"])
    steps = result["end_to_end"]["control_step"]
    modes = [r["mode"] for r in steps]
    assert modes[0] == "HF-eager BF16" and modes.count("dynamic (trace)") == 2
    assert all(r["p50_ms"] > 0 for r in steps)
    assert "need a CUDA device" in steps[1]["graph_status"]  # clean CPU fallback
    assert abs(sum(result["end_to_end"]["trace_share"].values()) - 1.0) < 1e-9
    # the sweep: each case's default launch and its alternatives, at A16 and A8
    assert {(r["M"], r["bits"]) for r in result["sweep"]} == {(1, 16), (1, 8), (40, 16), (40, 8)}
    assert sum(r["default"] for r in result["sweep"]) == 4
    assert "control step mode" in run.stdout and "launch sweep" in run.stdout and "[H] schemes" in run.stdout


def test_gpu_suite_keeps_going_past_a_spent_budget(tmp_path):
    """A zero budget: every mode and sweep case is reported as skipped, nothing crashes."""
    out = tmp_path / "suite.json"
    run = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--budget-s", "0", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert all("skipped" in r for r in result["end_to_end"]["control_step"])
    assert result["sweep"] == [{"stopped": "time budget spent"}]
    assert "skipped: time budget spent" in run.stdout and "sweep stopped early" in run.stdout
