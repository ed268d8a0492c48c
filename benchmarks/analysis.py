"""The per-layer analysis (Σ_H's spectrum, W's input subspace, the conditions) against the width h: O(h³), independent of N.

    python benchmarks/analysis.py                                   # h = 768, 3072 (≈ 3 min on 2 cores)
    python benchmarks/analysis.py --widths 4096 --section analysis-4096   # ≈ 4 min more, mostly the "before" SVD

For each h: one layer's ``layer_metrics`` (statistics of N = h + 256 synthetic ReLU rows, a random h×h weight
as at initialisation — the hardest case for the certified subspace, whose singular-value gaps are smallest —
t = 4, k = 4), on one BLAS thread as the audit's layer-parallel analysis runs each layer: **before** = the full
eigh of Σ_H and full SVD of W (``spectra.FAST_MIN_WIDTH`` raised out of reach), **after** = the tridiagonal
Σ_H path and the certified Ritz subspace of W (``nrc_audit/core/spectra.py``), the largest difference of any
metric between the two, and whether the certificate held. Updates the ``analysis`` section of docs/performance.md.
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

from _common import Machine, load_average, markdown_table, stamp, update_doc_section  # noqa: E402
from nrc_audit.config import Thresholds  # noqa: E402
from nrc_audit.core import spectra  # noqa: E402
from nrc_audit.core.conditions import METRIC_FIELDS, layer_metrics  # noqa: E402
from nrc_audit.core.stats import LayerStatistics  # noqa: E402
from nrc_audit.engine import threads  # noqa: E402


def layer_case(h: int, seed: int) -> tuple[LayerStatistics, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, t = h + 256, 4
    hm = np.maximum(rng.standard_normal((n, h)) @ (rng.standard_normal((h, h)) / np.sqrt(h)), 0)  # ReLU features
    y = hm[:, :t] @ rng.standard_normal((t, t)) + 0.1 * rng.standard_normal((n, t))
    z = np.hstack([hm, y])
    zc = z - z.mean(axis=0)
    s = zc.T @ zc
    stats = LayerStatistics(n, z[:, :h].mean(0), z[:, h:].mean(0), s[:h, :h], s[:h, h:], s[h:, h:])
    return stats, rng.standard_normal((h, h)) / np.sqrt(h)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[768, 3072])
    p.add_argument("--section", default="analysis", help="docs/performance.md section to replace")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    machine = Machine.here()
    rows = []
    for h in args.widths:
        stats, w = layer_case(h, seed=h)
        run = lambda: layer_metrics(stats, w, 4, 0.01, 1e-3, Thresholds())  # noqa: E731
        a = spectra.weight_spectrum(np.ascontiguousarray(w.T), 4, 1e-6)
        load = [load_average()]
        with threads.blas_limit(1):
            after_s, after = timed(run)
            load.append(load_average())
            fast_min, spectra.FAST_MIN_WIDTH = spectra.FAST_MIN_WIDTH, 10**9
            try:
                before_s, before = timed(run)
            finally:
                spectra.FAST_MIN_WIDTH = fast_min
            load.append(load_average())
        diff = max(abs(getattr(after, f) - getattr(before, f)) for f in METRIC_FIELDS
                   if getattr(after, f) is not None and getattr(before, f) is not None)  # fmt: skip
        rows.append([h, f"{before_s:.2f}", f"{after_s:.2f}", f"{before_s / after_s:.1f}×", f"{diff:.1e}",
                     "certified" if not a.exact else "fell back to the exact SVD",
                     f"{min(load):.1f}–{max(load):.1f}"])  # fmt: skip
        print(f"h={h}: before {before_s:.2f} s, after {after_s:.2f} s, max diff {diff:.1e}, load {load}",
              file=sys.stderr, flush=True)  # fmt: skip
    table = markdown_table(["h", "before s (full eigh + full SVD)", "after s", "speed-up", "max |Δ metric|",
                            "W subspace", "1-min load"], rows)  # fmt: skip
    body = f"{stamp(machine)} One layer, BLAS one thread, one run each (after first, then before).\n\n{table}"
    print(body)
    if not args.no_doc:
        update_doc_section(args.section, body)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


if __name__ == "__main__":
    sys.exit(main())
