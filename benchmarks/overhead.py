"""(a) The audit's wall and CPU time against a bare forward pass plus writing the same features with h5py.

    python benchmarks/overhead.py                       # N = 200k, batch 4096, width 512, CPU (≈ 4 min on 2 cores)
    python benchmarks/overhead.py --width 2048 --n 50000 --section overhead-w2048
    python benchmarks/overhead.py --device cuda         # on a GPU machine (benchmarks/gpu.py does this)

Workload: the SGEMM-like MLP (14→W×7→4, 8 Linear layers, random He-normal weights) on N synthetic rows
in an HDF5 file. All in this one process, interleaved (A B C D E, A B C D E, …) so that a change of load
hits every run alike; each row reports the minimum and median wall *and* CPU seconds (CPU: every thread
of the process, ``time.process_time``):

* **bare forward**: read X in batches from the HDF5 file, forward with hooks that keep every Linear input;
* **bare forward + h5py**: the same, writing outputs, targets and all 8 feature matrices with plain h5py
  (contiguous datasets, written in the loop) — the reference of the overhead figure;
* **forward + folds, serial, 1 thread per pool**: the audit without a store, folds on the main thread, torch
  and BLAS one thread each — the spin-free CPU reference (forward + Gram + report CPU);
* **audit, no store**: ``run_audit`` with ``--no-features`` (the pipelined pass: forward + float64 folds on a
  worker + report);
* **audit**: ``run_audit`` writing the feature store — the same bytes as the reference, plus everything
  the audit computes. **overhead = audit / (bare forward + h5py)**.

Like the CLI, the script sets the no-spin wait settings (``engine.threads``) before numpy and torch load.
Prints the table and updates the ``overhead`` section of docs/performance.md (``overhead-gpu`` on a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nrc_audit.engine.threads import quiet_idle_threads  # noqa: E402 — before numpy and torch load

quiet_idle_threads()

import h5py
import numpy as np
import torch
from torch import nn

from _common import CONV_NETS, Machine, drop_dirty_pages, make_conv_workload, load_average, make_workload, markdown_table, stamp, update_doc_section
from nrc_audit.engine import run, threads
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.models.architecture import resolve_model
from nrc_audit.io.checkpoint import load_checkpoint


def bare_pass(model_path: Path, data: Path, n: int, batch_size: int, device: torch.device, out_path: Path | None) -> float:
    """Forward over the first n rows with input hooks on every Linear/Conv2d; optionally write it all with h5py.

    Conv2d inputs are averaged over H×W in the hook, as the audit's features are (its store holds those).
    """
    start = time.perf_counter()
    model = resolve_model(load_checkpoint(model_path), ModelOptions()).module.to(device).eval()
    audited = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    captured: list[torch.Tensor] = []

    def keep(mod: nn.Module, inp: tuple) -> None:
        h = inp[0].detach()
        captured.append(h.mean(dim=(2, 3)) if isinstance(mod, nn.Conv2d) else h)

    hooks = [m.register_forward_pre_hook(keep) for m in audited]
    out_fh = h5py.File(out_path, "w") if out_path is not None else None
    sinks: list[h5py.Dataset] = []
    try:
        with h5py.File(data, "r") as fh:
            x_ds, y_ds = fh["X"], fh["Y"]
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                x = torch.from_numpy(x_ds[a:b]).to(device)
                y = y_ds[a:b].astype(np.float64)
                with torch.inference_mode():
                    out = model(x)
                if out_fh is not None:
                    arrays = [out.cpu().numpy(), y, *[f.cpu().numpy() for f in captured]]
                    if not sinks:  # contiguous datasets, created once the widths are known
                        names = ["outputs", "targets", *[f"layers/{i:02d}" for i in range(len(captured))]]
                        sinks = [out_fh.create_dataset(k, (n, v.shape[1]), v.dtype) for k, v in zip(names, arrays)]
                    for ds, v in zip(sinks, arrays):
                        ds[a:b] = v
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
    run.run_audit(config)
    return time.perf_counter() - start


def serial_pass(model: Path, data: Path, n: int, batch_size: int, device: torch.device, _: Path | None) -> float:
    """The audit without store, folds on the main thread, torch and numpy's BLAS one thread each."""
    before = os.environ.get(threads.ENV)
    os.environ[threads.ENV] = "serial"
    try:
        with threads.applied(threads.ThreadPlan(1, 1, False)):
            return audit_pass(model, data, n, batch_size, device, None)
    finally:
        os.environ.pop(threads.ENV) if before is None else os.environ.__setitem__(threads.ENV, before)


