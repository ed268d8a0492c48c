"""Calibrate the default verdict thresholds: weight decay × target rank × architecture × seed (CPU, ≈ 20 min).

The question (Rangamani & Unal §4.3–4.4, PAPER_NOTES §3–4): with weight decay the top layers collapse, without it
the features do not align with the weights. Do nrc-audit's default verdicts, at the default k, separate the two?

Grid: weight decay λ ∈ {0, 1e-3, 1e-2, 3e-2} × targets of dimension t = 4 with intrinsic rank r ∈ {1, 2, 3}
(a random 2-hidden-layer ReLU net of width r, mapped linearly to t: exactly rank r) or full rank (width 4 plus a
full-rank linear term) × a bias-free ReLU MLP 20→32×3→4, a bias-free ReLU MLP 20→64×5→4 and a small ResNet
(BasicBlock, stages 8-16, BatchNorm) on 2×8×8 images that carry x linearly × seeds 0, 1, 2 (own data draw and
initialisation per seed). N = 512 training rows, SGD with momentum 0.9, MSE, batch 64, LR ×0.1 at 1/3 and 2/3 of
the epochs (the paper's regime). Every model is audited on its training rows through ``nrc_audit.audit`` with
``require_collapsed=0`` at k = auto (the default) and k = t, and every layer's metrics are kept, so that any
threshold rule can be evaluated afterwards without retraining (``validation/calibration_report.py``).

    nice -n 10 python validation/calibrate.py --jobs 2     # the study, then the report (writes docs/)
    python validation/calibrate.py --report-only           # the report from the committed JSON
    python validation/calibrate.py --quick                 # smoke test: 1 seed, 20 epochs, writes only /tmp

Deterministic: one thread per process, ``torch.use_deterministic_algorithms(True)``, fixed seeds; the numbers do
not depend on ``--jobs``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy/torch load: one BLAS thread, results independent of scheduling

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "validation"))

D, T = 20, 4  # input dim, target dim t
N_TRAIN = 512
IMAGE = (2, 8, 8)  # the ResNet's input: x mapped linearly onto 2×8×8 = 128 pixels
WEIGHT_DECAYS = (0.0, 1e-3, 1e-2, 3e-2)
TARGETS = {"r1": 1, "r2": 2, "r3": 3, "full": T}  # name → intrinsic rank r
ARCHS: dict[str, dict[str, Any]] = {
    "mlp4x32": {"kind": "mlp", "depth": 4, "width": 32, "lr": 0.05, "epochs": 300},
    "mlp6x64": {"kind": "mlp", "depth": 6, "width": 64, "lr": 0.03, "epochs": 300},
    "resnet": {"kind": "resnet", "widths": (8, 16), "lr": 0.05, "epochs": 120},
}
SEEDS = (0, 1, 2)
BATCH = 64
METRICS = ("nrc1", "nrc2", "nrc3", "nrc4_ratio", "noise_alignment", "stable_rank_w")
RESULTS = REPO / "docs" / "calibration_results.json"


# ----------------------------------------------------------------------------------------------- data


def make_data(target: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """x ~ N(0, I_20) (N, 20) and standardised targets y (N, t) of intrinsic rank r (exactly), or full rank.

    Rank r < t: y = relu(relu(x W1) W2) W3 with W1 (20×r), W2 (r×r), W3 (r×t) Gaussian; a draw is accepted when
    every unit of the target net's second layer is active on 20–80 % of the inputs and each of the r directions
    holds ≥ 10 % of the variance (else the rank would be < r, or hinge on a direction the net barely needs).
    Full rank: the width-t net plus a linear term x C (C Gaussian, ≈ 30 % of the std), accepted when each of the
    t directions holds ≥ 3 % of the variance, so that ``rank_estimate`` (99 % energy) is t.
    """
    r = TARGETS[target]
    for attempt in range(1000):
        rng = np.random.default_rng(10_000 * (seed + 1) + 100 * r + attempt)
        x = rng.standard_normal((N_TRAIN, D))
        z = np.maximum(np.maximum(x @ rng.standard_normal((D, r)) / math.sqrt(D), 0)
                       @ rng.standard_normal((r, r)) / math.sqrt(r), 0)  # fmt: skip
        y = z @ rng.standard_normal((r, T)) / math.sqrt(r)
        if r == T:
            y = y + 0.3 * y.std() * (x @ rng.standard_normal((D, T)) / math.sqrt(D))
        y = (y - y.mean(0)) / np.maximum(y.std(0), 1e-12)
        ev = np.linalg.eigvalsh(np.cov(y.T, bias=True))[::-1]
        share = ev / ev.sum()
        active = (z > 0).mean(0)
        ok = all(0.2 < a < 0.8 for a in active) and share[r - 1] >= (0.03 if r == T else 0.10)
        if ok:
            info = {"rejected_draws": attempt, "eigen_share": [round(float(s), 4) for s in share]}
            return x.astype(np.float32), y.astype(np.float32), info
    raise RuntimeError(f"no well-posed draw for target {target}, seed {seed}")  # pragma: no cover


def pixel_map(seed: int) -> np.ndarray:
    """(20, 128) fixed random map from x onto the ResNet's 2×8×8 pixels (full column rank: no information lost)."""
    return np.random.default_rng(7 + seed).standard_normal((D, int(np.prod(IMAGE)))) / math.sqrt(D)


