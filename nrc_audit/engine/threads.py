"""How the audit shares the CPU cores: torch's pool runs the forward, numpy's BLAS the float64 folds.

On the CPU the pass is pipelined (``engine.overlap.FoldWorker``): the main thread runs the float32 forward
while a worker thread folds the previous batch's float64 statistics. The two thread pools are therefore
sized to split the cores between them instead of each claiming them all — two pools of 2 threads on 2
cores spend most of their CPU spinning and synchronising against each other.

Override with ``NRC_AUDIT_THREADS``:

* ``auto`` (default): torch gets ⌈cores/2⌉ threads, BLAS the rest (at least 1 each); folds overlapped;
* ``T,B``: torch T threads, BLAS B threads; folds overlapped;
* ``serial``: leave both pools as they are and fold on the main thread (the unpipelined pass).

Idle OpenMP/OpenBLAS threads spin for a while after each call before they sleep, which on a machine
with as many threads as cores steals the other pool's core. :func:`quiet_idle_threads` sets the wait
settings that stop it; they are read when the libraries load, so the CLI calls it before importing numpy
or torch (a user's own ``OMP_WAIT_POLICY`` / ``OPENBLAS_THREAD_TIMEOUT`` win).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

ENV = "NRC_AUDIT_THREADS"
IDLE_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}  # 2⁴ cycles: sleep at once


def quiet_idle_threads(environ: dict | None = None) -> bool:
    """Set the no-spin wait settings unless the user set them or numpy/torch are already loaded."""
    env = os.environ if environ is None else environ
    if "numpy" in sys.modules or "torch" in sys.modules:
        return False  # too late: the libraries have read their settings
    for key, value in IDLE_SETTINGS.items():
        env.setdefault(key, value)
    return True


@dataclass(frozen=True)
class ThreadPlan:
    """torch_threads for the forward, blas_threads for the folds; pipelined: folds on a worker thread."""

    torch_threads: int | None
    blas_threads: int | None
    pipelined: bool
    adaptive: bool = False  # ``auto``: :func:`for_fold_cost` may give the forward more threads after batch 1


# Folds below this share of the pass's compute leave the forward's cores idle under the even split: the
# forward then gets every core (conv nets, whose pooled features are narrow). Measured on 2 cores, a small
# ResNet (fold share ≈ 1 %): 1.44× → 1.21× of bare forward + writes; the MLP of the benchmarks (≈ 54 %) keeps
# the even split. The float64 syrk of n·p² costs about what a float32 GEMM of 2·n·p² flops does (docs (c)).
LIGHT_FOLD_SHARE = 1 / 3
SYRK_FLOP_RATIO = 2.0


def plan(spec: str | None = None, cores: int | None = None) -> ThreadPlan:
    """The plan for ``spec`` (default: ``$NRC_AUDIT_THREADS`` or ``auto``) on ``cores`` usable cores.

    Example:
        >>> plan("auto", cores=2), plan("3,1", cores=2).torch_threads, plan("serial").pipelined
        (ThreadPlan(torch_threads=1, blas_threads=1, pipelined=True, adaptive=True), 3, False)
    """
    from nrc_audit.errors import OptionsError

    spec = (spec if spec is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if spec == "serial":
        return ThreadPlan(None, None, False)
    if spec == "auto":
        n = cores or _usable_cores()
        forward = max(1, (n + 1) // 2)
        return ThreadPlan(forward, max(1, n - forward), True, adaptive=True)
    try:
        forward, blas = (int(v) for v in spec.split(","))
        if forward < 1 or blas < 1:
            raise ValueError
    except ValueError:
        raise OptionsError(
            f"{ENV}={spec!r} is not a thread plan; use auto, serial, or TORCH,BLAS thread counts such as 1,1."
        ) from None
    return ThreadPlan(forward, blas, True)


def fold_share(forward_flops: float, fold_widths: Iterable[int]) -> float:
    """The folds' share of the pass's compute per row: ``forward_flops`` (float32, per row) against the
    float64 syrk of every folded block, p = h_ℓ + t columns each (as float32-GEMM-equivalent flops)."""
    fold = SYRK_FLOP_RATIO * sum(p * p for p in fold_widths)
    total = fold + max(0.0, forward_flops)
    return fold / total if total > 0 else 1.0


def for_fold_cost(p: ThreadPlan, share: float | None, cores: int | None = None) -> ThreadPlan:
    """The plan once the first batch has shown the folds' share of the compute (None: unknown → unchanged).

    Example:
        >>> for_fold_cost(plan("auto", cores=2), 0.01, cores=2)
        ThreadPlan(torch_threads=2, blas_threads=1, pipelined=True, adaptive=False)
        >>> for_fold_cost(plan("auto", cores=2), 0.54, cores=2) == plan("auto", cores=2)
        True
    """
    if not p.adaptive or share is None or share >= LIGHT_FOLD_SHARE:
        return p
    return ThreadPlan(cores or _usable_cores(), p.blas_threads, True)


def rebalanced(p: ThreadPlan, forward_flops: float | None, fold_widths: Iterable[int]) -> ThreadPlan:
    """Apply :func:`for_fold_cost` after the first batch: a rule on counted flops, not on timings, so that a
    run's thread counts (and with them its float32 forward) are reproducible. :func:`applied` restores
    the caller's torch thread count after the pass."""
    import torch

    share = None if forward_flops is None else fold_share(forward_flops, fold_widths)
    new = for_fold_cost(p, share)
    if new.torch_threads is not None and new.torch_threads != p.torch_threads:
        torch.set_num_threads(new.torch_threads)
    return new


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def applied(p: ThreadPlan) -> Iterator[ThreadPlan]:
    """Size torch's and numpy's BLAS pools for the pass, and restore them afterwards."""
    import torch

    if p.torch_threads is None:
        yield p
        return
    before = torch.get_num_threads()
    torch.set_num_threads(p.torch_threads)
    try:
        with blas_limit(p.blas_threads):
            yield p
    finally:
        torch.set_num_threads(before)


def blas_limit(threads: int | None) -> contextlib.AbstractContextManager:
    """numpy's OpenBLAS only (internal_api "openblas"): torch's MKL follows ``torch.set_num_threads``."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it numpy's BLAS keeps its own size
        return contextlib.nullcontext()
    if not threads:
        return contextlib.nullcontext()
    # select by internal_api: ``threadpool_limits(limits={"openblas": n})`` matches a *prefix* or user_api and
    # so silently limits nothing with numpy's "libscipy_openblas" build (measured: the pass ran at 2 threads)
    return ThreadpoolController().select(internal_api="openblas").limit(limits=threads)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], cores: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on one thread per core, numpy's BLAS one thread each (LAPACK releases the GIL).

    The per-layer analysis (eigh of Σ_H, SVD of W: O(h³), independent of N) runs layer-parallel this way
    instead of one layer at a time on a multi-threaded LAPACK that scales poorly at these sizes.
    """
    items = list(items)
    workers = min(len(items), cores or _usable_cores())
    if workers <= 1:
        return [fn(x) for x in items]
    with blas_limit(1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nrc-audit-analysis") as pool:
        return list(pool.map(fn, items))
