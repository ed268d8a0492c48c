"""A run stopped mid-extraction by SIGTERM or SIGINT (Ctrl-C) exits 143 / 130 within a second, writes no report,
leaves no partial store and keeps an earlier run's store and report untouched (docs/reliability.md).

The run is a real ``python -m nrc_audit`` process. Its model (``--model-def``) sleeps in every forward pass
while ``NRC_TEST_SLEEP`` is set, so the signal is sure to land mid-extraction; the re-run leaves it unset.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

import nrc_audit
from conftest import make_xy, write_h5
from nrc_audit.cli.app import audit_app

SLEEP_S = 0.25  # per batch of 10 rows: 30 batches ≈ 7.5 s, far longer than the wait below
START_TIMEOUT_S = 120.0  # the child imports torch first, slow on a loaded CI machine


@pytest.fixture
def slow_case(tmp_path: Path) -> dict:
    src = tmp_path / "slow.py"
    slow_source = _storm_module().SLOW_SOURCE  # one model definition for the tests and the storm benchmark
    src.write_text(slow_source)
    ns: dict = {}
    exec(compile(slow_source, str(src), "exec"), ns)
    ckpt = nrc_audit.save_checkpoint(ns["build"](), tmp_path / "slow.safetensors")
    x, y = make_xy(300, 12, 3, seed=4)
    data = write_h5(tmp_path / "data.h5", X=x, Y=y)
    out = tmp_path / "out"
    out.mkdir()
    args = [str(ckpt), str(data), "--model-def", f"{src}:build", "--features", str(out / "f.h5"), "--json",
            str(out / "r.json"), "--no-progress", "--batch-size", "10", "--require-collapsed", "0"]  # fmt: skip
    return {"args": args, "out": out, "store": out / "f.h5", "report": out / "r.json"}


def _default_sigint() -> None:
    # a child started with SIGINT ignored (nohup, some CI shells) would keep ignoring it; Ctrl-C in a
    # terminal finds the default disposition, which is what Python turns into KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT"),
                                                 (signal.SIGHUP, 129, "SIGHUP")],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])  # fmt: skip
def test_signal_mid_extraction_keeps_earlier_outputs_and_leaves_no_partial(slow_case, sig, code, name):
    first = CliRunner().invoke(audit_app, slow_case["args"])  # an earlier, finished run (full speed)
    assert first.exit_code == 0, first.stderr
    before = {p.name: p.read_bytes() for p in slow_case["out"].iterdir()}
    env = dict(os.environ, NRC_TEST_SLEEP=str(SLEEP_S))
    child = subprocess.Popen([sys.executable, "-m", "nrc_audit", *slow_case["args"]], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)  # fmt: skip
    partial = slow_case["out"] / ".f.h5.partial"  # the new store is written here, renamed when complete
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not partial.exists():  # created with the first batch
            assert child.poll() is None, child.communicate()
            if time.monotonic() > deadline:  # a guard against hanging, not a performance check
                pytest.fail("the audit did not start extracting")
            time.sleep(0.02)
        time.sleep(2 * SLEEP_S)  # a couple of batches further into the pass
        assert child.poll() is None, "the run finished before the signal; raise SLEEP_S"
        sent = time.monotonic()
        child.send_signal(sig)
        stdout, stderr = child.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == code, stderr.decode()
    assert took < 30.0, f"{took:.2f} s from the signal to the exit"  # liveness: a run that ignored it goes on for minutes
    assert "Traceback" not in stderr.decode() and f"interrupted ({name}); no report written" in stderr.decode()
    assert stdout == b""
    # the earlier store and report are untouched; no partial or temporary file is left
    assert {p.name: p.read_bytes() for p in slow_case["out"].iterdir()} == before

    from nrc_audit.cli.commands import reanalyze_app

    again = CliRunner().invoke(reanalyze_app, [str(slow_case["store"]), "--no-progress", "--require-collapsed", "0"])
    assert again.exit_code == 0, again.stderr
    with h5py.File(slow_case["store"]) as fh:
        assert bool(fh.attrs["complete"]) is True


def _start_and_wait_for_partial(slow_case: dict) -> subprocess.Popen:
    env = dict(os.environ, NRC_TEST_SLEEP=str(SLEEP_S))
    child = subprocess.Popen([sys.executable, "-m", "nrc_audit", *slow_case["args"]], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (slow_case["out"] / ".f.h5.partial").exists():
        assert child.poll() is None, child.communicate()
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the audit did not start extracting")
        time.sleep(0.02)
    return child


def test_sigkilled_runs_leftovers_are_removed_by_the_next_run_also_without_a_store(slow_case):
    child = _start_and_wait_for_partial(slow_case)
    child.kill()  # SIGKILL: no handler runs, the partial and lock files stay
    child.communicate(timeout=60)
    left = sorted(p.name for p in slow_case["out"].iterdir())
    assert left == [".f.h5.lock", ".f.h5.partial"], left
    quiet = CliRunner().invoke(audit_app, [*slow_case["args"], "--no-features"])
    assert quiet.exit_code == 0, quiet.stderr
    assert sorted(p.name for p in slow_case["out"].iterdir()) == ["r.json"]  # the stale files are gone


def test_a_live_runs_partial_is_never_taken_for_a_stale_one(slow_case):
    child = _start_and_wait_for_partial(slow_case)
    try:
        partial = slow_case["out"] / ".f.h5.partial"
        inode = partial.stat().st_ino
        other = CliRunner().invoke(audit_app, [*slow_case["args"], "--no-features"])
        assert other.exit_code == 0, other.stderr
        assert partial.stat().st_ino == inode  # the live run's file was left alone
        clash = CliRunner().invoke(audit_app, slow_case["args"])
        assert clash.exit_code == 2 and "another nrc-audit run" in clash.stderr
        assert partial.stat().st_ino == inode
    finally:
        child.kill()
        child.communicate(timeout=60)


def test_sigterm_at_random_moments_sample():
    """A small sample of benchmarks/sigterm_storm.py (the 200-run version is measured in docs/reliability.md)."""
    storm = _storm_module()
    results = storm.storm(runs=int(os.environ.get("NRC_TEST_SIGTERM_RUNS", "2")), parallel=1)
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad


def _storm_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sigterm_storm.py"
    spec = importlib.util.spec_from_file_location("sigterm_storm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_store_writer_stops_when_told_even_with_a_full_queue(tmp_path):
    """The writer thread ends on every path: discard() with batches queued returns promptly, no partial left."""
    import torch

    from nrc_audit.core.layer import LayerInfo
    from nrc_audit.io.store import FeatureStoreWriter

    layer = LayerInfo(0, "0", "linear", 4, 3, False, torch.zeros(3, 4, dtype=torch.float64))
    writer = FeatureStoreWriter(tmp_path / "s.h5", 64, [layer], {"context": {}})
    for start in range(0, 32, 8):
        writer.write(start, torch.zeros(8, 3), torch.zeros(8, 3), [torch.zeros(8, 4)])
    t0 = time.monotonic()
    writer.discard()
    assert time.monotonic() - t0 < 10.0  # liveness: discarding must not drain the queue first
    assert list(tmp_path.iterdir()) == []
    writer.discard()  # idempotent
