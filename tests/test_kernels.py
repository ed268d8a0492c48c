"""The production fold kernels and the pipelined pass, driven through many blocks (not one staged fold).

The CPU kernel stages up to 4096 rows before it folds; these tests patch the block size down to a few rows
so that every stream crosses dozens of blocks, run the device kernel on CPU tensors (same code as on CUDA),
and check the merge law on the kernels themselves. Expected values come from two-pass numpy on the full
matrix, or from the dense reference (tests/reference.py) for whole audits, never from the package's merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nrc_audit
import nrc_audit.errors
from fixtures_models import assert_layers_match, capture
from nrc_audit.config import AnalysisOptions, AuditConfig
from nrc_audit.core import kernels, stats
from nrc_audit.core.stats import Accumulator, JointAccumulator, PassStatistics
from nrc_audit.engine import overlap, pipeline, threads
from nrc_audit.engine.run import run_audit

PINNED = settings(derandomize=True, database=None, deadline=None, max_examples=40)
KERNELS = ["host", "device"]
DEVICE = torch.device(os.environ.get("NRC_AUDIT_TEST_DEVICE", "cpu"))  # benchmarks/gpu.py sets cuda

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def use_kernel(monkeypatch, kind: str, block_rows: int = 8) -> None:
    """Small CPU blocks (so a stream folds many of them), or the device kernel on CPU tensors."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_ROWS", block_rows)
    if kind == "device" and DEVICE.type == "cpu":
        monkeypatch.setattr(stats, "kernel_for", lambda device, block_rows=None: kernels._DeviceFolder())


def on(kind: str, x: np.ndarray) -> torch.Tensor:
    """The rows as a tensor where ``kind``'s kernel runs (CUDA for the device kernel when a GPU is given)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(DEVICE) if kind == "device" else t


def two_pass(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0)
    return len(x), x.mean(axis=0), xc.T @ xc


def assert_close(moments, x: np.ndarray, rtol: float = 1e-11) -> None:
    n, mean, scatter = moments.to_numpy()
    w_n, w_mean, w_scatter = two_pass(x)
    assert n == w_n
    spread = np.sqrt(np.abs(np.diag(w_scatter)).max() / w_n)
    assert np.abs(mean - w_mean).max() <= rtol * (np.abs(w_mean).max() + spread)
    assert np.abs(scatter - w_scatter).max() <= rtol * np.abs(w_scatter).max()


def shifted(n: int, p: int, seed: int, offset: float = 50.0) -> np.ndarray:
    """Rows with a mean far from 0 and a drift along the stream, so each block's Chan correction is large."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p) + offset + np.linspace(0, 20, n)[:, None]


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("batch", [1, 5, 13, 64])
def test_stream_over_many_blocks_matches_two_pass(monkeypatch, kind, batch):
    use_kernel(monkeypatch, kind)
    x = shifted(300, 6, seed=batch)  # 300 rows in blocks of 8: ≈ 38 folds, each with its own correction
    acc = Accumulator()
    for a in range(0, len(x), batch):
        acc.update(on(kind, x[a : a + batch]))
    assert_close(acc.moments, x)


@pytest.mark.parametrize("kind", KERNELS)
def test_joint_stream_over_many_blocks_matches_two_pass(monkeypatch, kind):
    use_kernel(monkeypatch, kind)
    h, y = shifted(257, 5, seed=1).astype(np.float32), shifted(257, 2, seed=2, offset=-30.0)
    acc = JointAccumulator(5)
    for a in range(0, 257, 11):
        acc.update_pair(on(kind, h[a : a + 11]), on(kind, y[a : a + 11]))
    s = acc.finalize()
    z = np.hstack([h.astype(np.float64), y])
    _, mean, scatter = two_pass(z)
    np.testing.assert_allclose(np.concatenate([s.mu_h, s.mu_y]), mean, rtol=1e-12)
    got = np.block([[s.s_hh, s.s_hy], [s.s_hy.T, s.s_yy]])
    assert np.abs(got - scatter).max() <= 1e-11 * np.abs(scatter).max()


@pytest.mark.parametrize("kind", KERNELS)
def test_kernels_count_nonfinite_rows_across_blocks(monkeypatch, kind):
    use_kernel(monkeypatch, kind)
    x = shifted(100, 3, seed=3)
    x[[4, 40, 41, 97], [0, 2, 1, 0]] = [np.nan, np.inf, np.nan, -np.inf]
    acc = Accumulator()
    for a in range(0, 100, 9):
        acc.update(on(kind, x[a : a + 9]))
    assert acc.nonfinite_rows == 4