def measured(fn) -> tuple[float, float]:
    """(wall, CPU of every thread) seconds of ``fn()``."""
    cpu = time.process_time()
    wall = fn()
    return wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--width", type=int, default=512, help="hidden width W of the 8-layer MLP (default 512)")
    p.add_argument("--arch", choices=sorted(CONV_NETS) + ["mlp"], default="mlp",
                   help="mlp (default), conv (a small ResNet on 16×16 images) or resnet50 (ResNet-50-sized, 32×32)")
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
        if args.arch == "mlp":
            model, data = make_workload(folder, args.n, width=args.width)
        else:
            model, data = make_conv_workload(folder, args.n, args.arch)
        store_path, bare_path = folder / "store.h5", folder / "bare.h5"
        audit_pass(model, data, 4 * args.batch_size, args.batch_size, device, store_path)  # warm-up
        runs = {
            "bare forward": (bare_pass, None),
            "bare forward + h5py writes": (bare_pass, bare_path),
            "forward + folds, serial, 1 thread per pool": (serial_pass, None),
            "audit, no feature store": (audit_pass, None),
            "audit with feature store": (audit_pass, store_path),
        }
        if device.type != "cpu":
            del runs["forward + folds, serial, 1 thread per pool"]
        seen: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        loads = []
        for rep in range(args.reps):
            for name, (fn, out) in runs.items():
                drop_dirty_pages()
                loads.append(load_average())
                wall, cpu = measured(lambda: fn(model, data, args.n, args.batch_size, device, out))
                seen[name].append((wall, cpu))
                print(f"rep {rep + 1}: {name}: {wall:.2f} s wall, {cpu:.2f} s CPU (load {loads[-1]:.2f})",
                      file=sys.stderr, flush=True)  # fmt: skip
                store_mib = store_path.stat().st_size / 2**20 if store_path.exists() else 0.0
                for path in (store_path, bare_path):
                    path.unlink(missing_ok=True)
    body = render(args, machine, seen, store_mib, min(loads), max(loads))
    print(body)
    if not args.no_doc:
        update_doc_section(args.section or ("overhead" if device.type == "cpu" else "overhead-gpu"), body)


def render(args, machine: Machine, seen: dict[str, list[tuple[float, float]]], store_mib: float,
           min_load: float, max_load: float) -> str:  # fmt: skip
    wall = {k: [w for w, _ in v] for k, v in seen.items()}
    cpu = {k: [c for _, c in v] for k, v in seen.items()}
    ref, fwd = "bare forward + h5py writes", "bare forward"
    rows = [[name, f"{min(wall[name]):.2f}", f"{statistics.median(wall[name]):.2f}",
             f"{min(cpu[name]):.2f}", f"{statistics.median(cpu[name]):.2f}",
             f"{min(wall[name]) / min(wall[ref]):.2f}", f"{statistics.median(wall[name]) / statistics.median(wall[ref]):.2f}"]
            for name in seen]  # fmt: skip
    table = markdown_table(["run", "wall min", "wall median", "CPU min", "CPU median", "wall min ÷ ref",
                            "wall median ÷ ref"], rows)  # fmt: skip
    lines = [
        f"{stamp(machine)} Device `{args.device}`, model {args.arch if args.arch != 'mlp' else f'MLP width {args.width}'}, "
        f"N = {args.n:,}, batch {args.batch_size}, "
        f"{args.reps} interleaved repetitions; the feature store is {store_mib:,.0f} MiB; thread plan "
        f"{threads.plan()}. 1-min load average during the runs: {min_load:.2f}–{max_load:.2f}. Seconds; "
        "ref = bare forward + h5py writes.",
        "",
        table,
        "",
        f"**audit with store ÷ (bare forward + h5py) = {min(wall['audit with feature store']) / min(wall[ref]):.2f}×** "
        f"(minima; medians {statistics.median(wall['audit with feature store']) / statistics.median(wall[ref]):.2f}×); "
        f"**audit --no-features ÷ bare forward = {min(wall['audit, no feature store']) / min(wall[fwd]):.2f}×** "
        f"(medians {statistics.median(wall['audit, no feature store']) / statistics.median(wall[fwd]):.2f}×).",
    ]
    serial = "forward + folds, serial, 1 thread per pool"
    if serial in cpu:
        budget = min(cpu[serial]) + min(cpu[ref]) - min(cpu[fwd])
        lines += ["", f"CPU check: the audit with store used {min(cpu['audit with feature store']):.1f} s CPU against "
                  f"forward + Gram + report ({min(cpu[serial]):.1f} s, the serial one-thread run) + write "
                  f"({min(cpu[ref]) - min(cpu[fwd]):.1f} s) = {budget:.1f} s: "
                  f"{min(cpu['audit with feature store']) / budget:.2f}× (≤ 1.10 means no CPU spent spinning)."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
