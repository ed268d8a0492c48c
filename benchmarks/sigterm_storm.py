"""SIGTERM at random moments of a multi-batch audit, many times (docs/reliability.md, "Interruptions").

Each case starts ``python -m nrc_audit`` on a 30-batch audit whose model sleeps a little in every forward
pass, waits until the pass has begun (its partial store exists), sleeps a random time within the pass and
its end (publishing, the report), sends SIGTERM and measures how long the process takes to exit. A case
passes when the process exits within ``--deadline`` seconds with 143 (or, when the signal lands after the
CLI has restored the default handler, is killed by SIGTERM: the shell reports 143 as well), and the feature
store at the path is either the finished store of the earlier run, untouched, or a new complete one, and no
partial file is left.

    python benchmarks/sigterm_storm.py --runs 200 --parallel 2

Not part of the package; ``tests/test_signals.py`` runs a small sample of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

SLOW_SOURCE = textwrap.dedent(
    """
    import os
    import time

    from torch import nn


    class Slow(nn.Sequential):
        def forward(self, x):
            time.sleep(float(os.environ.get("NRC_TEST_SLEEP", "0")))
            return super().forward(x)


    def build():
        return Slow(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False), nn.ReLU(),
                    nn.Linear(8, 3, bias=False))
    """
)
BATCHES, ROWS = 30, 10


def prepare(folder: Path) -> dict:
    """Checkpoint, data, args; and one finished store + report from a full-speed run (the 'earlier run')."""
    import torch

    import nrc_audit

    src = folder / "slow.py"
    src.write_text(SLOW_SOURCE)
    ns: dict = {}
    exec(compile(SLOW_SOURCE, str(src), "exec"), ns)
    torch.manual_seed(0)
    ckpt = nrc_audit.save_checkpoint(ns["build"](), folder / "slow.safetensors")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((BATCHES * ROWS, 12)).astype(np.float32)
    y = (np.tanh(x @ rng.standard_normal((12, 3))) + 0.05 * rng.standard_normal((len(x), 3))).astype(np.float32)
    with h5py.File(folder / "data.h5", "w") as fh:
        fh["X"], fh["Y"] = x, y
    case = {"folder": folder, "ckpt": ckpt, "data": folder / "data.h5", "src": src}
    (folder / "base").mkdir()
    subprocess.run([sys.executable, "-m", "nrc_audit", *args_for(case, folder / "base")], check=True,
                   env={**os.environ, "NRC_TEST_SLEEP": "0"}, capture_output=True, timeout=300)  # fmt: skip
    return case


def args_for(case: dict, out: Path) -> list[str]:
    return [str(case["ckpt"]), str(case["data"]), "--model-def", f"{case['src']}:build", "--features",
            str(out / "f.h5"), "--json", str(out / "r.json"), "--no-progress", "--batch-size", str(ROWS),
            "--require-collapsed", "0"]  # fmt: skip


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def store_ok(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as fh:
            return bool(fh.attrs["complete"]) and fh["targets"].shape[0] == BATCHES * ROWS and all(
                fh[f"layers/{k}"].shape[0] == BATCHES * ROWS for k in fh["layers"])  # fmt: skip
    except (OSError, KeyError):
        return False


def one(case: dict, i: int, sleep: float, deadline: float, seed: int) -> dict:
    """One interrupted run in its own folder, which already holds the earlier run's finished outputs."""
    out = case["folder"] / f"run{i}"
    out.mkdir()
    for name in ("f.h5", "r.json"):
        shutil.copy2(case["folder"] / "base" / name, out / name)
    before = digest(out / "f.h5")
    inode = (out / "f.h5").stat().st_ino  # a published new store is a new file (renamed into place)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NRC_TEST_SLEEP": str(sleep)}
    child = subprocess.Popen([sys.executable, "-m", "nrc_audit", *args_for(case, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    partial = out / ".f.h5.partial"
    start = time.monotonic()
    while not partial.exists() and child.poll() is None and time.monotonic() - start < 120:
        time.sleep(0.005)
    # a random moment from the first batch to a little after the pass's own end (publish, report, exit)
    time.sleep(random.Random(seed).uniform(0, BATCHES * sleep + 0.3))
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    try:
        _, err = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
    took = time.monotonic() - sent
    after = digest(out / "f.h5")
    replaced = after is not None and (out / "f.h5").stat().st_ino != inode
    code = child.returncode
    store_fine = after is not None and (after == before if not replaced else store_ok(out / "f.h5"))
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    # -15: the signal came after the CLI had finished (default handler restored); the shell reports 143
    ok = code in (143, -signal.SIGTERM, 0) and took <= deadline and store_fine and not leftovers
    ok = ok and b"Traceback" not in err
    return {"i": i, "code": code, "seconds": round(took, 3), "store": "new" if replaced else "same",
            "store_ok": store_fine, "leftovers": leftovers, "ok": ok, "stderr": err.decode()[-300:]}


def storm(runs: int, parallel: int = 1, sleep: float = 0.02, deadline: float = 2.0, folder: Path | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        case = prepare(Path(folder or tmp))
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda i: one(case, i, sleep, deadline, seed=i), range(runs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.02, help="seconds per batch in the model's forward")
    parser.add_argument("--deadline", type=float, default=2.0)
    a = parser.parse_args()
    results = storm(a.runs, a.parallel, a.sleep, a.deadline)
    bad = [r for r in results if not r["ok"]]
    seconds = sorted(r["seconds"] for r in results)
    summary = {"runs": len(results), "failed": len(bad), "exit_codes": dict(Counter(r["code"] for r in results)),
               "stores": dict(Counter(r["store"] for r in results)), "max_s": seconds[-1],
               "median_s": seconds[len(seconds) // 2]}  # fmt: skip
    print(json.dumps(summary, indent=2))
    for r in bad[:10]:
        print(json.dumps(r))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
