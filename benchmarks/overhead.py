"""(a) The audit's wall time against a bare forward pass plus writing the same features with h5py.

    python benchmarks/overhead.py                  # N = 200k, CPU (≈ 3 min on 2 cores)
    python benchmarks/overhead.py --device cuda    # on a GPU machine (benchmarks/gpu.py does this)

Workload: the SGEMM-like MLP (14→512×7→4, 8 Linear layers, random He-normal weights) on N synthetic rows
in an HDF5 file. All in this one process, each measurement the best of ``--reps``, alternating:

* **bare forward**: read X in batches from the HDF5 file, forward with hooks that keep every Linear input;
* **bare forward + h5py**: the same, writing outputs, targets and all 8 feature matrices with plain h5py
  (contiguous datasets, written in the loop) — the reference of the overhead figure;
* **audit, no store**: ``run_audit`` with ``--no-features`` (forward + float64 statistics + report);
* **audit**: ``run_audit`` writing the feature store — the same bytes as the reference, plus everything
  the audit computes. **overhead = audit / (bare forward + h5py)**.

A last, instrumented audit run attributes the time to its parts (forward, float64 Gram/statistics, queueing
for the writer, the writer thread's HDF5 time, the report). Prints the tables and updates the ``overhead``
section of docs/performance.md (``overhead-gpu`` on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from _common import Machine, drop_dirty_pages, load_average, make_workload, markdown_table, stamp, update_doc_section
from nrc_audit.engine import pipeline
from nrc_audit.io import store
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.models.architecture import resolve_model
from nrc_audit.io.checkpoint import load_checkpoint


def bare_pass(model_path: Path, data: Path, n: int, batch_size: int, device: torch.device, out_path: Path | None) -> float:
    """Forward over the first n rows with input hooks on every Linear; optionally write it all with h5py."""
    start = time.perf_counter()
    model = resolve_model(load_checkpoint(model_path), ModelOptions()).module.to(device).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach())) for m in linears]
    out_fh = h5py.File(out_path, "w") if out_path is not None else None
    try:
        with h5py.File(data, "r") as fh:
            x_ds, y_ds = fh["X"], fh["Y"]
            t = y_ds.shape[1]
            if out_fh is not None:
                outputs = out_fh.create_dataset("outputs", (n, t), np.float32)
                targets = out_fh.create_dataset("targets", (n, t), np.float64)
                layers = [out_fh.create_dataset(f"layers/{i:02d}", (n, m.in_features), np.float32)
                          for i, m in enumerate(linears)]  # fmt: skip
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                x = torch.from_numpy(x_ds[a:b]).to(device)
                y = y_ds[a:b].astype(np.float64)
                with torch.inference_mode():
                    out = model(x)
                if out_fh is not None:
                    outputs[a:b] = out.cpu().numpy()
                    targets[a:b] = y
                    for ds, f in zip(layers, captured):
                        ds[a:b] = f.cpu().numpy()
                captured.clear()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        for h in hooks:
            h.remove()
        if out_fh is not None:
            out_fh.close()
    return time.perf_counter() - start


def audit_pass(model: Path, data: Path, n: int, batch_size: int, device: torch.device, store_path: Path | None) -> float:
    config = AuditConfig(model, data, data=DataOptions(limit=n), device=str(device), batch_size=batch_size,
                         features_path=store_path, progress=False)  # fmt: skip
    start = time.perf_counter()
    pipeline.run_audit(config)
    return time.perf_counter() - start


class Profile:
    """Wall time per part of the audit, by wrapping the pipeline's functions for one instrumented run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "Profile":
        self.wrap(pipeline, "_forward", "forward (hooks, float32)")
        self.wrap(pipeline.PassStatistics, "update", "float64 statistics (Gram, Chan merge)")
        self.wrap(store.FeatureStoreWriter, "write", "queue features for the writer (main thread)")
        self.wrap(store.FeatureStoreWriter, "_write_now", "HDF5 writes (writer thread, overlapped)")
        self.wrap(store.FeatureStoreWriter, "close", "drain the writer at the end")
        self.wrap(pipeline, "build_report", "report (eigh, SVDs, conditions)")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=AuditConfig.__dataclass_fields__["batch_size"].default)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", type=Path, default=None, help="work folder on the disk to measure (default: a temp dir)")
    p.add_argument("--section", default=None, help="docs/performance.md section (default overhead[-gpu])")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    machine = Machine.here()
    with tempfile.TemporaryDirectory(prefix="nrc-overhead-", dir=args.dir) as tmp:
        folder = Path(tmp)
        model, data = make_workload(folder, args.n)
        store_path, bare_path = folder / "store.h5", folder / "bare.h5"
        audit_pass(model, data, 4 * args.batch_size, args.batch_size, device, store_path)  # warm-up
        runs = {
            "bare forward": lambda: bare_pass(model, data, args.n, args.batch_size, device, None),
            "bare forward + h5py writes": lambda: bare_pass(model, data, args.n, args.batch_size, device, bare_path),
            "audit, no feature store": lambda: audit_pass(model, data, args.n, args.batch_size, device, None),
            "audit with feature store": lambda: audit_pass(model, data, args.n, args.batch_size, device, store_path),
        }
        best: dict[str, float] = {}
        loads = []
        for rep in range(args.reps):
            for name, fn in runs.items():
                drop_dirty_pages()
                loads.append(load_average())
                seconds = fn()
                best[name] = min(best.get(name, float("inf")), seconds)
                print(f"rep {rep + 1}: {name}: {seconds:.2f} s (load {loads[-1]:.2f})", file=sys.stderr, flush=True)
                for path in (store_path, bare_path):
                    path.unlink(missing_ok=True)
        drop_dirty_pages()
        with Profile() as prof:
            wall = audit_pass(model, data, args.n, args.batch_size, device, store_path)
        store_mib = store_path.stat().st_size / 2**20
        store_path.unlink(missing_ok=True)
    body = render(args, machine, best, prof.seconds, wall, store_mib, max(loads))
    print(body)
    if not args.no_doc:
        update_doc_section(args.section or ("overhead" if device.type == "cpu" else "overhead-gpu"), body)


