"""Feature-store chunk size and compression, chosen by measurement (the writer alone, no compute).

    python benchmarks/chunking.py            # N = 50k rows of SGEMM-like features (≈ 720 MiB), ≈ 2 min

Runs the SGEMM-like MLP once over N rows and keeps its outputs and 8 feature batches in memory, then
writes them with ``FeatureStoreWriter`` for each chunk size (``store.CHUNK_BYTES``) and compression, and
once with plain h5py into contiguous datasets for reference. "write s" is the writer's wall time (queue,
HDF5 writes, close); "sync s" the time ``os.sync()`` then needs to put the bytes on disk. Prints a table and
updates the ``chunking`` section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from _common import Machine, markdown_table, sgemm_like_mlp, sgemm_like_rows, stamp, update_doc_section
from nrc_audit.io import store
from nrc_audit.engine.extract import FeatureExtractor
from nrc_audit.engine.layer_kinds import candidate_layers


def batches_of_features(n: int, batch_size: int):
    model = sgemm_like_mlp()
    x, y = sgemm_like_rows(n)
    out = []
    with FeatureExtractor(model, candidate_layers(model, (), ())) as ex:
        for a in range(0, n, batch_size):
            o, feats = ex.run(torch.from_numpy(x[a : a + batch_size]))
            out.append((a, o, torch.from_numpy(y[a : a + batch_size].astype(np.float64)), feats))
        layers = ex.layers
    return layers, out


def write_with_writer(path: Path, n: int, layers, batches, compression: str | None) -> float:
    start = time.perf_counter()
    writer = store.FeatureStoreWriter(path, n, layers, {"context": "{}"}, compression)
    for a, o, y, feats in batches:
        writer.write(a, o, y, feats)
    writer.close(complete=True)
    return time.perf_counter() - start


def write_plain(path: Path, n: int, batches) -> float:
    start = time.perf_counter()
    with h5py.File(path, "w") as fh:
        _, o0, y0, f0 = batches[0]
        dsets = [fh.create_dataset("outputs", (n, o0.shape[1]), np.float32),
                 fh.create_dataset("targets", (n, y0.shape[1]), np.float64)]  # fmt: skip
        dsets += [fh.create_dataset(f"layers/{i:02d}", (n, f.shape[1]), np.float32) for i, f in enumerate(f0)]
        for a, o, y, feats in batches:
            for ds, arr in zip(dsets, [o, y, *feats]):
                ds[a : a + len(arr)] = arr.numpy()
    return time.perf_counter() - start


def timed_sync() -> float:
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk-kib", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--compression", nargs="+", default=["none", "lzf", "gzip"])
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    machine = Machine.here()
    layers, batches = batches_of_features(args.n, args.batch_size)
    raw_mib = sum(a.numel() * a.element_size() for _, o, y, f in batches for a in (o, y, *f)) / 2**20
    rows = []
    default_chunk = store.CHUNK_BYTES
    with tempfile.TemporaryDirectory(prefix="nrc-chunking-", dir=args.dir) as tmp:
        path = Path(tmp) / "store.h5"
        timed_sync()
        seconds = write_plain(path, args.n, batches)
        sync = timed_sync()
        rows.append(["plain h5py, contiguous", "-", "-", f"{seconds:.2f}", f"{sync:.2f}",
                     f"{raw_mib / (seconds + sync):.0f}", f"{path.stat().st_size / 2**20:.0f}"])  # fmt: skip
        path.unlink()
        for comp in args.compression:
            for kib in args.chunk_kib:
                store.CHUNK_BYTES = kib * 1024
                try:
                    seconds = write_with_writer(path, args.n, layers, batches, None if comp == "none" else comp)
                    sync = timed_sync()
                finally:
                    store.CHUNK_BYTES = default_chunk
                size = path.stat().st_size / 2**20
                path.unlink()
                rows.append(["FeatureStoreWriter", f"{kib} KiB", comp, f"{seconds:.2f}", f"{sync:.2f}",
                             f"{raw_mib / (seconds + sync):.0f}", f"{size:.0f}"])  # fmt: skip
                print(rows[-1], file=sys.stderr, flush=True)
    table = markdown_table(["writer", "chunk", "compression", "write s", "sync s", "MiB/s incl. sync", "file MiB"],
                           rows)  # fmt: skip
    body = (f"{stamp(machine)} N = {args.n:,} rows of the SGEMM-like features ({raw_mib:,.0f} MiB raw), batches "
            f"of {args.batch_size}; the default is `CHUNK_BYTES = {default_chunk // 1024} KiB`, no compression."
            f"\n\n{table}")  # fmt: skip
    print(body)
    if not args.no_doc:
        update_doc_section("chunking", body)


if __name__ == "__main__":
    sys.exit(main())
