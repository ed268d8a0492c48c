"""PNG figures (optional extra ``nrc-audit[plot]``): the paper's Figure 1 view and the training trend.

Sized for a model card (2×2 panels, 800 px wide): NRC1–NRC3 on fixed [0, 1] axes so that spread is not
exaggerated, NRC4 as the probe-MSE / model-MSE ratio on a log axis; every point marked pass (filled circle)
or fail (red cross); the thresholds, the collapse onset and k drawn in. Presentation only; matplotlib is
imported lazily, and its absence is an exit-2 error with an install hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from nrc_audit.core.verdicts import PAPER, Condition
from nrc_audit.errors import OptionsError
from nrc_audit.outputs.records import ReportData as Report

PASS_COLOR, FAIL_COLOR, LINE_COLOR, ONSET_COLOR = "#2b8a3e", "#c92a2a", "#1c7ed6", "#5f3dc4"
WIDTH_IN, HEIGHT_IN, DPI = 8.0, 6.4, 100  # 800 × 640 px: legible at model-card width without scaling


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
    return [float("nan") if getattr(layer, key) is None else float(getattr(layer, key)) for layer in report.layers]


def _style_axis(ax: Any, c: Condition, ys: Sequence[float]) -> None:
    ax.set_ylabel(c.axis, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    if c.scale:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        finite = [y for y in ys if y == y and y > 0]
        low, high = min(finite + [0.5]) / 1.5, max(finite + [10.0]) * 1.5  # 1× and the threshold always in view
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if high / low < 1e3 else (1.0,)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(-0.03, 1.03)  # fixed [0, 1]: a fraction or a cosine; no zoom that exaggerates spread


def _threshold(ax: Any, c: Condition, thresholds: dict[str, float]) -> None:
    """The threshold as a dashed line, its value in the title (a label on the line would cover points)."""
    value = thresholds[c.threshold]
    ax.axhline(value, color="gray", linestyle="--", linewidth=1.2, label="threshold")
    ax.set_title(f"{c.name.upper()}: {c.meaning} · pass {c.op} {value:g}{'×' if c.scale else ''}", fontsize=10)
    if c.scale:
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1, label=f"1× {c.scale}")


def _marks(ax: Any, xs: Sequence[float], ys: Sequence[float], ok: Sequence[bool], size: float = 36) -> None:
    good = [(x, y) for x, y, o in zip(xs, ys, ok) if o and y == y]
    bad = [(x, y) for x, y, o in zip(xs, ys, ok) if not o and y == y]
    if good:
        ax.scatter(*zip(*good), s=size, color=PASS_COLOR, zorder=3, label="passes")
    if bad:
        ax.scatter(*zip(*bad), s=size * 1.2, color=FAIL_COLOR, marker="X", zorder=3, label="fails")


def plot_report(report: Report, path: Path) -> Path:
    """2×2 panels, one per condition, against the layer index (the paper's Figure 1 layout, one model)."""
    plt = _pyplot()
    th = report.settings["thresholds"]
    xs = [layer.index for layer in report.layers]
    onset = report.summary.collapse_onset
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH_IN, HEIGHT_IN), sharex=True, constrained_layout=True)
    for ax, c in zip(axes.flat, PAPER):  # the paper's four conditions, one panel each (2×2)
        ys = _values(report, c.field)
        ax.plot(xs, ys, color=LINE_COLOR, linewidth=1.2, zorder=2)
        _marks(ax, xs, ys, [layer.passed.get(c.name, False) for layer in report.layers])
        _threshold(ax, c, th)
        if onset is not None:  # the collapsed run, from the onset to the output, shaded
            ax.axvspan(onset - 0.5, xs[-1] + 0.5, color=ONSET_COLOR, alpha=0.08, linewidth=0,
                       label=f"collapsed from the onset (layer {onset})")  # fmt: skip
            ax.axvline(onset - 0.5, color=ONSET_COLOR, linewidth=1, alpha=0.6)
        _style_axis(ax, c, ys)
        ax.set_xticks(xs[:: 1 + len(xs) // 13])  # at most ~13 labels fit a 400 px panel
        ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
    for ax in axes[1]:
        ax.set_xlabel("layer index (input → output)", fontsize=9)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(5, len(handles)), fontsize=8,
               frameon=False)  # fmt: skip
    st = report.settings
    gate = report.summary.gate
    verdict = "gate disabled" if gate.require_collapsed == 0 else "gate passed" if gate.passed else "gate FAILED"
    fig.suptitle(f"Deep NRC audit · {report.model['architecture']}\nN = {report.data['num_samples']:,} · "
                 f"t = {report.target.dim} · k = {st['rank']} ({st['rank_source']}) · {verdict}",
                 fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def plot_trend(labels: Sequence[str], reports: Sequence[Report], path: Path) -> Path:
    """2×2 panels, each condition against checkpoint in the order given (training order), one line per layer,
    failing points crossed; one legend for the whole figure (the paper's Figure 5 view)."""
    plt = _pyplot()
    th = reports[-1].settings["thresholds"]
    xs = list(range(len(reports)))
    names = [layer.name for layer in reports[-1].layers]
    colors = plt.cm.viridis([i / max(1, len(names) - 1) * 0.9 for i in range(len(names))])
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH_IN, HEIGHT_IN + 0.8), sharex=True, constrained_layout=True)
    for ax, c in zip(axes.flat, PAPER):  # the paper's four conditions, one panel each (2×2)
        every: list[float] = []
        for i, name in enumerate(names):
            ys = [_values(r, c.field)[i] if i < len(r.layers) else float("nan") for r in reports]
            ok = [i < len(r.layers) and r.layers[i].passed.get(c.name, False) for r in reports]
            every += ys
            ax.plot(xs, ys, color=colors[i], linewidth=1.3, label=f"layer {i}: {name}")
            bad = [(x, y) for x, y, o in zip(xs, ys, ok) if not o and y == y]
            if bad:
                ax.scatter(*zip(*bad), s=22, color=colors[i], marker="x", zorder=3)
        _threshold(ax, c, th)
        _style_axis(ax, c, every)
    crowded = sum(len(label) for label in labels) > 36  # more text than a panel's width holds flat
    for ax in axes[1]:
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
        ax.set_xlabel("checkpoint (training order)", fontsize=9)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    handles["fails its threshold"] = plt.Line2D([], [], color="gray", marker="x", linestyle="none")
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)  # fmt: skip
    fig.suptitle(f"Deep NRC over training · {reports[-1].model['architecture']}", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)