def render(args, machine: Machine, best: dict[str, float], parts: dict[str, float], wall: float, store_mib: float,
           max_load: float) -> str:  # fmt: skip
    ref = best["bare forward + h5py writes"]
    rows = [[name, f"{s:.2f}", f"{s / ref:.2f}"] for name, s in best.items()]
    table = markdown_table(["run", "seconds (best)", "÷ bare forward + h5py"], rows)
    fwd, audit = best["bare forward"], best["audit with feature store"]
    writes = ref - fwd
    stats_cost = best["audit, no feature store"] - fwd
    hidden = best["audit, no feature store"] + writes - audit
    prof_rows = [[k, f"{v:.2f}", f"{v / wall:.0%}"] for k, v in parts.items()]
    prof_rows.append(["whole instrumented audit", f"{wall:.2f}", "100%"])
    profile = markdown_table(["part of the audit", "seconds", "share of wall"], prof_rows)
    return "\n".join([
        f"{stamp(machine)} Device `{args.device}`, N = {args.n:,}, batch {args.batch_size}, best of {args.reps}; "
        f"the feature store is {store_mib:,.0f} MiB. Highest 1-min load average seen: {max_load:.2f}.",
        "",
        table,
        "",
        f"**Overhead (a) = {audit / ref:.2f}×** (audit with store ÷ bare forward + h5py). Derived: the h5py "
        f"writes cost {writes:.1f} s on their own; the float64 statistics and the report add {stats_cost:.1f} s "
        f"to the bare forward ({fwd:.1f} s); the background writer hides {hidden:.1f} s of the {writes:.1f} s of "
        f"writes.",
        "",
        "Where the time goes (one instrumented run; the writer-thread row overlaps the others):",
        "",
        profile,
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
