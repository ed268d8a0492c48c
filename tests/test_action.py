"""The packaged GitHub Action (action.yml): its audit step, run as the runner runs it, writes the markdown card
to the job summary and the report path and exit code to the step outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, SAMPLES


def _audit_step() -> dict:
    action = yaml.safe_load((REPO / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    assert {"checkpoint", "data", "args"} <= set(action["inputs"])
    return next(step for step in action["runs"]["steps"] if step.get("id") == "audit")


def _run(tmp_path: Path, checkpoint: Path, data: Path, args: str) -> tuple[int, str, dict[str, str]]:
    step = _audit_step()
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs.txt"
    env = {**os.environ, "NRC_CHECKPOINT": str(checkpoint), "NRC_DATA": str(data), "NRC_ARGS": args,
           "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(outputs), "RUNNER_TEMP": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=300)
    values = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    return done.returncode, summary.read_text(), values


def test_the_action_writes_the_card_to_the_job_summary(tmp_path):
    code, summary, outputs = _run(tmp_path, SAMPLES / "mlp_wd.safetensors", SAMPLES / "data.h5",
                                  "--limit 600 --require-collapsed 3")  # fmt: skip
    assert code == 0 and outputs["exit-code"] == "0"
    assert summary.startswith("## Deep Neural Regression Collapse audit") and "mlp_wd.safetensors" in summary
    assert Path(outputs["report"]).is_file()
    failed, summary, outputs = _run(tmp_path, SAMPLES / "mlp_wd.safetensors", SAMPLES / "missing.h5", "")
    assert failed == 2 and outputs["exit-code"] == "2" and "missing.h5" in summary.rsplit("## Deep", 1)[-1]
