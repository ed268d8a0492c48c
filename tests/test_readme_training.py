"""The README's "During training" snippets run as written, and `nrc-audit trend` renders their histories."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import _tv_ops  # noqa: F401  (before lightning imports torchvision)

from conftest import REPO

pytest.importorskip("lightning")
pytest.importorskip("accelerate")


def _snippets() -> list[str]:
    section = REPO.joinpath("README.md").read_text().split("## During training", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index, history", [(0, "nrc-lightning.jsonl"), (1, "nrc-hf.jsonl")])
def test_the_during_training_snippets_run_as_written(tmp_path, index, history):
    code = "import sys; sys.path.insert(0, %r)\nimport _tv_ops\n" % str(REPO / "tests") + _snippets()[index]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trend = subprocess.run([sys.executable, "-m", "nrc_audit", "trend", history, "--require-collapsed", "0",
                            "--plot", "trend.png"], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert trend.returncode == 0, trend.stderr
    assert "epoch 1, epoch 2, epoch 3" in trend.stderr and (tmp_path / "trend.png").is_file()
