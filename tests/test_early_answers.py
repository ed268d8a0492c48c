"""Option errors and missing files are answered before torch is imported, and ``validate`` needs no torch.

Each case runs the installed console script with a ``sitecustomize`` that makes ``import torch`` fail: if a
command reached torch before checking its options, it would end in an internal error instead of the option's
own message.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from _console import bash, console_script, sample_args

BLOCK_TORCH = '''import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture
def no_torch(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_TORCH)
    return {"PYTHONPATH": str(site)}


def test_the_block_works(tmp_path, no_torch):
    """Guard for the guard: an audit that does get to run needs torch and fails under the block."""
    result = bash(sample_args("--no-features", "-q"), tmp_path, no_torch)
    assert result.returncode == 2 and "torch is blocked" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ("--batch-size 0", "--batch-size 0 must be ≥ 1"),
        ("--rank bogus", "--rank 'bogus' is not understood"),
        ("--rank 0", "--rank 0"),
        ("--limit 0", "--limit 0 must be ≥ 1"),
        ("--nrc2-min 7", "nrc2_min=7.0 is outside [0, 1]"),
    ],
)
def test_audit_option_errors_come_before_torch(tmp_path, no_torch, args, message):
    result = bash(sample_args("--no-features", args), tmp_path, no_torch)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command, message",
    [
        ("'{exe}' missing.safetensors '{data}'", "checkpoint not found: missing.safetensors"),
        ("'{exe}' '{ckpt}' missing.h5", "data file not found: missing.h5"),
        ("'{exe}' reanalyze missing.features.h5", "feature store not found: missing.features.h5"),
        ("'{exe}' reanalyze missing.features.h5 --batch-size 0", "--batch-size 0 must be ≥ 1"),
        ("'{exe}' trend '{ckpt}' missing.safetensors --data '{data}'", "checkpoint not found: missing.safetensors"),
        ("'{exe}' trend '{ckpt}' --data missing.h5", "data file not found: missing.h5"),
        ("'{exe}' validate missing.json", "missing.json: file not found"),
    ],
)
def test_missing_files_come_before_torch(tmp_path, no_torch, command, message):
    from conftest import SAMPLES

    script = command.format(exe=console_script(), ckpt=SAMPLES / "mlp_wd.safetensors", data=SAMPLES / "data.h5")
    result = bash(script, tmp_path, no_torch)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "internal error" not in result.stderr


def test_validate_needs_no_torch(tmp_path, no_torch):
    made = bash(sample_args("--no-features", "-q", "--json", "report.json"), tmp_path)  # torch allowed here
    assert made.returncode == 0, made.stderr
    result = bash(f"'{console_script()}' validate report.json", tmp_path, no_torch)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "report.json: valid"
    doc = json.loads((tmp_path / "report.json").read_text())
    doc["layers"][0]["nrc1"] = "high"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    result = bash(f"'{console_script()}' validate {shlex.quote('bad.json')}", tmp_path, no_torch)
    assert result.returncode == 1 and "INVALID" in result.stdout, result.stdout + result.stderr


TORCH_MISSING = '''import sys
class _TorchMissing:  # what an interpreter without torch raises: ModuleNotFoundError naming the module
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _TorchMissing())
'''


def test_a_python_without_torch_gets_the_install_command_not_an_internal_error(tmp_path):
    """A plain `pip install nrc-audit` into an environment whose torch install failed (or was skipped): the audit
    names the missing package, the interpreter and the CPU-wheel command; exit 2, no traceback, no report."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TORCH_MISSING)
    env = {"PYTHONPATH": str(site)}
    result = bash(sample_args("--no-features", "--json", "report.json"), tmp_path, env)
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "needs the Python package 'torch', which is not installed" in err, err
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in err, err
    assert "internal error" not in err and "Traceback" not in result.stderr
    assert not (tmp_path / "report.json").exists()
    version = bash(f"'{console_script()}' --version", tmp_path, env)  # needs no torch at all
    assert version.returncode == 0 and version.stdout.startswith("nrc-audit "), version.stderr