# ---------------------------------------------------------------------------------------- model, training


def make_model(arch: dict, seed: int) -> nn.Module:
    """A bias-free ReLU MLP with He init, or a small BasicBlock ResNet with BatchNorm and a Linear head."""
    torch.manual_seed(seed)
    if arch["kind"] == "resnet":
        from nrc_audit.models.resnet import make_resnet

        return make_resnet("basic", blocks=(1, 1), widths=arch["widths"], in_channels=IMAGE[0], num_outputs=T)
    dims = [D] + [arch["width"]] * (arch["depth"] - 1) + [T]
    mods: list[nn.Module] = []
    for i in range(arch["depth"]):
        lin = nn.Linear(dims[i], dims[i + 1], bias=False)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        mods += [lin, nn.ReLU()] if i < arch["depth"] - 1 else [lin]
    return nn.Sequential(*mods)


def train(net: nn.Module, arch: dict, wd: float, seed: int, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """SGD (momentum 0.9, weight decay ``wd`` on every parameter), MSE, multi-step LR; returns the loss curve."""
    opt = torch.optim.SGD(net.parameters(), lr=arch["lr"], momentum=0.9, weight_decay=wd)
    epochs = arch["epochs"]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 3, 2 * epochs // 3], gamma=0.1)
    shuffle = torch.Generator().manual_seed(100 + seed)
    curve = []
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=shuffle)
        total = 0.0
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            loss = ((net(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        curve.append(total / len(x))
        sched.step()
    return curve


def layer_record(layer: Any) -> dict:
    return {"index": layer.index, "name": layer.name, **{m: getattr(layer, m) for m in METRICS},
            "gap_warning": any("ill-defined" in w for w in layer.warnings)}  # fmt: skip


def run_one(job: dict) -> dict:
    """Train one model and audit it at k = auto and k = t; every layer's metrics, no verdicts."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import nrc_audit

    t0 = time.process_time()
    arch = dict(ARCHS[job["arch"]], epochs=job["epochs"] or ARCHS[job["arch"]]["epochs"])
    x_np, y_np, info = make_data(job["target"], job["seed"])
    if arch["kind"] == "resnet":
        x_np = (x_np @ pixel_map(job["seed"])).reshape(-1, *IMAGE).astype(np.float32)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    net = make_model(arch, job["seed"])
    curve = train(net, arch, job["wd"], job["seed"], x, y)
    net.eval()
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
    audits = {}
    for key, rank in (("auto", "auto"), ("t", "t")):
        rep = nrc_audit.audit(net, batches, rank=rank, require_collapsed=0)
        d = rep.to_dict()
        audits[key] = {"k": d["settings"]["rank"], "layers": [layer_record(l) for l in rep.layers]}
    return {
        **{k: job[k] for k in ("arch", "target", "wd", "seed")},
        "r": TARGETS[job["target"]], "t": T, "rank_estimate": d["target"]["rank_estimate"],
        "model_mse": d["model_mse"], "target_variance": float(np.var(y_np, axis=0).mean()),
        "loss_last": curve[-1], "loss_at_2_3": curve[2 * len(curve) // 3 - 1], "data": info,
        "audits": audits, "cpu_s": time.process_time() - t0,
    }


def jobs(seeds: tuple[int, ...], epochs: int | None) -> list[dict]:
    return [{"arch": a, "target": tg, "wd": wd, "seed": s, "epochs": epochs}
            for a in ARCHS for tg in TARGETS for wd in WEIGHT_DECAYS for s in seeds]  # fmt: skip


def rounded(obj: Any, digits: int = 5) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--epochs", type=int, default=None, help="override every architecture's epochs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="skip training; report from --results")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 epochs, results under /tmp, no doc")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.results = 1, 20, Path("/tmp/calibration_quick.json")
    if not args.report_only:
        todo = jobs(tuple(range(args.seeds)), args.epochs)
        wall = time.perf_counter()
        runs = []
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for i, run in enumerate(pool.imap(run_one, todo), 1):
                runs.append(run)
                print(f"[{i}/{len(todo)}] {run['arch']} {run['target']} wd={run['wd']:g} seed={run['seed']}: "
                      f"mse {run['model_mse']:.4f}, {run['cpu_s']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        meta = {"command": "nice -n 10 python validation/calibrate.py --jobs %d" % args.jobs,
                "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
                "torch": torch.__version__, "n_train": N_TRAIN, "t": T, "batch": BATCH,
                "archs": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in a.items()} for k, a in ARCHS.items()},
                "epochs_override": args.epochs}  # fmt: skip
        args.results.write_text(json.dumps(rounded({"meta": meta, "runs": runs}), indent=1) + "\n")
    if not args.quick:
        import calibration_report

        calibration_report.main(args.results)


if __name__ == "__main__":
    main()
