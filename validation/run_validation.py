"""Reproduce the paper's weight-decay and intrinsic-rank findings with nrc-audit (CPU, minutes).

Setting (Rangamani & Unal §4.3-4.4, PAPER_NOTES §4): x ~ N(0, I_20); targets of dimension t = 10 from a
random 2-hidden-layer ReLU net of width r = 2 followed by a random linear map to t (intrinsic rank exactly
2), standardised with the training mean/std; 3000 training and 750 test rows per seed, a different data
draw and initialisation per seed. Models: 6-layer bias-free ReLU MLPs of width 64, He (Kaiming-normal)
init, SGD (momentum 0.9), MSE, batch 256, 600 epochs, LR ×0.1 at epochs 200 and 400 (the recipe of
sample_checkpoints/README.md), over the weight decays {0, 1e-5, 1e-4, 1e-3, 1e-2}, for two learning rates:
0.03 (the recipe) and 0.1. Every model is saved with ``nrc_audit.save_checkpoint`` under ``validation/out``
together with its data file, and audited on its training rows with ``rank="auto"`` and ``rank=t`` through
``nrc_audit.audit``; one seed per (learning rate, weight decay) is audited again through the real CLI
(``nrc-audit CKPT DATA --rank auto|10 --json ...``) and compared field by field. Also: recovery of the
intrinsic rank by ``target.rank_estimate`` on targets of known rank r = 1, 2, 3 against additive noise,
and the evidence for the default thresholds. Writes ``docs/validation_results.json``, the generated block
of ``docs/validation.md`` and the PNGs under ``docs/img/``.

    nice -n 19 python validation/run_validation.py --jobs 2    # the full run (30 models, ~7 min of CPU)
    python validation/run_validation.py --quick                # smoke test: 1 seed, 30 epochs, no doc

Deterministic: one thread per model, ``torch.use_deterministic_algorithms(True)``, fixed seeds; the
numbers do not depend on ``--jobs``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy/torch load: one BLAS thread, results independent of scheduling

import argparse
import json
import math
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

import nrc_audit
from nrc_audit.core.verdicts import collapse_onset

REPO = Path(__file__).resolve().parents[1]
D, T, R = 20, 10, 2  # input dim, target dim t, intrinsic rank r (width of the random target net)
N_TRAIN, N_TEST = 3000, 750
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
# Two learning rates, everything else is the working recipe of sample_checkpoints/README.md.
CONFIGS: dict[str, dict[str, Any]] = {
    "lr0.03": {"lr": 0.03, "batch": 256, "epochs": 600, "depth": 6, "width": 64},
    "lr0.1": {"lr": 0.1, "batch": 256, "epochs": 600, "depth": 6, "width": 64},
}
MAIN = "lr0.03"  # the configuration drawn per layer (plots)
METRICS = ("nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio", "cka_signal", "noise_alignment", "stable_rank",
           "stable_rank_cov", "stable_rank_w")  # fmt: skip
DEFAULTS = {"nrc1_max": 0.25, "nrc2_min": 0.6, "nrc3_min": 0.7, "nrc4_ratio_max": 2.0}  # SPEC §4
ARCH = {"family": "mlp", "activation": "relu"}
BEGIN, END = "<!-- BEGIN validation results", "<!-- END validation results -->"


# ----------------------------------------------------------------------------------------------- data


def draw_target(rng: np.random.Generator, n: int, t: int, r: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """x ~ N(0, I_20); y = relu(relu(x W1) W2) W3, W1 (20×r), W2 (r×r), W3 (r×t) Gaussian: rank ≤ r.

    Returns x, y and facts about the draw: the share of inputs on which each of the r units of the target
    net's second hidden layer is active, and the eigenvalue shares of cov(y).
    """
    x = rng.standard_normal((n, D))
    w1 = rng.standard_normal((D, r)) / math.sqrt(D)
    w2 = rng.standard_normal((r, r)) / math.sqrt(r)
    w3 = rng.standard_normal((r, t)) / math.sqrt(r)
    z = np.maximum(np.maximum(x @ w1, 0) @ w2, 0)
    y = z @ w3
    ev = np.linalg.eigvalsh(np.cov(y.T))[::-1]
    share = ev / ev.sum() if ev.sum() > 0 else ev
    return x, y, {"active": (z > 0).mean(0).tolist(), "share": share.tolist()}


def well_posed(info: dict, r: int, min_share: float) -> bool:
    """Every unit of the target net alive on 20–80 % of inputs and each of the r directions ≥ min_share."""
    return all(0.2 < a < 0.8 for a in info["active"]) and min(info["share"][:r]) >= min_share


def make_data(seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """The data of one seed: the first well-posed draw (both units alive, each direction ≥ 10 %)."""
    for attempt in range(1000):
        data_seed = 1000 * (seed + 1) + attempt
        x, y, info = draw_target(np.random.default_rng(data_seed), N_TRAIN + N_TEST, T, R)
        if well_posed(info, R, 0.10):
            break
    else:  # pragma: no cover
        raise RuntimeError(f"no well-posed target draw for seed {seed}")
    mu, sd = y[:N_TRAIN].mean(0), y[:N_TRAIN].std(0)
    y = (y - mu) / sd
    ev = np.linalg.eigvalsh(np.cov(y[:N_TRAIN].T))[::-1]
    info = {"data_seed": data_seed, "rejected_draws": attempt, "units_active": [round(a, 3) for a in info["active"]],
            "eigen_share": [round(float(v), 4) for v in (ev / ev.sum())[:4]]}  # fmt: skip
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    arrays = {"X": f32(x[:N_TRAIN]), "Y": f32(y[:N_TRAIN]), "test/X": f32(x[N_TRAIN:]), "test/Y": f32(y[N_TRAIN:])}
    return arrays, info


def write_h5(path: Path, arrays: dict[str, np.ndarray], info: dict) -> None:
    with h5py.File(path, "w", track_order=True) as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, track_times=False)
        f.attrs["description"] = (f"x ~ N(0, I_{D}); y = relu(relu(x W1) W2) W3, width r={R}, t={T}, standardised "
                                  "with the train mean/std; test/X, test/Y held out")  # fmt: skip
        f.attrs["data_seed"] = info["data_seed"]


# ---------------------------------------------------------------------------------------- model, training


def make_model(depth: int, width: int, seed: int) -> nn.Sequential:
    """Bias-free ReLU MLP 20 → width … → 10, He (Kaiming-normal) init: Sequential(Linear, ReLU, …, Linear)."""
    torch.manual_seed(seed)
    dims = [D] + [width] * (depth - 1) + [T]
    mods: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(dims[i], dims[i + 1], bias=False)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        mods.append(lin)
        if i < depth - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def train(cfg: dict, wd: float, seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Sequential:
    net = make_model(cfg["depth"], cfg["width"], seed)
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=wd)
    epochs = cfg["epochs"]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 3, 2 * epochs // 3], gamma=0.1)
    shuffle = torch.Generator().manual_seed(100 + seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=shuffle)
        for i in range(0, len(x), cfg["batch"]):
            idx = perm[i : i + cfg["batch"]]
            loss = ((net(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def mse(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((net(x) - y) ** 2).mean())


# ------------------------------------------------------------------------------------------------ audits


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def compact(rep: dict) -> dict:
    """The parts of a report this validation uses (full precision; rounded only when written)."""
    return {
        "rank": rep["settings"]["rank"], "rank_source": rep["settings"]["rank_source"],
        "rank_estimate": rep["target"]["rank_estimate"], "target_stable_rank_cov": rep["target"]["stable_rank_cov"],
        "model_mse": rep["model_mse"], "collapse_onset": rep["summary"]["collapse_onset"],
        "collapsed_layers": rep["summary"]["collapsed_layers"],
        "layers": [{"index": l["index"], **{m: l[m] for m in METRICS}, "bound_holds": l["bound"]["holds"],
                    "collapsed": l["collapsed"], "gap_warning": any("ill-defined" in w for w in l["warnings"])}
                   for l in rep["layers"]],
    }  # fmt: skip


def mean_augmented_alignment(net: nn.Sequential, x: torch.Tensor, k: int) -> list[float]:
    """Per layer: mean principal cosine between span[U_k, μ̂] and W's top-(k+1) input singular vectors.

    Diagnostic (not an nrc-audit metric): in a bias-free ReLU net a hidden layer's weights must also read the
    feature *mean* (it plays the bias), which the centred top-k subspace U_k of NRC3 does not contain.
    """
    out, h = [], x.double()
    with torch.no_grad():
        for mod in net:
            if isinstance(mod, nn.Linear):
                feats = h.numpy()
                mu = feats.mean(0)
                lam, vecs = np.linalg.eigh(np.cov(feats.T, bias=True))
                u = vecs[:, ::-1][:, :k]
                basis = np.linalg.qr(np.column_stack([u, mu / max(np.linalg.norm(mu), 1e-300)]))[0]
                v = np.linalg.svd(mod.weight.double().numpy())[2].T[:, : k + 1]
                out.append(float(np.linalg.svd(basis.T @ v, compute_uv=False).sum() / (k + 1)))
            h = nn.functional.linear(h, mod.weight.double()) if isinstance(mod, nn.Linear) else mod(h)
    return out


def run_one(job: dict) -> dict:
    """Train, save and audit one (config, seed, weight decay) model; returns the compact results."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    cfg, seed, wd = CONFIGS[job["config"]], job["seed"], job["wd"]
    cfg = dict(cfg, epochs=job.get("epochs") or cfg["epochs"])
    with h5py.File(job["data_path"], "r") as f:
        x, y = torch.from_numpy(f["X"][:]), torch.from_numpy(f["Y"][:])
        xt, yt = torch.from_numpy(f["test/X"][:]), torch.from_numpy(f["test/Y"][:])
    init = make_model(cfg["depth"], cfg["width"], seed)
    init_srw = [float((s**2).sum() / s[0] ** 2) for s in (torch.linalg.svdvals(m.weight.detach()) for m in init[2:-1:2])]
    net = train(cfg, wd, seed, x, y)
    train_mse, test_mse = mse(net, x, y), mse(net, xt, yt)
    meta = {k: str(v) for k, v in cfg.items()} | {"weight_decay": str(wd), "seed": str(seed), "init": "kaiming_normal(relu)",
                                                   "bias": "false", "data": Path(job["data_path"]).name,
                                                   "train_mse": f"{train_mse:.6g}", "test_mse": f"{test_mse:.6g}"}  # fmt: skip
    nrc_audit.save_checkpoint(net, job["ckpt"], arch=ARCH, metadata=meta)
    rep_auto = nrc_audit.audit(net, batches(x, y), rank="auto", require_collapsed=0)
    rep_t = nrc_audit.audit(net, batches(x, y), rank=T, require_collapsed=0)
    if job.get("plot"):
        from nrc_audit.outputs.plot import plot_report

        plot_report(rep_auto, Path(job["plot"]))
    auto = compact(rep_auto.to_dict())
    for layer, value in zip(auto["layers"], mean_augmented_alignment(net, x, auto["rank"])):
        layer["nrc3_mean_aug"] = value
    return {"config": job["config"], "seed": seed, "wd": wd, "ckpt": str(Path(job["ckpt"]).relative_to(REPO)),
            "data": str(Path(job["data_path"]).relative_to(REPO)), "train_mse": train_mse, "test_mse": test_mse,
            "init_stable_rank_w_hidden": statistics.mean(init_srw), "auto": auto, "t": compact(rep_t.to_dict()),
            "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}  # fmt: skip


def cli_check(run: dict, work: Path) -> dict:
    """Audit a saved checkpoint through the real CLI; compare every per-layer metric with the in-memory run."""
    out: dict[str, Any] = {"config": run["config"], "seed": run["seed"], "wd": run["wd"]}
    for rank, key in (("auto", "auto"), (str(T), "t")):
        js = work / f"cli_{run['config']}_wd{run['wd']:g}_seed{run['seed']}_rank{rank}.json"
        cmd = ["nrc-audit", run["ckpt"], run["data"], "--rank", rank, "--json", str(js.relative_to(REPO)),
               "--no-features", "--no-progress"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        rep = json.loads(js.read_text())
        mine = run[key]
        diff = 0.0
        for a, b in zip(rep["layers"], mine["layers"]):
            for m in METRICS:
                if (a[m] is None) != (b[m] is None):
                    diff = math.inf
                elif a[m] is not None:
                    diff = max(diff, abs(a[m] - b[m]) / max(1.0, abs(b[m])))
        same = (rep["summary"]["collapse_onset"] == mine["collapse_onset"]
                and [l["collapsed"] for l in rep["layers"]] == [l["collapsed"] for l in mine["layers"]]
                and rep["settings"]["rank"] == mine["rank"])  # fmt: skip
        out[key] = {"command": " ".join(cmd), "exit_code": proc.returncode, "rank": rep["settings"]["rank"],
                    "rank_source": rep["settings"]["rank_source"], "onset": rep["summary"]["collapse_onset"],
                    "max_rel_diff": diff, "same_verdicts": same, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ rank recovery


def rank_recovery(draws: int = 5) -> list[dict]:
    """target.rank_estimate (99 % energy) through nrc_audit.audit on targets of known rank plus isotropic noise.

    noise_share = share of the total target variance that is i.i.d. Gaussian noise (same variance per
    column). In the population the rule returns r while noise_share·(t−r)/t < 1 − 0.99, i.e. up to
    noise_share* = 0.01·t/(t−r).
    """
    torch.set_num_threads(1)
    rows = []
    for r in (1, 2, 3):
        for t in (3, 5, 10):
            for noise in (0.0, 0.005, 0.01, 0.02, 0.05):
                ests, srs = [], []
                for d in range(draws):
                    rng = np.random.default_rng(50_000 + 1000 * r + 100 * t + d)
                    while True:
                        x, y, info = draw_target(rng, 2000, t, r)
                        if well_posed(info, r, 0.05):
                            break
                    var = np.trace(np.cov(y.T))
                    sigma = math.sqrt(noise / (1 - noise) * var / t)
                    y = y + sigma * rng.standard_normal(y.shape)
                    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
                    rep = nrc_audit.audit(nn.Linear(D, t, bias=False), batches(xt, yt), rank="auto", require_collapsed=0)
                    ests.append(rep.target.rank_estimate)
                    srs.append(rep.target.stable_rank_cov)
                rows.append({"r": r, "t": t, "noise_share": noise, "estimates": ests,
                             "recovered": sum(e == r for e in ests) / draws,
                             "predicted_limit": round(0.01 * t / (t - r), 4) if t > r else None, "stable_rank_cov": [round(s, 3) for s in srs]})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------- threshold evidence


def passes(layer: dict, th: dict) -> bool:
    """The four conditions with thresholds ``th`` (same rule as nrc_audit.core.conditions._verdicts)."""
    return (layer["nrc1"] is not None and layer["nrc1"] <= th["nrc1_max"]
            and layer["nrc2"] is not None and layer["nrc2"] >= th["nrc2_min"]
            and layer["nrc3"] is not None and layer["nrc3"] >= th["nrc3_min"]
            and layer["nrc4_ratio"] is not None and layer["nrc4_ratio"] <= th["nrc4_ratio_max"])  # fmt: skip


def reference_sets(runs: list[dict], key: str = "auto") -> dict[str, list[dict]]:
    """Layers labelled independently of the thresholds (see docs/validation.md, 'How the defaults were chosen')."""
    last = max(l["index"] for l in runs[0][key]["layers"])
    return {
        # the paper's collapsed case: the last layer of models trained with weight decay ≥ 1e-3
        "C: last layer, wd ≥ 1e-3": [r[key]["layers"][last] for r in runs if r["wd"] >= 1e-3],
        # lower layers (input and first hidden layer) of every model: not collapsed in the paper
        "L: layers 0–1, all wd": [l for r in runs for l in r[key]["layers"] if l["index"] <= 1],
        # the layers between: hidden layers 2–4 of the same models (the paper counts its top 3–4 layers as collapsed)
        "M: layers 2–4, wd ≥ 1e-3": [l for r in runs for l in r[key]["layers"] if 2 <= l["index"] < last and r["wd"] >= 1e-3],
        # the paper's no-alignment case: the top layers of models trained with weight decay ≤ 1e-5
        "Z: layers 2–5, wd ≤ 1e-5": [l for r in runs for l in r[key]["layers"] if l["index"] >= 2 and r["wd"] <= 1e-5],
    }


def quantiles(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {"n": int(v.size), "min": float(v.min()), "p10": float(np.quantile(v, 0.1)), "median": float(np.median(v)),
            "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}  # fmt: skip


def threshold_evidence(runs: list[dict]) -> dict:
    sets = reference_sets(runs)
    dist = {m: {name: quantiles([l[m] for l in layers]) for name, layers in sets.items()}
            for m in ("nrc1", "nrc2", "nrc3", "nrc4_ratio", "noise_alignment", "stable_rank_w")}  # fmt: skip
    grid = {"nrc1_max": (0.05, 0.1, 0.25, 0.4, 0.6), "nrc2_min": (0.3, 0.5, 0.6, 0.7, 0.8, 0.9),
            "nrc3_min": (0.5, 0.6, 0.7, 0.8, 0.9), "nrc4_ratio_max": (0.5, 1.0, 2.0, 5.0, 20.0)}  # fmt: skip
    sens = []
    for name, values in grid.items():
        for value in values:
            th = dict(DEFAULTS, **{name: value})
            row: dict[str, Any] = {"threshold": name, "value": value}
            for label, pick in (("wd>=1e-3", lambda w: w >= 1e-3), ("wd=1e-4", lambda w: w == 1e-4),
                                ("wd<=1e-5", lambda w: w <= 1e-5)):  # fmt: skip
                group = [r for r in runs if pick(r["wd"])]
                flags = [[passes(l, th) for l in r["auto"]["layers"]] for r in group]
                row[label] = {"gate": sum(f[-1] for f in flags) / len(flags),
                              "collapsed": statistics.mean(sum(f) for f in flags),
                              "onsets": [collapse_onset(f) for f in flags]}  # fmt: skip
            sens.append(row)
    return {"sets": {k: len(v) for k, v in sets.items()}, "distributions": dist, "sensitivity": sens}


# ------------------------------------------------------------------------------------------ the document


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and (abs(v) >= 1000 or (v != 0 and abs(v) < 10 ** -digits)):
        return f"{v:.2g}"
    return f"{v:.{digits}f}"


def mean_sd(values: list[float | None], digits: int = 3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt(vals[0], digits)
    sd = statistics.stdev(vals)
    if abs(statistics.mean(vals)) < 0.01:
        return f"{statistics.mean(vals):.2e} ± {sd:.1e}"
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def summary_table(runs: list[dict], config: str, key: str) -> list[str]:
    head = ("| weight decay | onset per seed | NRC1 | NRC2 | NRC3 | NRC4 ratio | NRC4 | stable_rank_w (last) "
            "| stable_rank_w (layers 1–4) | noise_alignment | train MSE | test MSE | layers with a gap warning |")
    rows = [head, "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for wd in WEIGHT_DECAYS:
        group = sorted((r for r in runs if r["config"] == config and r["wd"] == wd), key=lambda r: r["seed"])
        if not group:
            continue
        last = [r[key]["layers"][-1] for r in group]
        hidden = [statistics.mean(l["stable_rank_w"] for l in r[key]["layers"][1:-1]) for r in group]
        onsets = ", ".join("—" if r[key]["collapse_onset"] is None else str(r[key]["collapse_onset"]) for r in group)
        rows.append(f"| {wd:g} | {onsets} | {mean_sd([l['nrc1'] for l in last])} | {mean_sd([l['nrc2'] for l in last])} | "
                    f"{mean_sd([l['nrc3'] for l in last])} | {mean_sd([l['nrc4_ratio'] for l in last], 2)} | "
                    f"{mean_sd([l['nrc4'] for l in last])} | {mean_sd([l['stable_rank_w'] for l in last], 2)} | "
                    f"{mean_sd(hidden, 1)} | {mean_sd([l['noise_alignment'] for l in last])} | "
                    f"{mean_sd([r['train_mse'] for r in group])} | {mean_sd([r['test_mse'] for r in group])} | "
                    f"{sum(l['gap_warning'] for r in group for l in r[key]['layers'])} |")  # fmt: skip
    return rows


def per_layer_table(run: dict) -> list[str]:
    rows = ["| # | h | NRC1 | NRC2 | NRC3 | NRC4 ratio | cka_signal | noise_alignment | stable_rank_cov | stable_rank_w "
            "| NRC3 with mean (diag.) | bound holds | NRC1 at k=t | NRC3 at k=t | collapsed (k=r) | collapsed (k=t) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|:---:|:---:|"]  # fmt: skip
    for l, lt in zip(run["auto"]["layers"], run["t"]["layers"]):
        h = D if l["index"] == 0 else CONFIGS[run["config"]]["width"]
        rows.append(f"| {l['index']} | {h} | {fmt(l['nrc1'])} | {fmt(l['nrc2'])} | {fmt(l['nrc3'])} | {fmt(l['nrc4_ratio'], 2)} | "
                    f"{fmt(l['cka_signal'])} | {fmt(l['noise_alignment'])} | {fmt(l['stable_rank_cov'], 2)} | "
                    f"{fmt(l['stable_rank_w'], 1)} | {fmt(l['nrc3_mean_aug'])} | {'yes' if l['bound_holds'] else 'no'} | "
                    f"{fmt(lt['nrc1'])} | {fmt(lt['nrc3'])} | {'✅' if l['collapsed'] else '❌'} | {'✅' if lt['collapsed'] else '❌'}{' ⚠' if lt['gap_warning'] else ''} |")  # fmt: skip
    return rows


def write_doc(res: dict, path: Path) -> None:
    runs, meta = res["runs"], res["meta"]
    lines = [
        f"{BEGIN} (generated by validation/run_validation.py; do not edit by hand) -->",
        "",
        f"Generated by `{meta['command']}`: {len(runs)} models in {meta['wall_s']:.0f} s wall-clock "
        f"with {meta['jobs']} worker(s) on a shared 2-core machine; {meta['cpu_s']:.0f} s of CPU in total "
        f"({meta['train_cpu_s']:.0f} s training + auditing the models, the rest CLI runs, rank recovery and plots). "
        f"torch {meta['torch']}, nrc-audit {meta['nrc_audit']}.",
        "",
        "Targets per seed (t = 10, r = 2; eigenvalue shares of Σ_Y, first four):",
        "",
        "| seed | data seed | draws rejected | target-net units active | Σ_Y eigenvalue shares | rank_estimate | stable_rank_cov |",
        "|---:|---:|---:|---|---|---:|---:|",
    ]
    for seed, info in sorted(res["data"].items()):
        run = next(r for r in runs if r["seed"] == int(seed))
        lines.append(f"| {seed} | {info['data_seed']} | {info['rejected_draws']} | {info['units_active']} | "
                     f"{info['eigen_share']} | {run['auto']['rank_estimate']} | {run['auto']['target_stable_rank_cov']:.3f} |")  # fmt: skip
    estimates = sorted({r["auto"]["rank_estimate"] for r in runs})
    lines += ["", f"`target.rank_estimate` over all {len(runs)} models: {estimates} (the true r is {R}).", ""]
    for key, label in (("auto", f"k = r = {R}"), ("t", f"k = t = {T}")):
        fails = sorted({l["index"] for r in runs for l in r[key]["layers"] if l["bound_holds"] is False})
        n = sum(len(r[key]["layers"]) for r in runs)
        bad = sum(l["bound_holds"] is False for r in runs for l in r[key]["layers"])
        lines.append(f"Proposition 1 (`bound.holds`) at {label}: fails in {bad} of {n} layer audits"
                     + (f" (layers {fails})." if fails else "."))
    lines.append("")
    for config in CONFIGS:
        if not any(r["config"] == config for r in runs):
            continue
        cfg = CONFIGS[config]
        seeds = sorted({r["seed"] for r in runs if r["config"] == config})
        lines += [
            f"### Sweep `{config}`: lr {cfg['lr']}, batch {cfg['batch']}, {meta['epochs'] or cfg['epochs']} epochs, "
            f"{cfg['depth']} layers of width {cfg['width']}",
            "",
            f"Last layer (index {cfg['depth'] - 1}), mean ± sd over seeds {seeds}; onset = collapse onset per seed "
            "(layer index, — when the last layer is not collapsed); NRC4 ratio = probe MSE / model MSE; "
            "`stable_rank_w (layers 1–4)` is the mean over the hidden layers' weights (at initialisation: "
            f"{statistics.mean(r['init_stable_rank_w_hidden'] for r in runs if r['config'] == config):.1f}); "
            "last column: layers (all seeds) whose report warns that the top-k subspace of H or W is ill-defined "
            "(λ_k ≈ λ_(k+1)).",
            "",
            f"**k = auto** (`--rank auto` = `target.rank_estimate` = {R}):",
            "",
            *summary_table(runs, config, "auto"),
            "",
            f"**k = t = {T}** (`--rank {T}` = `--rank t`, the paper's k = t):",
            "",
            *summary_table(runs, config, "t"),
            "",
        ]
    for config in CONFIGS:
        first = sorted((r for r in runs if r["config"] == config), key=lambda r: (r["wd"], r["seed"]))
        for wd in WEIGHT_DECAYS:
            run = next((r for r in first if r["wd"] == wd), None)
            if run is None:
                continue
            lines += [f"<details><summary>Per layer: <code>{config}</code>, weight decay {wd:g}, seed {run['seed']} "
                      f"(k = r = {R} unless marked k=t)</summary>", "", *per_layer_table(run), "", "</details>", ""]  # fmt: skip
    if res.get("cli"):
        lines += ["### The CLI gives the same numbers as the in-memory API", "",
                  "| sweep | wd | seed | rank | CLI exit code | onset | max relative difference, every metric of every layer | same verdicts | seconds |",
                  "|---|---:|---:|---|---:|---:|---:|:---:|---:|"]  # fmt: skip
        for c in res["cli"]:
            for key in ("auto", "t"):
                e = c[key]
                lines.append(f"| {c['config']} | {c['wd']:g} | {c['seed']} | {e['rank']} ({e['rank_source']}) | {e['exit_code']} | "
                             f"{'—' if e['onset'] is None else e['onset']} | {e['max_rel_diff']:.1e} | "
                             f"{'yes' if e['same_verdicts'] else '**no**'} | {e['seconds']} |")  # fmt: skip
        lines += ["", f"Command pattern: `{res['cli'][0]['auto']['command']}` (exit code 1 = the default gate failed: "
                  "the last layer is not collapsed).", ""]  # fmt: skip
    if res.get("rank_recovery"):
        noises = sorted({row["noise_share"] for row in res["rank_recovery"]})
        lines += ["### `--rank auto` on targets of known rank", "",
                  "Share of 5 random draws (N = 2000) for which `target.rank_estimate` = r, and the estimates; "
                  "columns: share of the target variance that is isotropic noise. Last column: the population "
                  "limit 0.01·t/(t−r) of the 99 % rule.", "",
                  "| r | t | " + " | ".join(f"noise {n:.1%}" for n in noises) + " | limit | stable_rank_cov (noise 0) |",
                  "|---:|---:|" + "---|" * len(noises) + "---:|---|"]  # fmt: skip
        for r in (1, 2, 3):
            for t in (3, 5, 10):
                cells = [row for row in res["rank_recovery"] if row["r"] == r and row["t"] == t]
                if not cells:
                    continue
                text = [f"{c['recovered']:.0%} {sorted(set(c['estimates']))}" for c in sorted(cells, key=lambda c: c["noise_share"])]
                lines.append(f"| {r} | {t} | " + " | ".join(text) + f" | {'— (t = r)' if cells[0]['predicted_limit'] is None else format(cells[0]['predicted_limit'], '.1%')} | "
                             f"{min(cells[0]['stable_rank_cov']):.2f}–{max(cells[0]['stable_rank_cov']):.2f} |")  # fmt: skip
        lines.append("")
    ev = res.get("thresholds")
    if ev:
        sets = list(ev["sets"])
        lines += ["### Threshold evidence", "",
                  "Reference sets, labelled without the thresholds (k = r = 2, both sweeps, all seeds): "
                  + "; ".join(f"**{name}** ({n} layers)" for name, n in ev["sets"].items()) + ".", "",
                  "| metric | default | " + " | ".join(f"{s.split(':')[0]}: min / p10 / median / p90 / max" for s in sets) + " |",
                  "|---|---:|" + "---|" * len(sets)]  # fmt: skip
        default_of = {"nrc1": "≤ 0.25", "nrc2": "≥ 0.6", "nrc3": "≥ 0.7", "nrc4_ratio": "≤ 2.0", "noise_alignment": "—",
                      "stable_rank_w": "—"}  # fmt: skip
        for m, by_set in ev["distributions"].items():
            cells = []
            for s in sets:
                q = by_set[s]
                digits = 1 if m in ("stable_rank_w",) or (m == "nrc4_ratio" and q["max"] > 10) else (2 if m == "nrc4_ratio" else 3)
                cells.append(" / ".join(fmt(q[p], digits) for p in ("min", "p10", "median", "p90", "max")))
            lines.append(f"| {m} | {default_of[m]} | " + " | ".join(cells) + " |")
        lines += ["", "Sensitivity: one threshold varied, the others at their defaults (k = r, both sweeps, "
                  "3 seeds each → 6 models per weight decay). gate = share of models whose last layer is "
                  "collapsed; n = mean number of collapsed layers (of 6).", "",
                  "| threshold | value | wd ≥ 1e-3: gate / n | wd = 1e-4: gate / n | wd ≤ 1e-5: gate / n |",
                  "|---|---:|---|---|---|"]  # fmt: skip
        for row in ev["sensitivity"]:
            mark = " **(default)**" if DEFAULTS[row["threshold"]] == row["value"] else ""
            cells = [f"{row[g]['gate']:.0%} / {row[g]['collapsed']:.1f}" for g in ("wd>=1e-3", "wd=1e-4", "wd<=1e-5")]
            lines.append(f"| {row['threshold']} | {row['value']:g}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(END)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else f"# Validation\n\n{BEGIN} -->\n{END}\n"
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + block + text[end:])


def plots(res: dict, img: Path) -> list[Path]:
    """A summary figure: last-layer NRC3 and hidden-layer stable_rank_w against weight decay, and the
    reference-set distributions of the four metrics with the default thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), constrained_layout=True)
    xs = {wd: i for i, wd in enumerate(WEIGHT_DECAYS)}
    for c, (config, marker) in enumerate(zip(CONFIGS, ("o", "s"))):
        for ax, (key, field, f) in zip(axes, (("auto", "nrc3", lambda r: r["auto"]["layers"][-1]["nrc3"]),
                                              ("t", "nrc3", lambda r: r["t"]["layers"][-1]["nrc3"]),
                                              ("auto", "stable_rank_w", lambda r: statistics.mean(
                                                  l["stable_rank_w"] for l in r["auto"]["layers"][1:-1])))):  # fmt: skip
            pts = [(xs[r["wd"]] + (c - 0.5) * 0.2, f(r)) for r in runs if r["config"] == config]
            if not pts:
                continue
            ax.scatter(*zip(*pts), marker=marker, s=18, alpha=0.8, label=config)
    for ax, title in zip(axes, ("last-layer NRC3, k = r = 2", "last-layer NRC3, k = t = 10",
                                "stable_rank_w, mean of layers 1–4")):  # fmt: skip
        ax.set_xticks(range(len(WEIGHT_DECAYS)), [f"{w:g}" for w in WEIGHT_DECAYS])
        ax.set_xlabel("weight decay")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    init = statistics.mean(r["init_stable_rank_w_hidden"] for r in runs)
    axes[2].axhline(init, color="gray", linestyle=":", linewidth=1)
    axes[2].annotate(f"He init ≈ {init:.0f}", (0, init), textcoords="offset points", xytext=(0, -10), fontsize=7)
    for ax in axes[:2]:
        ax.axhline(DEFAULTS["nrc3_min"], color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.02)
    out = [img / "validation_weight_decay.png"]
    fig.savefig(out[0], dpi=80)
    plt.close(fig)

    sets = reference_sets(runs)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.0), constrained_layout=True)
    panels = (("nrc1", "nrc1_max", False), ("nrc2", "nrc2_min", False), ("nrc3", "nrc3_min", False),
              ("nrc4_ratio", "nrc4_ratio_max", True))  # fmt: skip
    rng = np.random.default_rng(0)
    for ax, (m, th, log) in zip(axes, panels):
        for i, (name, layers) in enumerate(sets.items()):
            vals = [l[m] for l in layers if l[m] is not None]
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=8, alpha=0.6)
        ax.axhline(DEFAULTS[th], color="tab:red", linestyle="--", linewidth=1, label=f"default {DEFAULTS[th]:g}")
        ax.set_xticks(range(len(sets)), [s.split(":")[0] for s in sets])
        if log:
            ax.set_yscale("log")
        ax.set_title(m + " (k = r)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out.append(img / "validation_thresholds.png")
    fig.savefig(out[1], dpi=80)
    plt.close(fig)
    return out


def rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) or obj == 0 else float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs of every config")
    parser.add_argument("--jobs", type=int, default=1, help="models trained in parallel (one thread each)")
    parser.add_argument("--out", type=Path, default=REPO / "validation" / "out", help="checkpoints and data (ignored by git)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "validation.md")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "validation_results.json")
    parser.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 epochs, one config; writes only under --out")
    args = parser.parse_args()
    configs = args.configs.split(",")
    if args.quick:
        args.seeds, args.epochs, configs = 1, 30, [MAIN]
        args.doc, args.results, args.img = args.out / "validation.md", args.out / "validation_results.json", args.out / "img"
    argv = " ".join(sys.argv[1:])
    command = f"python validation/run_validation.py{' ' + argv if argv else ''}"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    args.out.mkdir(parents=True, exist_ok=True)
    args.img.mkdir(parents=True, exist_ok=True)

    data_info, jobs = {}, []
    for seed in range(args.seeds):
        arrays, info = make_data(seed)
        data_path = args.out / f"data_seed{seed}.h5"
        write_h5(data_path, arrays, info)
        data_info[str(seed)] = info
        for config in configs:
            (args.out / config).mkdir(exist_ok=True)
            for wd in WEIGHT_DECAYS:
                plot = args.img / f"validation_{config}_wd{wd:g}.png" if seed == 0 and config == MAIN else None
                jobs.append({"config": config, "seed": seed, "wd": wd, "epochs": args.epochs, "data_path": str(data_path),
                             "ckpt": str(args.out / config / f"wd{wd:g}_seed{seed}.safetensors"),
                             "plot": str(plot) if plot else None})  # fmt: skip
    runs = []
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs, maxtasksperchild=1) as pool:
            for run in pool.imap_unordered(run_one, jobs):
                runs.append(run)
                report_progress(run, len(runs), len(jobs))
    else:
        for job in jobs:
            runs.append(run_one(job))
            report_progress(runs[-1], len(runs), len(jobs))
    runs.sort(key=lambda r: (list(CONFIGS).index(r["config"]), r["seed"], r["wd"]))
    train_cpu = sum(r["cpu_s"] for r in runs)

    print("CLI checks …", flush=True)
    cli = [cli_check(r, args.out) for r in runs if r["seed"] == 0]
    cli_cpu = sum(c[k]["seconds"] for c in cli for k in ("auto", "t"))  # wall of the subprocesses, ≈ their CPU
    print("rank recovery …", flush=True)
    recovery = rank_recovery(draws=2 if args.quick else 5)
    res = {"meta": {"command": command, "jobs": args.jobs, "seeds": args.seeds, "configs": {c: CONFIGS[c] for c in configs},
                    "epochs": args.epochs, "weight_decays": list(WEIGHT_DECAYS), "d": D, "t": T, "r": R,
                    "n_train": N_TRAIN, "n_test": N_TEST, "torch": torch.__version__, "nrc_audit": nrc_audit.__version__},
           "data": data_info, "runs": runs, "cli": cli, "rank_recovery": recovery,
           "thresholds": threshold_evidence(runs)}  # fmt: skip
    pngs = plots(res, args.img)
    res["meta"].update(wall_s=time.perf_counter() - wall0, train_cpu_s=train_cpu,
                       cpu_s=train_cpu + cli_cpu + time.process_time() - cpu0)
    args.results.write_text(json.dumps(rounded(res), separators=(",", ":")) + "\n")
    write_doc(res, args.doc)
    for png in [*pngs, *sorted(args.img.glob("validation_*_wd*.png"))]:
        print(f"  {png.relative_to(REPO)}: {png.stat().st_size / 1024:.0f} KB")
    print(f"wrote {args.doc.relative_to(REPO)} and {args.results.relative_to(REPO)} "
          f"({args.results.stat().st_size / 1024:.0f} KB) in {res['meta']['wall_s']:.0f} s wall, "
          f"{res['meta']['cpu_s']:.0f} s CPU")  # fmt: skip


def report_progress(run: dict, done: int, total: int) -> None:
    a, t = run["auto"], run["t"]
    print(f"[{done}/{total}] {run['config']} seed {run['seed']} wd {run['wd']:g}: train {run['train_mse']:.4f} "
          f"test {run['test_mse']:.4f} | k=auto({a['rank']}) onset {a['collapse_onset']} last nrc3 {a['layers'][-1]['nrc3']:.3f} "
          f"| k=t onset {t['collapse_onset']} | {run['cpu_s']:.0f} s CPU", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
