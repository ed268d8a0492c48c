"""PNG figures (optional extra ``nrc-audit[plot]``): the paper's Figure 1 layout and the training trend.

Presentation only; matplotlib is imported lazily, and its absence is an exit-2 error with an install hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from nrc_audit.errors import OptionsError
from nrc_audit.outputs.records import ReportData as Report

PANELS = (  # (field, title, threshold key, direction)
    ("nrc1", "NRC1: noise fraction", "nrc1_max", "≤"),
    ("nrc2", "NRC2: CKA(H, Y)", "nrc2_min", "≥"),
    ("nrc3", "NRC3: feature–weight alignment", "nrc3_min", "≥"),
    ("nrc4", "NRC4: linear probe MSE", None, "≤"),
)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionsError(
            "--plot needs matplotlib, which is not installed. Install the plot extra: pip install 'nrc-audit[plot]'."
        ) from None
    return plt


def _values(report: Report, key: str) -> list[float]:
    return [float("nan") if getattr(layer, key) is None else getattr(layer, key) for layer in report.layers]


def plot_report(report: Report, path: Path) -> Path:
    """Four panels, one per condition, against the layer index; thresholds dashed, model MSE on NRC4, onset marked."""
    plt = _pyplot()
    th = report.settings["thresholds"]
    xs = [layer.index for layer in report.layers]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
    for ax, (key, title, th_key, _) in zip(axes, PANELS):
        ax.plot(xs, _values(report, key), marker="o", color="tab:blue")
        if th_key is not None:
            ax.axhline(th[th_key], color="gray", linestyle="--", linewidth=1, label=f"threshold {th[th_key]}")
        else:
            ax.set_yscale("log")
            if report.model_mse:
                ax.axhline(report.model_mse, color="tab:red", linestyle="--", linewidth=1, label="model MSE")
                ax.axhline(report.model_mse * th["nrc4_ratio_max"], color="gray", linestyle=":", linewidth=1,
                           label=f"{th['nrc4_ratio_max']}× model MSE")  # fmt: skip
        if report.summary.collapse_onset is not None:
            ax.axvline(report.summary.collapse_onset, color="tab:green", linewidth=1.5, label="collapse onset")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer index")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Deep NRC audit · {report.model['architecture']} · N = {report.data['num_samples']}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_trend(labels: Sequence[str], reports: Sequence[Report], path: Path) -> Path:
    """Each condition against checkpoint (x) with one line per layer (the paper's Figure 5 view)."""
    plt = _pyplot()
    th = reports[-1].settings["thresholds"]
    xs = list(range(len(reports)))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
    names = [layer.name for layer in reports[-1].layers]
    colors = plt.cm.viridis([i / max(1, len(names) - 1) for i in range(len(names))])
    for ax, (key, title, th_key, _) in zip(axes, PANELS):
        for i, name in enumerate(names):
            ys = [_values(r, key)[i] if i < len(r.layers) else float("nan") for r in reports]
            ax.plot(xs, ys, marker=".", color=colors[i], label=f"{i}: {name}")
        if th_key is not None:
            ax.axhline(th[th_key], color="gray", linestyle="--", linewidth=1)
        else:
            ax.set_yscale("log")
            ax.plot(xs, [r.model_mse for r in reports], color="tab:red", linestyle="--", label="model MSE")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, loc="best")
    fig.suptitle("Deep NRC over training", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
