"""(a) and (c) on a CUDA device, in one prepared script.

    python benchmarks/gpu.py                 # N = 1M rows for (a); a few minutes on one GPU

Runs ``overhead.py --device cuda`` (the audit with statistics accumulated on the device and pinned,
non-blocking copies for the store, against a bare GPU forward pass plus h5py writes of the same features)
and ``gram_throughput.py --device cuda`` (float64 Gram accumulation against the GPU's float32 matmul),
updating the ``overhead-gpu`` and ``gram-gpu`` sections of docs/performance.md. Without a CUDA device it
says so and changes nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

import gram_throughput
import overhead


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows for the overhead run (default 1M)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: GPU figures not measured (docs/performance.md left unchanged).", file=sys.stderr)
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}", file=sys.stderr)
    doc = ["--no-doc"] if args.no_doc else []
    gram_throughput.main(["--device", "cuda", "--rows", "1048576", "--batch-size", str(args.batch_size), *doc])
    overhead.main(["--device", "cuda", "--n", str(args.n), "--batch-size", str(args.batch_size),
                   "--reps", str(args.reps), *doc])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
