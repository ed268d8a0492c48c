"""Sharded audits under torch.distributed (gloo on the CPU): exact merge, sharded store, rank mismatches.

Ranks are started as plain subprocesses with the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK) so that each rank's exit code and stderr can be checked; one test goes through
``python -m torch.distributed.run`` itself. Those need real processes and are marked ``torchrun``
(``pytest -m "not torchrun"`` skips them); the shard merge and the rendezvous check run in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLES
from nrc_audit.outputs.report import METRIC_FIELDS

MODEL, DATA = SAMPLES / "mlp_wd.safetensors", SAMPLES / "data.h5"
COMMON = ["--no-progress", "--batch-size", "256", "--require-collapsed", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # same float32 kernels in every process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args_for_rank, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "nrc_audit", *map(str, args_for_rank(rank))], env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single-process audit both sharded runs are held to (one subprocess for the module)."""
    out = tmp_path_factory.mktemp("single") / "single.json"
    done = subprocess.run([sys.executable, "-m", "nrc_audit", str(MODEL), str(DATA), "--no-features", "--json", str(out),
                           *COMMON], env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def values(doc: dict) -> np.ndarray:
    return np.array([[np.nan if layer[f] is None else layer[f] for f in METRIC_FIELDS] for layer in doc["layers"]])


def assert_same_audit(a: dict, b: dict) -> None:
    np.testing.assert_allclose(values(a), values(b), rtol=1e-9, atol=1e-12)
    assert a["model_mse"] == pytest.approx(b["model_mse"], rel=1e-9)
    assert [l["passed"] for l in a["layers"]] == [l["passed"] for l in b["layers"]]
    assert a["summary"] == b["summary"]


def test_shards_merged_in_process_equal_the_single_pass(mlp_case):
    """Three ranks' passes, packed and unpacked as the all-gather moves them and merged in rank order, give
    the single-process report (the collectives themselves are exercised by the torchrun tests below)."""
    import torch

    from nrc_audit.config import AuditConfig
    from nrc_audit.engine import distributed
    from nrc_audit.engine.pipeline import opened, pass_rows
    from nrc_audit.engine.run import report_of, run_audit
    from nrc_audit.core.stats import PassStatistics

    cfg = AuditConfig(mlp_case["ckpt"], mlp_case["data"], device="cpu", batch_size=64)
    device = torch.device("cpu")
    total, world = PassStatistics(), 3
    with opened(cfg, device) as inputs:
        for rank in range(world):
            ctx = distributed.DistContext(rank, world, "gloo", False)
            rows = distributed.shard(inputs.ds.info.num_samples, cfg.batch_size, ctx)
            part = pass_rows(cfg, inputs, device, rows, None, None).stats
            part.flush()
            total.merge_from(distributed._unpack(distributed._pack(part), part))
        context = inputs.context
    merged = json.loads(report_of(total, cfg.analysis, context).to_json())
    assert_same_audit(merged, json.loads(run_audit(cfg).to_json()))


@pytest.mark.torchrun
def test_sharded_audit_equals_single_process(tmp_path, reference, world=2):
    report, store = tmp_path / "dist.json", tmp_path / "features.h5"
    results = launch(world, lambda r: [MODEL, DATA, "--json", report, "--features", store, *COMMON], tmp_path)
    for r in results:
        assert r.returncode == 0, r.stderr
    assert "Deep NRC audit" in results[0].stdout  # rank 0 prints the table …
    assert all(r.stdout == "" for r in results[1:])  # … and only rank 0
    doc = json.loads(report.read_text())
    assert doc["settings"]["world_size"] == world and doc["data"]["num_samples"] == reference["data"]["num_samples"]
    assert_same_audit(doc, reference)
    # the sharded store reads as one store (virtual datasets) and re-analyses to the same report
    again = subprocess.run([sys.executable, "-m", "nrc_audit", "reanalyze", str(store), "--format", "json",
                            "--no-progress", "--require-collapsed", "0"], env=ENV, capture_output=True, text=True,
                           cwd=tmp_path.parent, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert_same_audit(json.loads(again.stdout), doc)
    assert len(list(tmp_path.glob(f"features.rank*-of-{world}.h5"))) == world


@pytest.mark.torchrun
def test_ranks_with_different_checkpoints_fail_fast(tmp_path):
    other = SAMPLES / "mlp_nowd.safetensors"
    report = tmp_path / "r.json"
    results = launch(2, lambda r: [MODEL if r == 0 else other, DATA, "--json", report, "--no-features", *COMMON], tmp_path)
    for r in results:
        assert r.returncode == 2, (r.returncode, r.stderr)
        message = " ".join(r.stderr.split())
        assert "different checkpoints (sha256)" in message and "rank 0:" in message and "rank 1:" in message
        assert "Traceback" not in r.stderr
    assert not report.exists()


LAUNCHER = [sys.executable, "-m", "nrc_audit.cli.torchrun", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.torchrun
def test_torchrun_launcher(tmp_path, reference):
    """Through the launcher (torchrun's own main inside): the sharded report equals the single-process one."""
    report = tmp_path / "torchrun.json"
    done = subprocess.run([*LAUNCHER, "-m", "nrc_audit", str(MODEL), str(DATA), "--no-features", "--json", str(report),
                           *COMMON], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_audit(json.loads(report.read_text()), reference)


@pytest.mark.torchrun
def test_launcher_passes_the_ranks_exit_code_through_where_torchrun_says_1(tmp_path):
    """Unusable input on every rank exits 2: torchrun itself ends with 1 (a failed gate's code; checked by hand with
    torch 2.13: `ChildFailedError`, exit 1), the launcher with 2."""
    args = ["-m", "nrc_audit", str(MODEL), str(DATA), "--no-features", "--limit", "100", *COMMON]
    ours = subprocess.run([*LAUNCHER, *args], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ours.returncode == 2, ours.stderr
    assert "Traceback" not in ours.stderr and "rank 0 exited with 2" in " ".join(ours.stderr.split())


@pytest.mark.torchrun
def test_error_on_one_rank_only_ends_every_rank_with_exit_2(tmp_path):
    """--limit 100 with batches of 256 leaves rank 1 without rows: both ranks exit 2 at once, no shard left."""
    store = tmp_path / "features.h5"
    t0 = time.monotonic()
    results = launch(2, lambda r: [MODEL, DATA, "--features", store, "--limit", "100", *COMMON], tmp_path)
    assert time.monotonic() - t0 < 200  # liveness, not speed: seconds of work; before the fix rank 0 waited until killed (300 s)
    for r in results:
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    assert "without data" in " ".join(results[0].stderr.split())  # rank 0 names rank 1's problem
    assert list(tmp_path.glob("*.h5")) == [] and list(tmp_path.glob(".*")) == []


def test_rank_without_rendezvous_exits_2(tmp_path, monkeypatch):
    """WORLD_SIZE without torchrun's rendezvous variables: refused by name before any process group."""
    from typer.testing import CliRunner

    from nrc_audit.cli.app import audit_app

    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(audit_app, [str(MODEL), str(DATA), "--features", str(tmp_path / "f.h5"), *COMMON])
    assert done.exit_code == 2, done.output
    assert "not started by torchrun's rendezvous" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


SLOW_DEF = """
import os, time
from pathlib import Path
from torch import nn

class Slow(nn.Sequential):
    def forward(self, x):
        pid = Path(os.environ["PID_DIR"], os.environ["RANK"])  # written whole (a reader never sees it empty)
        Path(f"{pid}.tmp").write_text(str(os.getpid()))
        os.replace(f"{pid}.tmp", pid)
        time.sleep(0.2)
        return super().forward(x)

def build():
    return Slow(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))
"""


def start_slow_run(tmp_path: Path, launcher: list[str]) -> tuple[subprocess.Popen, Path]:
    """Two ranks of a slow sharded audit with a feature store, started by ``launcher`` in a new session, returned once
    both ranks are inside their forward pass; and the folder where each rank wrote its pid."""
    import torch

    import nrc_audit
    from conftest import make_xy, write_h5

    src = tmp_path / "slow.py"
    src.write_text(SLOW_DEF)
    ns: dict = {}
    exec(compile(SLOW_DEF, str(src), "exec"), ns)
    torch.manual_seed(0)
    ckpt = nrc_audit.save_checkpoint(ns["build"](), tmp_path / "slow.safetensors")
    data = write_h5(tmp_path / "d.h5", **dict(zip("XY", make_xy(2000, 12, 3))))
    pids = tmp_path / "pids"
    pids.mkdir()
    run = subprocess.Popen([*launcher, "-m", "nrc_audit", str(ckpt), str(data), "--model-def", f"{src}:build",
                            "--features", str(tmp_path / "f.h5"), "--no-progress", "--batch-size", "10",
                            "--require-collapsed", "0"], env={**ENV, "PID_DIR": str(pids)}, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((pids / "0").exists() and (pids / "1").exists()):
        if run.poll() is not None or time.monotonic() > deadline:
            os.killpg(run.pid, signal.SIGKILL) if run.poll() is None else None
            pytest.fail(f"the ranks did not start: {run.communicate()}")
        time.sleep(0.05)
    time.sleep(0.5)
    return run, pids


def no_store_left(tmp_path: Path) -> bool:
    return not (tmp_path / "f.h5").exists() and not any(
        p.name.endswith(".h5") and "rank" in p.name and not p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.torchrun
def test_rank_killed_mid_pass_ends_the_run_within_10_s(tmp_path):
    """torchrun notices a SIGKILLed worker and sends SIGTERM to the others, which must obey at once."""
    run, pids = start_slow_run(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc-per-node", "2"])  # fmt: skip
    try:
        os.kill(int((pids / "1").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        run.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode != 0 and took < 45, took  # liveness: a hang runs into the 60 s timeout
    assert no_store_left(tmp_path)


@pytest.mark.torchrun
def test_ctrl_c_under_the_launcher_exits_130_and_leaves_no_store(tmp_path):
    """Ctrl-C reaches the whole foreground process group: the workers stop (130) and so does the launcher, with
    130 — torchrun itself ends with 1 and a SignalException traceback."""
    run, _ = start_slow_run(tmp_path, LAUNCHER)
    try:
        os.killpg(run.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, err
    assert "Traceback" not in err and "interrupted (SIGINT)" in err
    assert no_store_left(tmp_path)
