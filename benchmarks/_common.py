"""Shared helpers of the benchmark scripts: the SGEMM-like workload, timing, peak RSS, doc sections.

Not part of the package. Every script imports this module from its own folder (``python benchmarks/X.py``
puts ``benchmarks/`` on ``sys.path``) and writes nothing outside a temporary folder except its section of
``docs/performance.md``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
TUNING_ENV = ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NRC_AUDIT_THREADS")
SGEMM_DIMS = [14] + [512] * 7 + [4]  # 8 Linear layers: 14→512, six 512→512, 512→4 (the paper's SGEMM MLP)


# ----------------------------------------------------------------------------- workload


def sgemm_like_mlp(dims: list[int] = SGEMM_DIMS, seed: int = 0) -> nn.Sequential:
    """The paper's SGEMM architecture: bias-free ReLU MLP, He-normal weights (activations keep their scale)."""
    gen = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        lin = nn.Linear(a, b, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) * np.sqrt(2.0 / a))
        mods.append(lin)
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def sgemm_like_rows(n: int, seed: int = 0, d: int = 14, t: int = 4, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start+n) of a deterministic synthetic SGEMM-like dataset, float32.

    X (n, 14) standard normal (the paper standardises the inputs); Y (n, 4): four highly correlated
    "run times" — one smooth function of X (rank-1 signal, as the paper assumes for SGEMM) plus small
    per-column noise. Rows are generated in blocks from per-block seeds, so any slice is reproducible.
    """
    teacher = np.random.default_rng(seed)
    w1, w2 = teacher.standard_normal((d, 32)) / np.sqrt(d), teacher.standard_normal(32) / np.sqrt(32)
    scale = np.array([1.0, 0.9, 1.1, 0.95])[:t]
    xs, ys = [], []
    block = 65536
    for b0 in range(start // block * block, start + n, block):
        rng = np.random.default_rng([seed, b0 // block])
        x = rng.standard_normal((block, d)).astype(np.float32)
        g = np.tanh(x @ w1) @ w2  # (block,)
        y = np.outer(g, scale) + 0.05 * rng.standard_normal((block, t))
        lo, hi = max(start, b0) - b0, min(start + n, b0 + block) - b0
        xs.append(x[lo:hi])
        ys.append(y[lo:hi].astype(np.float32))
    return np.concatenate(xs), np.concatenate(ys)


def write_dataset(path: Path, n: int, seed: int = 0) -> Path:
    """The SGEMM-like dataset as an HDF5 file with X (n, 14) and Y (n, 4), written block by block."""
    with h5py.File(path, "w") as fh:
        x_ds = fh.create_dataset("X", shape=(n, 14), dtype=np.float32)
        y_ds = fh.create_dataset("Y", shape=(n, 4), dtype=np.float32)
        step = 262144
        for a in range(0, n, step):
            x, y = sgemm_like_rows(min(step, n - a), seed, start=a)
            x_ds[a : a + len(x)], y_ds[a : a + len(y)] = x, y
    return path


def train_briefly(model: nn.Sequential, data: Path, steps: int, rows: int = 20000, seed: int = 0) -> nn.Sequential:
    """A few SGD steps (momentum 0.9, weight decay 5e-4, as in the paper's recipe) on the first rows.

    Random weights are enough for timing; a briefly trained net has the ill-conditioned, partly collapsed
    feature covariances that make the NRC4 comparison against the paper-style baseline a real test.
    """
    if steps <= 0:
        return model
    with h5py.File(data, "r") as fh:
        x, y = torch.from_numpy(fh["X"][:rows]), torch.from_numpy(fh["Y"][:rows])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_workload(folder: Path, n: int, seed: int = 0, train_steps: int = 0, width: int = 512) -> tuple[Path, Path]:
    """Write ``model.safetensors`` (SGEMM-like MLP, hidden ``width``) and ``data-N.h5`` into ``folder``."""
    import nrc_audit

    data = folder / f"data-{n}.h5"
    if not data.exists():
        write_dataset(data, n, seed)
    model_path = folder / f"model-s{seed}-t{train_steps}-w{width}.safetensors"
    if not model_path.exists():
        dims = [SGEMM_DIMS[0]] + [width] * (len(SGEMM_DIMS) - 2) + [SGEMM_DIMS[-1]]
        model = train_briefly(sgemm_like_mlp(dims, seed=seed), data, train_steps, seed=seed)
        nrc_audit.save_checkpoint(model, model_path, arch={"family": "mlp", "activation": "relu"})
    return model_path, data


CONV_NETS = {  # name: (make_resnet arguments, image side)
    "conv": (dict(block="basic", blocks=(1, 1, 1), widths=(16, 32, 64)), 16),
    "resnet50": (dict(block="bottleneck", blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512)), 32),  # 23.5M params
}


def make_conv_workload(folder: Path, n: int, name: str = "conv", seed: int = 0) -> tuple[Path, Path]:
    """A torchvision-style ResNet (``CONV_NETS[name]``, CIFAR stem, 4 outputs) and N random images."""
    import nrc_audit
    from nrc_audit.models.resnet import make_resnet

    kwargs, side = CONV_NETS[name]
    data = folder / f"images-{name}-{n}.h5"
    if not data.exists():
        teacher = np.random.default_rng(seed).standard_normal((3, 4))
        with h5py.File(data, "w") as fh:
            x_ds = fh.create_dataset("X", shape=(n, 3, side, side), dtype=np.float32)
            y_ds = fh.create_dataset("Y", shape=(n, 4), dtype=np.float32)
            step = max(1, (64 << 20) // (3 * side * side * 4))
            for a in range(0, n, step):
                rng = np.random.default_rng([seed, a])
                x = rng.standard_normal((min(step, n - a), 3, side, side)).astype(np.float32)
                x_ds[a : a + len(x)] = x
                y_ds[a : a + len(x)] = (np.tanh(x.mean(axis=(2, 3)) @ teacher) + 0.05 * rng.standard_normal((len(x), 4)))
    model_path = folder / f"{name}-s{seed}.safetensors"
    if not model_path.exists():
        torch.manual_seed(seed)
        model = make_resnet(**kwargs, num_outputs=4, cifar_stem=True).eval()
        nrc_audit.save_checkpoint(model, model_path, arch={"family": "resnet"})
    return model_path, data


# ----------------------------------------------------------------------------- measuring


@contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the wall time in seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def load_average() -> float:
    return os.getloadavg()[0]


def drop_dirty_pages() -> None:
    """Flush written files to disk so one measurement's write-back does not slow the next one."""
    os.sync()


def run_child(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run ``python script --child ARGS`` in a fresh process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child {script.name} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    torch: str
    numpy: str
    h5py: str
    load: float

    @classmethod
    def here(cls) -> "Machine":
        cpu = platform.processor() or "?"
        try:
            with open("/proc/cpuinfo") as fh:
                cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return cls(cpu, os.cpu_count() or 0, torch.__version__, np.__version__, h5py.__version__, load_average())

    def line(self) -> str:
        tuned = [f"{k}={os.environ[k]}" for k in TUNING_ENV if k in os.environ]
        env = f"; environment {' '.join(tuned)}" if tuned else ""
        return (f"{self.cpu}, {self.cores} cores, torch {self.torch} ({torch.get_num_threads()} threads), "
                f"numpy {self.numpy}, h5py {self.h5py}{env}; 1-min load average at start {self.load:.2f}")  # fmt: skip


# ----------------------------------------------------------------------------- output


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def update_doc_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in docs/performance.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Performance\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
    print(f"updated section '{name}' of {doc.relative_to(REPO)}", file=sys.stderr)


def stamp(machine: Machine) -> str:
    return f"_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine.line()}._"
