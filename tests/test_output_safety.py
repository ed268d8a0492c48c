"""Inputs are sacred, outputs honest (issue 17 items 1, 2, 5; issue 14 item 4; docs/reliability.md).

An output path that is an input or another output is refused before the pass; symlinks are written
through; devices and FIFOs are written directly, never replaced; modes are kept or follow the umask; two
runs on one feature store cannot damage each other; an unexpected exception exits 2, never 1.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from nrc_audit.cli.app import audit_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args, env=None):
    return CliRunner().invoke(audit_app, [str(a) for a in args] + ["--no-progress", "--require-collapsed", "0"],
                              env=env)  # fmt: skip


def without_notices(stderr: str) -> str:
    """stderr less the plan's notices printed before the pass (``nrc-audit: feature store: up to …``)."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("nrc-audit: "))


def flat(text: str) -> str:
    return " ".join(text.split())


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


@pytest.mark.parametrize(("option", "victim", "label"), [
    ("--json", "ckpt", "the checkpoint"), ("--features", "ckpt", "the checkpoint"),
    ("--markdown", "data", "the data file"), ("--model-index", "data", "the data file"),
    ("--plot", "ckpt", "the checkpoint"),
])  # fmt: skip
def test_output_equal_to_an_input_exits_2_and_keeps_the_input(mlp_case, option, victim, label):
    before = snapshot(mlp_case["ckpt"], mlp_case["data"])
    result = run(mlp_case["ckpt"], mlp_case["data"], option, mlp_case[victim])
    assert result.exit_code == 2, result.stderr
    assert f"is the same file as {label}" in flat(result.stderr) and "Traceback" not in result.stderr
    assert snapshot(mlp_case["ckpt"], mlp_case["data"]) == before


def test_symlink_or_hard_link_to_an_input_is_the_input(mlp_case, tmp_path):
    link, hard = tmp_path / "link.json", tmp_path / "hard.json"
    link.symlink_to(mlp_case["ckpt"])
    os.link(mlp_case["data"], hard)
    before = snapshot(mlp_case["ckpt"], mlp_case["data"])
    for path, label in ((link, "the checkpoint"), (hard, "the data file")):
        result = run(mlp_case["ckpt"], mlp_case["data"], "--json", path, "--no-features")
        assert result.exit_code == 2 and f"is the same file as {label}" in flat(result.stderr)
    assert snapshot(mlp_case["ckpt"], mlp_case["data"]) == before


def test_baseline_settings_and_model_def_files_are_inputs(mlp_case, tmp_path):
    ok = run(mlp_case["ckpt"], mlp_case["data"], "--json", tmp_path / "base.json", "--no-features")
    assert ok.exit_code == 0, ok.stderr
    base = tmp_path / "base.json"
    before = base.read_bytes()
    result = run(mlp_case["ckpt"], mlp_case["data"], "--baseline", base, "--markdown", base, "--no-features")
    assert result.exit_code == 2 and "is the same file as the baseline" in flat(result.stderr)
    assert base.read_bytes() == before
    cfg = tmp_path / "nrc.toml"
    cfg.write_text("[tool.nrc-audit]\nrank = 2\n")
    result = run(mlp_case["ckpt"], mlp_case["data"], "--config", cfg, "--json", cfg, "--no-features")
    assert result.exit_code == 2 and "is the same file as the settings file" in flat(result.stderr)
    src = tmp_path / "net.py"
    src.write_text("def build():\n    raise AssertionError('never called')\n")
    result = run(mlp_case["ckpt"], mlp_case["data"], "--model-def", f"{src}:build", "--json", src, "--no-features")
    assert result.exit_code == 2 and "is the same file as the --model-def file" in flat(result.stderr)
    assert "never called" not in result.stderr  # refused before any user code runs


def test_two_outputs_on_one_file_exit_2(mlp_case, tmp_path):
    out = tmp_path / "same.out"
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--markdown", out, "--no-features")
    assert result.exit_code == 2 and "are the same file" in flat(result.stderr)
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--features", out)
    assert result.exit_code == 2 and "are the same file" in flat(result.stderr)
    assert not out.exists()


def test_folder_as_output_exits_2(mlp_case, tmp_path):
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", tmp_path, "--no-features")
    assert result.exit_code == 2 and "is a folder" in flat(result.stderr)