@PINNED
@given(n=st.integers(2, 120), p=st.integers(1, 5), cuts=st.lists(st.integers(1, 119), max_size=5),
       batch=st.integers(1, 17), kind=st.sampled_from(KERNELS), seed=st.integers(0, 2**16))  # fmt: skip
def test_merge_law_on_the_production_kernels(n, p, cuts, batch, kind, seed):
    """Shards streamed through a kernel, merged in order with merge_from, equal the whole sample (two-pass)."""
    with pytest.MonkeyPatch.context() as mp:
        use_kernel(mp, kind, block_rows=4)
        x = shifted(n, p, seed)
        edges = sorted({0, n, *[c for c in cuts if c < n]})
        shards = []
        for a, b in zip(edges, edges[1:]):
            acc = Accumulator()
            for i in range(a, b, batch):
                acc.update(on(kind, x[i : min(i + batch, b)]))
            shards.append(acc)
        total = Accumulator()
        for acc in shards:
            total.merge_from(acc)
        assert_close(total.moments, x, rtol=1e-10)


def test_pass_statistics_merge_follows_the_declared_rules():
    layers = [pipeline.LayerInfo(0, "l0", "linear", 3, 2, False, torch.zeros(2, 3, dtype=torch.float64))]
    x, y = shifted(40, 3, seed=5), shifted(40, 2, seed=6)
    out = y + 0.1
    whole, first, second = PassStatistics(), PassStatistics(), PassStatistics()
    whole.update(layers, torch.from_numpy(out), torch.from_numpy(y), [torch.from_numpy(x)])
    first.update(layers, torch.from_numpy(out[:15]), torch.from_numpy(y[:15]), [torch.from_numpy(x[:15])])
    second.update(layers, torch.from_numpy(out[15:]), torch.from_numpy(y[15:]), [torch.from_numpy(x[15:])])
    merged = PassStatistics()
    merged.merge_from(first)
    merged.merge_from(second)
    assert (merged.n, merged.sse) == (40, pytest.approx(whole.sse, rel=1e-14))
    assert_close(merged.targets.moments, y)
    assert_close(merged.joint[0].moments, np.hstack([x, y]))
    assert {f: kernels.merge_rule(merged, f) for f in ("layers", "joint", "targets", "sse", "n")} == {
        "layers": "same", "joint": "chan", "targets": "chan", "sse": "sum", "n": "sum"}  # fmt: skip


# ----------------------------------------------------------------------------- the pipelined pass


def audit_json(case: dict, **overrides) -> dict:
    kwargs = {"model_path": case["ckpt"], "data_path": case["data"], "progress": False,
              "analysis": AnalysisOptions(require_collapsed=0)} | overrides  # fmt: skip
    return json.loads(run_audit(AuditConfig(**kwargs)).to_json())


@pytest.mark.parametrize("plan", ["serial", "1,1", "2,1"])
def test_pipelined_pass_over_many_batches_and_blocks_matches_the_dense_reference(mlp_case, monkeypatch, plan):
    monkeypatch.setattr(kernels, "MAX_BLOCK_ROWS", 16)  # 300 rows: ≈ 19 folds per layer
    monkeypatch.setenv(threads.ENV, plan)
    report = audit_json(mlp_case, batch_size=7)  # 43 batches through the worker queue
    names, feats, weights, out = capture(mlp_case["model"], torch.from_numpy(mlp_case["x"]))
    assert_layers_match(report["layers"], names, feats, weights, mlp_case["y"], out, k=report["settings"]["rank"])


def test_pipelined_and_serial_passes_give_identical_reports(mlp_case, monkeypatch):
    monkeypatch.setattr(kernels, "MAX_BLOCK_ROWS", 16)
    monkeypatch.setenv(threads.ENV, "serial")
    serial = audit_json(mlp_case, batch_size=9)
    monkeypatch.setenv(threads.ENV, "1,1")
    assert audit_json(mlp_case, batch_size=9) == serial  # one worker folds in order: bit for bit


def test_pipelined_batch_size_invariance_over_many_blocks(mlp_case, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "MAX_BLOCK_ROWS", 16)
    case = dict(mlp_case, ckpt=nrc_audit.save_checkpoint(mlp_case["model"].double(), tmp_path / "m64.safetensors",
                                                          arch={"family": "mlp", "activation": "relu"}))  # fmt: skip
    full, small = audit_json(case, batch_size=10_000), audit_json(case, batch_size=5)
    for a, b in zip(full["layers"], small["layers"]):
        for key in ("nrc1", "nrc2", "nrc3", "nrc4", "cka_signal", "stable_rank"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-11), key


