"""(c) Gram-accumulation throughput against this machine's float32 matmul throughput.

    python benchmarks/gram_throughput.py            # CPU; add --device cuda on a GPU machine

Feeds synthetic ReLU-like float32 features (B, h) and targets (B, t) through the package's
``JointAccumulator`` (float64 products, per-batch centring, Chan merge) and compares its rate with
(1) a float32 GEMM of the same shape, (2) float64 GEMM and syrk, and (3) the v0.1 accumulator
(concatenate [H | Y], cast, torch float64 GEMM, separate Chan merge), kept here for the before/after.
Rates are "GEMM-equivalent": 2·N·h² flops for a full h×h Gram, whatever the kernel does.
Prints a table and updates the ``gram`` section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from _common import Machine, markdown_table, stamp, update_doc_section
from nrc_audit.core.stats import JointAccumulator, batch_moments, merge


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, reps: int, device: torch.device) -> float:
    """Minimum wall time of ``fn()`` over ``reps`` runs (after one warm-up)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def v01_update_pair(state, feats: torch.Tensor, targets: torch.Tensor):
    """The v0.1 accumulator step: cat → float64 → centre → torch GEMM → Chan merge (new tensors each time)."""
    return merge(state, batch_moments(torch.cat([feats.to(torch.float64), targets.to(torch.float64)], dim=1)))


def features(n_batches: int, b: int, h: int, t: int, device: torch.device, seed: int = 0):
    """ReLU-like float32 features with a large common mean (the case centring exists for) and targets."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mix = torch.randn(h, h, generator=gen) / h**0.5
    out = []
    for _ in range(min(n_batches, 4)):  # a few distinct batches, cycled (their values do not matter)
        f = torch.relu(torch.randn(b, h, generator=gen) @ mix + 0.5)
        y = f[:, :t] @ torch.randn(t, t, generator=gen) + 0.1 * torch.randn(b, t, generator=gen)
        out.append((f.to(device), y.to(device=device, dtype=torch.float64)))
    return [out[i % len(out)] for i in range(n_batches)]


def measure(device: torch.device, n: int, b: int, h: int, t: int, reps: int) -> list[list[object]]:
    batches = features(max(1, n // b), b, h, t, device)
    rows_total = len(batches) * b
    gemm_flops = 2.0 * rows_total * h * h  # a full (h, h) Gram over all rows, as a GEMM

    def gflops(seconds: float) -> float:
        return gemm_flops / seconds / 1e9

    w32 = torch.randn(h, h, device=device)
    results: dict[str, float] = {}
    results["float32 matmul (B,h)·(h,h), torch"] = best_of(lambda: [f @ w32 for f, _ in batches], reps, device)
    results["float64 GEMM HᵀH, torch"] = best_of(
        lambda: [f.double().T @ f.double() for f, _ in batches], reps, device)  # fmt: skip
    if device.type == "cpu":
        host = [f.numpy().astype(np.float64) for f, _ in batches]
        copies = [a.copy() for a in host]
        results["float64 GEMM HᵀH, numpy"] = best_of(lambda: [a.T @ c for a, c in zip(host, copies)], reps, device)
        results["float64 syrk HᵀH, numpy"] = best_of(lambda: [a.T @ a for a in host], reps, device)

    def v01() -> None:
        state = None
        for f, y in batches:
            state = v01_update_pair(state, f, y)

    def current() -> None:
        acc = JointAccumulator(h)
        for f, y in batches:
            acc.update_pair(f, y)
        acc.finalize()

    results["v0.1 accumulator (cat + torch float64 GEMM)"] = best_of(v01, reps, device)
    results["nrc-audit JointAccumulator (float64)"] = best_of(current, reps, device)
    f32 = results["float32 matmul (B,h)·(h,h), torch"]
    rows = []
    for name, seconds in results.items():
        rows.append([name, f"{seconds:.3f}", f"{rows_total / seconds / 1e3:.0f}", f"{gflops(seconds):.1f}",
                     f"{f32 / seconds:.2f}"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=65536, help="rows per measurement (default 65536)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per update (the audit default)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--targets", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md alone")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = Machine.here()
    rows = measure(device, args.rows, args.batch_size, args.width, args.targets, args.reps)
    headers = ["kernel", "seconds", "k rows/s", "GEMM-equiv GFLOP/s", "speed vs float32 matmul"]
    table = markdown_table(headers, rows)
    print(table)
    if args.no_doc:
        return
    section = "gram" if device.type == "cpu" else "gram-gpu"
    body = (f"{stamp(machine)} Device `{device}`; {args.rows} rows in batches of {args.batch_size}, "
            f"h = {args.width}, t = {args.targets}; best of {args.reps}.\n\n{table}")  # fmt: skip
    update_doc_section(section, body)


if __name__ == "__main__":
    sys.exit(main())
