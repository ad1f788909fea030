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
    assert result["correctness"] and all(r["ok"] for r in result["correctness"])
    assert {r["bits"] for r in result["kernels"]} == {2, 4, 8, 16}
    modes = [r["mode"] for r in result["control_step"]]
    assert modes[0] == "HF-eager BF16" and modes.count("dynamic (trace)") == 2
    assert all(r["p50_ms"] > 0 for r in result["control_step"])
    assert "need a CUDA device" in result["control_step"][1]["graph_status"]  # clean CPU fallback
    assert abs(sum(result["trace_share"].values()) - 1.0) < 1e-9
    assert "control step mode" in run.stdout