def test_fold_worker_raises_the_folds_error_on_the_callers_thread():
    def fold(i: int) -> None:
        if i == 3:
            raise ValueError("fold failed at 3")

    worker = overlap.FoldWorker(fold, depth=1)
    with pytest.raises(ValueError, match="fold failed at 3"):
        for i in range(50):
            worker.put(i)
        worker.finish()
    worker.cancel()  # safe after the error
    worker.cancel()


def test_fold_worker_folds_in_order():
    seen: list[int] = []
    worker = overlap.FoldWorker(seen.append)
    for i in range(100):
        worker.put(i)
    worker.finish()
    assert seen == list(range(100))


def test_thread_plans():
    assert threads.plan("auto", cores=2) == threads.ThreadPlan(1, 1, True, adaptive=True)
    assert threads.plan("auto", cores=16) == threads.ThreadPlan(8, 8, True, adaptive=True)
    assert threads.plan("auto", cores=1) == threads.ThreadPlan(1, 1, True, adaptive=True)
    assert threads.plan("3,2") == threads.ThreadPlan(3, 2, True)
    assert threads.plan("serial") == threads.ThreadPlan(None, None, False)
    with pytest.raises(nrc_audit.errors.OptionsError, match="NRC_AUDIT_THREADS='two' is not a thread plan; use auto"):
        threads.plan("two")


def test_light_folds_give_the_forward_every_core_only_under_auto():
    auto = threads.plan("auto", cores=2)
    # the benchmark MLP 14→512×7→4: 3.16 Mflop per row forward against 7 × 516² + 18² fold columns
    mlp = threads.fold_share(2 * (14 * 512 + 6 * 512 * 512 + 512 * 4), [18] + [516] * 7)
    assert 0.5 < mlp < 0.6 and threads.for_fold_cost(auto, mlp, cores=2) == auto
    conv = threads.fold_share(50e6, [20, 36, 68])  # a small ResNet: 50 Mflop per image, narrow pooled features
    assert conv < 0.01 and threads.for_fold_cost(auto, conv, cores=2) == threads.ThreadPlan(2, 1, True)
    assert threads.for_fold_cost(auto, None, cores=2) == auto  # flops not countable: unchanged
    assert threads.for_fold_cost(threads.plan("1,1"), conv, cores=2) == threads.plan("1,1")  # the user's plan wins


def test_the_pass_counts_the_forward_and_rebalances(mlp_case, monkeypatch):
    """The pass asks for the plan once, after batch 1, with the share computed from torch's flop count."""
    seen = []
    decide = threads.for_fold_cost
    monkeypatch.setattr(threads, "for_fold_cost", lambda p, share, cores=None: seen.append(share) or decide(p, share, cores))
    monkeypatch.setenv(threads.ENV, "auto")
    audit_json(mlp_case)
    model = mlp_case["model"]  # Linear layers only: 2·in·out flops per row each, as torch counts them
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops = sum(2 * m.in_features * m.out_features for m in linears)
    t = linears[-1].out_features
    assert seen == [pytest.approx(threads.fold_share(flops, [m.in_features + t for m in linears]))]


def test_a_forward_that_cannot_be_counted_keeps_the_plan(mlp_case, monkeypatch):
    from nrc_audit.engine import extract

    class Refuses:
        def __init__(self, *a, **kw):
            raise RuntimeError("no flop formula")

    seen = []
    decide = threads.for_fold_cost
    monkeypatch.setattr(extract, "ForwardFlops", Refuses)
    monkeypatch.setattr(threads, "for_fold_cost", lambda p, share, cores=None: seen.append(share) or decide(p, share, cores))
    monkeypatch.setenv(threads.ENV, "auto")
    assert audit_json(mlp_case)["layers"]  # the audit itself is untouched
    assert seen == [None]


def test_quiet_idle_threads_keeps_the_users_settings(monkeypatch):
    late = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.quiet_idle_threads(late) is False  # numpy and torch are loaded in this process: too late
    assert late == {"OMP_WAIT_POLICY": "ACTIVE"}
    for name in ("numpy", "torch"):  # as before the CLI imports them: the settings are written
        monkeypatch.delitem(sys.modules, name)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.quiet_idle_threads(env) is True
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}  # the user's policy wins


