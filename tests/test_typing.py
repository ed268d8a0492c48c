"""The public API modules type-check clean (mypy), so their hints are a contract users can rely on."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO

PUBLIC_MODULES = ["nrc_audit/__init__.py", "nrc_audit/api.py", "nrc_audit/monitor.py", "nrc_audit/report.py",
                  "nrc_audit/config.py", "nrc_audit/errors.py", "nrc_audit/io/checkpoint.py"]  # fmt: skip


def test_public_modules_type_check():
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:  # fmt: skip
        pytest.fail("mypy is part of the test extra: pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--disallow-untyped-defs",
         "--disallow-incomplete-defs", *PUBLIC_MODULES],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
