"""The installed ``nrc-audit`` console script, run in a subprocess with real file descriptors (not CliRunner),
so that the tests see what a shell sees: the entry point, its imports, pipes and closed streams."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLES

# Generous: only a hang reaches it (one audit of the sample takes seconds, torch's import included).
HANG_S = 600


def console_script() -> str:
    """The ``nrc-audit`` entry point of the environment running the tests (next to sys.executable), else on PATH."""
    found = shutil.which("nrc-audit", path=str(Path(sys.executable).parent)) or shutil.which("nrc-audit")
    assert found, "the nrc-audit console script is not installed: pip install -e '.[test]' first"
    return found


def sample_args(*extra: str) -> str:
    """The README's sample audit, quoted for bash, plus ``extra`` (already quoted)."""
    ckpt, data = SAMPLES / "mlp_wd.safetensors", SAMPLES / "data.h5"
    return " ".join([f"'{console_script()}'", f"'{ckpt}'", f"'{data}'", *extra])


def bash(script: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under bash in ``cwd`` (stdin closed), capturing what reaches the test's pipes."""
    full = {**os.environ, "NRC_AUDIT_DEBUG": "0", **(env or {})}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=full, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=HANG_S)  # fmt: skip