@pytest.mark.parametrize("given_policy, want", [(None, "PASSIVE 4"), ("ACTIVE", "ACTIVE 4")])
def test_the_cli_sets_the_wait_settings_before_numpy_loads(given_policy, want):
    env = {k: v for k, v in os.environ.items() if k not in threads.IDLE_SETTINGS}
    if given_policy:
        env["OMP_WAIT_POLICY"] = given_policy
    # cli.app loads neither numpy nor torch (--help stays fast); the settings must be in place by then anyway
    code = ("import os, sys, nrc_audit.cli.app; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'])")  # fmt: skip
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == want


def test_thread_plan_is_restored_after_the_pass(mlp_case, monkeypatch):
    monkeypatch.setenv(threads.ENV, "1,1")
    torch.set_num_threads(2)
    try:
        audit_json(mlp_case)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_the_pass_forwards_with_the_plans_torch_threads(monkeypatch):
    """The forward (and the flop probe) run inside the plan: torch's pool has the plan's size there."""
    monkeypatch.setenv(threads.ENV, "3,1")
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    nrc_audit.audit(net, [(x[:32], y[:32]), (x[32:], y[32:])], require_collapsed=0)
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == 1  # and restored afterwards


def _numpy_blas_threads() -> int:
    from threadpoolctl import threadpool_info

    # numpy's own OpenBLAS (scipy ships a second one, which the pass's folds do not use)
    (blas,) = [i for i in threadpool_info() if i["internal_api"] == "openblas" and "numpy" in i["filepath"]]
    return blas["num_threads"]


@pytest.fixture
def numpy_blas_at_two_threads():
    """numpy's OpenBLAS at 2 threads, so that a plan of 1 is visible even on a 1-core machine."""
    from threadpoolctl import ThreadpoolController

    with ThreadpoolController().select(internal_api="openblas").limit(limits=2):
        assert _numpy_blas_threads() == 2
        yield


def test_thread_plan_sizes_numpys_blas(numpy_blas_at_two_threads):
    # read back through threadpoolctl's own inventory, not through the code under test
    with threads.applied(threads.ThreadPlan(1, 1, True)):
        assert _numpy_blas_threads() == 1 and torch.get_num_threads() == 1
    assert _numpy_blas_threads() == 2
    assert threads.parallel_map(lambda _: _numpy_blas_threads(), range(4), cores=2) == [1, 1, 1, 1]


def test_the_pass_folds_with_the_plans_blas_threads(mlp_case, monkeypatch, numpy_blas_at_two_threads):
    seen = []
    update = PassStatistics.update

    def spy(self, *args, **kw):  # every batch's folds, on the fold worker
        seen.append(_numpy_blas_threads())
        return update(self, *args, **kw)

    monkeypatch.setattr(PassStatistics, "update", spy)
    monkeypatch.setenv(threads.ENV, "1,1")
    audit_json(mlp_case)
    assert seen and set(seen) == {1}


def test_store_writer_keeps_at_most_queue_bytes_in_flight(monkeypatch, tmp_path):
    """A writer slowed by the disk may hold back the pass: it queues no more than QUEUE_BYTES (≥ 1 batch) of rows
    besides the batch it is writing."""
    import threading
    import time

    from nrc_audit.io import store

    monkeypatch.setattr(store, "QUEUE_BYTES", 1)  # every batch is over budget: one batch in flight
    layers = [pipeline.LayerInfo(0, "l0", "linear", 3, 2, False, torch.zeros(2, 3, dtype=torch.float64))]
    writer = store.FeatureStoreWriter(tmp_path / "s.h5", 40, layers, attrs={})
    original, busy, most = writer._write_now, [0], [0]
    lock = threading.Lock()

    def slow(start, arrays):
        with lock:
            busy[0] += 1
        time.sleep(0.02)
        original(start, arrays)
        with lock:
            busy[0] -= 1

    monkeypatch.setattr(writer, "_write_now", slow)
    for a in range(0, 40, 8):
        writer.write(a, torch.zeros(8, 2), torch.zeros(8, 2), [torch.ones(8, 3)])
        most[0] = max(most[0], writer._worker.queue.qsize() + busy[0])
    writer.close(complete=True)
    assert most[0] <= 2  # one batch queued (the byte bound) while one is being written
    with store.FeatureStore(tmp_path / "s.h5") as fs:
        assert fs.n == 40