def test_symlinked_output_is_written_through(mlp_case, tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", link, "--no-features")
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["schema"].startswith("nrc-audit-report")


def test_dev_null_and_stdout_are_written_not_replaced(mlp_case, tmp_path):
    null = Path("/dev/null")
    mode = null.stat().st_mode
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", null, "--markdown", null, "--no-features")
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(null.stat().st_mode) and null.stat().st_mode == mode
    done = subprocess.run([sys.executable, "-m", "nrc_audit", str(mlp_case["ckpt"]), str(mlp_case["data"]), "--json",
                           "/dev/stdout", "--format", "json", "--no-features", "--no-progress", "--require-collapsed",
                           "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, end = json.JSONDecoder().raw_decode(done.stdout)  # the file written to stdout, then the product
    assert first["schema"].startswith("nrc-audit-report") and json.loads(done.stdout[end:]) == first


def test_fifo_output_is_written_into(mlp_case, tmp_path):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", fifo, "--no-features")
    reader.join(30)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(got[0])["schema"].startswith("nrc-audit-report")


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_new_outputs_honour_the_umask(mlp_case, tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        result = run(mlp_case["ckpt"], mlp_case["data"], "--json", tmp_path / "r.json", "--markdown",
                     tmp_path / "r.md", "--model-index", tmp_path / "r.yaml", "--dataset-id", "user/data",
                     "--junit-xml", tmp_path / "r.xml", "--plot", tmp_path / "r.png", "--require-collapsed", "0",
                     "--features", tmp_path / "f.h5")  # fmt: skip
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    for name in ("r.json", "r.md", "r.yaml", "r.xml", "r.png", "f.h5"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_replaced_outputs_keep_their_mode(mlp_case, tmp_path):
    paths = [tmp_path / "r.json", tmp_path / "f.h5"]
    first = run(mlp_case["ckpt"], mlp_case["data"], "--json", paths[0], "--features", paths[1])
    assert first.exit_code == 0, first.stderr
    for p in paths:
        p.chmod(0o640)
    again = run(mlp_case["ckpt"], mlp_case["data"], "--json", paths[0], "--features", paths[1])
    assert again.exit_code == 0, again.stderr
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o640, 0o640]


def test_second_run_on_a_store_being_written_exits_2_and_the_winner_completes(mlp_case, tmp_path):
    from nrc_audit.core.layer import LayerInfo
    from nrc_audit.io.store import FeatureStore, FeatureStoreWriter

    store = tmp_path / "f.h5"
    layer = LayerInfo(0, "0", "linear", 4, 3, False, torch.zeros(3, 4, dtype=torch.float64))
    winner = FeatureStoreWriter(store, 8, [layer], {"context": {"model": {}, "data": {}}})  # mid-run: holds the lock
    winner.write(0, torch.zeros(8, 3), torch.arange(24.0).reshape(8, 3), [torch.ones(8, 4)])
    loser = run(mlp_case["ckpt"], mlp_case["data"], "--features", store, "--json", tmp_path / "r.json")
    assert loser.exit_code == 2, loser.stderr
    assert "another nrc-audit run is writing the feature store" in flat(loser.stderr)
    assert not (tmp_path / "r.json").exists()
    winner.close(complete=True)
    with FeatureStore(store) as fs:  # complete, and all of the winner's rows
        assert fs.n == 8 and [b[2].sum().item() for b in fs.batches(8)] == [276.0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failed_run_keeps_an_earlier_store(mlp_case, tmp_path):
    store = tmp_path / "f.h5"
    assert run(mlp_case["ckpt"], mlp_case["data"], "--features", store).exit_code == 0
    before = store.read_bytes()
    x = mlp_case["x"].copy()
    x[250, 0] = float("nan")  # found in a later batch, after the new store was started
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as fh:
        fh["X"], fh["Y"] = x, mlp_case["y"]
    result = run(mlp_case["ckpt"], bad, "--features", store, "--batch-size", "100")
    assert result.exit_code == 2, result.stderr
    assert store.read_bytes() == before and not (tmp_path / ".f.h5.partial").exists()


@pytest.mark.parametrize("exc", [ZeroDivisionError("boom"), KeyError("k"), SystemExit(7), AssertionError()],
                         ids=["ZeroDivisionError", "KeyError", "SystemExit", "AssertionError"])  # fmt: skip
def test_unexpected_exception_inside_the_pass_exits_2_not_1(mlp_case, tmp_path, monkeypatch, exc):
    from nrc_audit.core import stats

    def explode(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(stats.JointAccumulator, "update_pair", explode)
    out = tmp_path / "out"
    out.mkdir()
    result = run(mlp_case["ckpt"], mlp_case["data"], "--features", out / "f.h5", "--json", out / "r.json")
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    message = flat(without_notices(result.stderr))
    # sys.exit() in code the audit ran is a stop, not a bug of nrc-audit: exit 2 all the same
    prefix = "error: the audit stopped:" if isinstance(exc, SystemExit) else "error: internal error:"
    assert message.startswith(prefix) and "--debug" in message and "Traceback" not in message
    assert list(out.iterdir()) == []  # no report, no store, no partial file
    debug = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", env={"NRC_AUDIT_DEBUG": "1"})
    assert debug.exit_code == 2 and "Traceback" in debug.stderr
