"""The per-layer analysis (eigh of Σ_H, SVD of W, the conditions) against the width h: O(h³), independent of N.

    python benchmarks/analysis.py                       # h = 128, 256, 512, 1024, 2048 (≈ 2 min on 2 cores)
    python benchmarks/analysis.py --widths 4096         # ≈ 1 min per layer more on 2 cores

For each h: one layer's ``layer_metrics`` (statistics of N = 4h synthetic rows, a random h×h weight, t = 4),
then eight such layers one after the other (numpy's BLAS on every core, then on one thread) and layer-parallel
as the audit runs them (``engine.threads.parallel_map``: one layer per core, BLAS one thread each). Minimum of ``--reps``.
Updates the ``analysis`` section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nrc_audit.engine.threads import quiet_idle_threads  # noqa: E402 — before numpy and torch load

quiet_idle_threads()

import numpy as np  # noqa: E402

from _common import Machine, markdown_table, stamp, update_doc_section  # noqa: E402
from nrc_audit.config import Thresholds  # noqa: E402
from nrc_audit.core.conditions import layer_metrics  # noqa: E402
from nrc_audit.core.stats import LayerStatistics  # noqa: E402
from nrc_audit.engine import threads  # noqa: E402
from nrc_audit.engine.threads import parallel_map  # noqa: E402


def layer_case(h: int, seed: int) -> tuple[LayerStatistics, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, t = 4 * h, 4
    hm = np.maximum(rng.standard_normal((n, h)) @ (rng.standard_normal((h, h)) / np.sqrt(h)), 0)  # ReLU features
    y = hm[:, :t] @ rng.standard_normal((t, t)) + 0.1 * rng.standard_normal((n, t))
    z = np.hstack([hm, y])
    zc = z - z.mean(axis=0)
    s = zc.T @ zc
    stats = LayerStatistics(n, z[:, :h].mean(0), z[:, h:].mean(0), s[:h, :h], s[:h, h:], s[h:, h:])
    return stats, rng.standard_normal((h, h)) / np.sqrt(h)


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    machine = Machine.here()
    rows = []
    for h in args.widths:
        stats, w = layer_case(h, seed=h)
        run = lambda _: layer_metrics(stats, w, 4, 0.01, 1e-3, Thresholds())  # noqa: E731
        one = best(lambda: run(0), args.reps)
        reps = 1 if h >= 2048 else args.reps
        serial = best(lambda: [run(i) for i in range(args.layers)], reps)
        with threads.blas_limit(1):
            serial1 = best(lambda: [run(i) for i in range(args.layers)], reps)
        parallel = best(lambda: parallel_map(run, range(args.layers)), reps)
        rows.append([h, f"{one:.3f}", f"{serial:.2f}", f"{serial1:.2f}", f"{parallel:.2f}", f"{serial / parallel:.2f}×"])
        print(f"h={h}: one layer {one:.3f} s, {args.layers} serial {serial:.2f} s, serial 1 thread {serial1:.2f} s, "
              f"parallel {parallel:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    table = markdown_table(["h", "one layer s (BLAS all cores)", f"{args.layers} layers one by one, BLAS all cores s",
                            f"{args.layers} layers one by one, BLAS 1 thread s", f"{args.layers} layers layer-parallel s",
                            "speed-up (col 3 ÷ col 5)"], rows)  # fmt: skip
    body = f"{stamp(machine)} Minimum of {args.reps} runs (1 at h ≥ 2048).\n\n{table}"
    print(body)
    if not args.no_doc:
        update_doc_section("analysis", body)


if __name__ == "__main__":
    sys.exit(main())
