"""Reproduce the paper's weight-decay and intrinsic-rank findings with nrc-audit (CPU, minutes).

Setting (Rangamani & Unal §4.3-4.4, PAPER_NOTES §4): x ~ N(0, I_20), targets of dimension t = 10 from a
random 2-hidden-layer ReLU net of width r = 2 (intrinsic rank 2), standardised. ReLU MLPs without biases
trained with SGD (momentum 0.9), MSE and a multi-step LR schedule, over a weight-decay sweep and several
seeds; every model is audited on its training set with ``--rank t`` and ``--rank auto`` through the same
code as the CLI (``nrc_audit.audit``). Writes ``docs/validation.md`` (tables between markers) and a JSON
file with every report.

    python validation/run_validation.py                      # full sweep: 5 weight decays × 3 seeds
    python validation/run_validation.py --seeds 1 --epochs 40 # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import nrc_audit

REPO = Path(__file__).resolve().parents[1]
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
D, T, R = 20, 10, 2


def synthetic(seed: int, n_train: int = 3000, n_test: int = 1000) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n_train + n_test, D, generator=g)
    w1, w2, w3 = torch.randn(D, R, generator=g), torch.randn(R, R, generator=g), torch.randn(R, T, generator=g)
    y = torch.relu(torch.relu(x @ w1) @ w2) @ w3  # rank ≤ r = 2 after the last linear map
    y = (y - y[:n_train].mean(0)) / y[:n_train].std(0).clamp_min(1e-8)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def mlp(depth: int, width: int) -> nn.Sequential:
    dims = [D] + [width] * (depth - 1) + [T]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(seed: int, wd: float, args: argparse.Namespace, data: tuple) -> tuple[nn.Module, float, float]:
    torch.manual_seed(seed)
    x, y, xt, yt = data
    model = mlp(args.depth, args.width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [args.epochs // 3, 2 * args.epochs // 3], gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return model, float(nn.functional.mse_loss(model(x), y)), float(nn.functional.mse_loss(model(xt), yt))


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int | str) -> dict:
    batches = [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, len(x), 1024)]
    return nrc_audit.audit(model, batches, rank=rank, require_collapsed=0).to_dict()


def mean_sd(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def summary_rows(runs: list[dict], key: str) -> list[str]:
    rows = []
    for wd in WEIGHT_DECAYS:
        group = [r for r in runs if r["wd"] == wd]
        reps = [r[key] for r in group]
        last = [rep["layers"][-1] for rep in reps]
        onsets = [rep["summary"]["collapse_onset"] for rep in reps]
        n_layers = reps[0]["summary"]["num_layers"]
        onset_text = ", ".join("—" if o is None else str(o) for o in onsets)
        rows.append(
            f"| {wd:g} | {onset_text} (of {n_layers}) | {mean_sd([l['nrc1'] for l in last])} | {mean_sd([l['nrc2'] for l in last])} | "
            f"{mean_sd([l['nrc3'] for l in last])} | {mean_sd([l['nrc4_ratio'] for l in last])} | "
            f"{mean_sd([l['stable_rank_w'] for l in last])} | {mean_sd([l['noise_alignment'] for l in last])} | "
            f"{mean_sd([r['train_mse'] for r in group])} | {mean_sd([r['test_mse'] for r in group])} |"
        )
    return rows


def per_layer_table(report: dict) -> list[str]:
    rows = ["| # | NRC1 | NRC2 | NRC3 | NRC4 ratio | noise_alignment | stable_rank_w | collapsed |", "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for l in report["layers"]:
        f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"| {l['index']} | {f(l['nrc1'])} | {f(l['nrc2'])} | {f(l['nrc3'])} | {f(l['nrc4_ratio'])} | "
                    f"{f(l['noise_alignment'])} | {f(l['stable_rank_w'])} | {'✅' if l['collapsed'] else '❌'} |")
    return rows


def write_doc(runs: list[dict], args: argparse.Namespace, elapsed: float, path: Path) -> None:
    header = ("| weight decay | collapse onset per seed | NRC1 | NRC2 | NRC3 | NRC4 ratio | stable_rank_w | noise_alignment "
              "| train MSE | test MSE |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "<!-- BEGIN validation results (generated by validation/run_validation.py; do not edit by hand) -->",
        f"Command: `python validation/run_validation.py --seeds {args.seeds} --epochs {args.epochs} --depth {args.depth} "
        f"--width {args.width}` ({len(runs)} models, {elapsed:.0f} s on this machine). Seeds {seeds}; "
        f"last-layer values are mean ± sd over seeds; onset is the layer index (0-based) per seed, — when the "
        f"last layer is not collapsed.",
        "",
        f"**Rank k = t = {T}** (the default):",
        "",
        header, *summary_rows(runs, "report_t"),
        "",
        f"**Rank k = auto** (`target.rank_estimate`, here {runs[0]['report_auto']['settings']['rank']} for every seed: "
        f"{sorted({r['report_auto']['settings']['rank'] for r in runs})}):",
        "",
        header, *summary_rows(runs, "report_auto"),
        "",
    ]
    for wd in WEIGHT_DECAYS:
        run = next(r for r in runs if r["wd"] == wd)
        lines += [f"Per layer, weight decay {wd:g}, seed {run['seed']}, rank auto:", "", *per_layer_table(run["report_auto"]), ""]
    lines.append("<!-- END validation results -->")
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Validation\n\n<!-- BEGIN validation results -->\n<!-- END validation results -->\n"
    start = text.index("<!-- BEGIN validation results")
    end = text.index("<!-- END validation results -->") + len("<!-- END validation results -->")
    path.write_text(text[:start] + block + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "validation.md")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "validation_results.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        data = synthetic(seed)
        for wd in WEIGHT_DECAYS:
            t0 = time.perf_counter()
            model, train_mse, test_mse = train(seed, wd, args, data)
            rep_t, rep_auto = audit(model, data[0], data[1], None), audit(model, data[0], data[1], "auto")
            runs.append({"seed": seed, "wd": wd, "train_mse": train_mse, "test_mse": test_mse,
                         "report_t": rep_t, "report_auto": rep_auto})
            last = rep_auto["layers"][-1]
            print(f"seed {seed} wd {wd:g}: train {train_mse:.4f} test {test_mse:.4f} | rank auto={rep_auto['settings']['rank']} "
                  f"onset {rep_auto['summary']['collapse_onset']} last nrc1 {last['nrc1']:.3f} nrc3 {last['nrc3']:.3f} "
                  f"srw {last['stable_rank_w']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    elapsed = time.perf_counter() - start
    args.results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}) + "\n")
    write_doc(runs, args, elapsed, args.doc)
    print(f"wrote {args.doc} and {args.results} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
