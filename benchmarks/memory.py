"""(b) Peak RSS of one audit at N = 50k, 200k and 1M rows: memory must not grow with N.

    python benchmarks/memory.py                       # ≈ 4 min on 2 cores (the 1M run dominates)
    python benchmarks/memory.py --sizes 50000 200000  # quicker

The SGEMM-like MLP (14→512×7→4) on the first N rows of one synthetic 1M-row HDF5 file. Each audit runs
in a fresh process (``--no-features``: the statistics, not the disk, are what could grow with N; one
extra run per size up to ``--store-max`` also writes the feature store to disk, to show the background
writer's queue is bounded). The child reports ``ru_maxrss`` (peak RSS) and its RSS just before the
audit (after imports and a small warm-up audit). Prints a table and updates the ``memory`` section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import (Machine, current_rss_mib, make_workload, markdown_table, peak_rss_mib, run_child, stamp,
                     update_doc_section, write_dataset)  # fmt: skip


def child(model: Path, data: Path, n: int, batch_size: int, store: str) -> dict:
    from nrc_audit.config import AuditConfig, DataOptions
    from nrc_audit.engine.run import run_audit

    def config(limit: int, features: Path | None) -> AuditConfig:
        return AuditConfig(model, data, data=DataOptions(limit=limit), device="cpu", batch_size=batch_size,
                           features_path=features, progress=False)  # fmt: skip

    features = Path(store) if store != "-" else None
    run_audit(config(2 * batch_size, features))  # warm-up: lazy library state is not a function of N
    before = current_rss_mib()
    start = time.perf_counter()
    run_audit(config(n, features))
    wall = time.perf_counter() - start
    if features is not None:
        features.unlink(missing_ok=True)
    return {"n": n, "peak": peak_rss_mib(), "before": before, "after": current_rss_mib(), "wall": wall}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--store-max", type=int, default=200_000, help="also write the store for N up to this (0: never)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model, data, n, store = args.child
        print(json.dumps(child(Path(model), Path(data), int(n), args.batch_size, store)))
        return

    machine = Machine.here()
    script = Path(__file__)
    results = []
    with tempfile.TemporaryDirectory(prefix="nrc-memory-", dir=args.dir) as tmp:
        folder = Path(tmp)
        data = write_dataset(folder / f"data-{max(args.sizes)}.h5", max(args.sizes))
        model, _ = make_workload(folder, max(args.sizes))
        for n in args.sizes:
            stores = ["-"] + ([str(folder / "store.h5")] if n <= args.store_max else [])
            for store in stores:
                r = run_child(script, [str(model), str(data), str(n), store, "--batch-size", str(args.batch_size)])
                r["store"] = store != "-"
                results.append(r)
                print(f"N={n:,} store={r['store']}: peak {r['peak']:.0f} MiB, {r['wall']:.1f} s", file=sys.stderr)
    rows = [[f"{r['n']:,}", "yes" if r["store"] else "no", f"{r['wall']:.1f}", f"{r['before']:.0f}",
             f"{r['peak']:.0f}", f"{r['peak'] - r['before']:.0f}"] for r in results]  # fmt: skip
    table = markdown_table(["N", "feature store", "audit s", "RSS before MiB", "peak RSS MiB",
                            "peak − before MiB"], rows)  # fmt: skip
    plain = [r for r in results if not r["store"]]
    growth = (plain[-1]["peak"] - plain[0]["peak"]) / plain[0]["peak"]
    body = "\n".join([
        f"{stamp(machine)} SGEMM-like MLP, batch {args.batch_size}, each audit in a fresh process.",
        "",
        table,
        "",
        f"**Peak RSS grows by {growth:.1%}** from N = {plain[0]['n']:,} to N = {plain[-1]['n']:,} (no store).",
    ])  # fmt: skip
    print(body)
    if not args.no_doc:
        update_doc_section("memory", body)


if __name__ == "__main__":
    sys.exit(main())
