"""Everything measured on a CUDA machine, in one prepared script (run it when a device is lent).

    python benchmarks/gpu.py                   # all parts, ≈ 10 min on one H100/H200-class GPU
    python benchmarks/gpu.py --quick           # N/10 everywhere: a smoke test of the script itself
    python benchmarks/gpu.py --parts exact,mlp # a subset: gram, mlp, resnet50, torchrun, exact, tests

Parts (each updates its own section of docs/performance.md unless ``--no-doc``):

* ``gram``: float64 Gram accumulation against the GPU's float32 matmul (``gram_throughput.py``);
* ``mlp``: forward-only against audit throughput, the SGEMM-like MLP at N = 10⁶ (``overhead.py --device
  cuda``): bare forward, + h5py writes, audit without and with the store;
* ``resnet50``: the same for a ResNet-50-sized conv net (Bottleneck 3-4-6-3, 23.5M parameters, 32×32
  images; N = 10⁵ by default: 10⁶ images would be 12 GB of input);
* ``torchrun``: the audit sharded with NCCL over every GPU present (``torchrun --nproc-per-node G``) against
  the single-GPU run: wall seconds and the largest metric difference;
* ``exact``: the GPU audit against the CPU audit of the same model and data: the largest difference of
  every SPEC §4 metric (target ≤ 1e-6);
* ``tests``: the kernel tests with ``NRC_AUDIT_TEST_DEVICE=cuda`` (the device kernel on CUDA tensors), then
  the statistics and pipeline tests.

Without a CUDA device it says so and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gram_throughput
import overhead
from _common import REPO, Machine, make_workload, markdown_table, stamp, update_doc_section

PARTS = ["gram", "mlp", "resnet50", "torchrun", "exact", "tests"]
METRICS = ["nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio", "cka_signal", "noise_alignment", "stable_rank"]


def cli_audit(model: Path, data: Path, out: Path, device: str, batch: int, launcher: list[str] | None = None) -> float:
    """Run ``nrc-audit`` as a user would (``python -m nrc_audit``, or under ``launcher``); wall seconds."""
    cmd = [*(launcher or [sys.executable]), "-m", "nrc_audit", str(model), str(data), "--device", device,
           "--batch-size", str(batch), "--json", str(out), "--no-features", "--require-collapsed", "0"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode not in (0, 1):  # 1: the gate failed, which is a verdict, not an error
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def max_metric_diff(a: Path, b: Path) -> float:
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    diffs = [abs(x[k] - y[k]) for x, y in zip(ra["layers"], rb["layers"]) for k in METRICS
             if x.get(k) is not None and y.get(k) is not None]  # fmt: skip
    return max(diffs, default=0.0)


def exactness(folder: Path, n: int, batch: int, doc: bool) -> None:
    model, data = make_workload(folder, n)
    cpu, gpu = folder / "cpu.json", folder / "gpu.json"
    t_cpu = cli_audit(model, data, cpu, "cpu", batch)
    t_gpu = cli_audit(model, data, gpu, "cuda", batch)
    diff = max_metric_diff(cpu, gpu)
    body = (f"{stamp(Machine.here())} {torch.cuda.get_device_name(0)}. SGEMM-like MLP, N = {n:,}, batch {batch}, "
            f"`--no-features`: CPU {t_cpu:.1f} s, GPU {t_gpu:.1f} s (whole CLI runs). Largest difference of any SPEC §4 "
            f"metric between the two reports: **{diff:.2e}** (target ≤ 1e-6).")  # fmt: skip
    print(body)
    if doc:
        update_doc_section("gpu-exact", body)


def sharded(folder: Path, n: int, batch: int, doc: bool) -> None:
    gpus = torch.cuda.device_count()
    model, data = make_workload(folder, n)
    one, many = folder / "one.json", folder / "many.json"
    t_one = cli_audit(model, data, one, "cuda", batch)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    t_many = cli_audit(model, data, many, "cuda", batch, launcher)
    rows = [["1 GPU", f"{t_one:.1f}", f"{n / t_one:,.0f}"], [f"{gpus} GPUs (NCCL)", f"{t_many:.1f}", f"{n / t_many:,.0f}"]]
    body = "\n".join([
        f"{stamp(Machine.here())} {gpus} × {torch.cuda.get_device_name(0)}; SGEMM-like MLP, N = {n:,}, batch {batch}, "
        "`--no-features`, whole CLI runs (startup included).", "",
        markdown_table(["run", "seconds", "rows/s"], rows), "",
        f"Largest metric difference, sharded against one GPU: **{max_metric_diff(one, many):.2e}**.",
    ])  # fmt: skip
    print(body)
    if doc:
        update_doc_section("gpu-torchrun", body)


def cuda_tests() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), NRC_AUDIT_TEST_DEVICE="cuda")
    for args in (["tests/test_kernels.py"], ["tests/test_stats.py", "tests/test_pipeline.py"]):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                              capture_output=True, text=True)  # fmt: skip
        print(f"pytest {' '.join(args)}: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--n", type=int, default=1_000_000, help="rows for the MLP parts (default 10⁶)")
    p.add_argument("--conv-n", type=int, default=100_000, help="images for the ResNet-50 part (default 10⁵)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tenth of every size (checks the script, not the GPU)")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: GPU figures not measured (docs/performance.md left unchanged).", file=sys.stderr)
        return 0
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    n, conv_n = (args.n // 10, args.conv_n // 10) if args.quick else (args.n, args.conv_n)
    doc = ["--no-doc"] if args.no_doc else []
    print(f"device: {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="nrc-gpu-") as tmp:
        folder = Path(tmp)
        if "gram" in parts:
            gram_throughput.main(["--device", "cuda", "--rows", str(min(n, 1 << 20)), "--batch-size",
                                  str(args.batch_size), *doc])  # fmt: skip
        if "mlp" in parts:
            overhead.main(["--device", "cuda", "--n", str(n), "--batch-size", str(args.batch_size),
                           "--reps", str(args.reps), "--dir", tmp, *doc])  # fmt: skip
        if "resnet50" in parts:
            overhead.main(["--device", "cuda", "--arch", "resnet50", "--n", str(conv_n), "--batch-size", "512",
                           "--reps", str(args.reps), "--dir", tmp, "--section", "overhead-gpu-resnet50", *doc])  # fmt: skip
        if "torchrun" in parts:
            sharded(folder, n, args.batch_size, not args.no_doc)
        if "exact" in parts:
            exactness(folder, min(n, 200_000), args.batch_size, not args.no_doc)
        if "tests" in parts:
            cuda_tests()
    return 0


if __name__ == "__main__":
    sys.exit(main())
