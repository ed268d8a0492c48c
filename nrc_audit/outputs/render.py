"""Presentation only: the Rich table and summary. Never computes a metric."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from nrc_audit.config import NEAR_MARGIN, Thresholds
from nrc_audit.core.verdicts import RULES, TABLE, near_threshold
from nrc_audit.outputs.records import LayerReport, ReportData as Report, shown

FAIL, PASS, WARN = "bold red", "green", "yellow"


def _num(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None or value != value else format(value, spec)  # None or NaN: undefined


def _times(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:.2g}×" if ratio < 10 else f"{ratio:,.0f}×"


def _cell(value: float | None, ok: bool, spec: str = ".3f", near: bool = False) -> Text:
    """A value in green (passes) or red (fails), with ≈ when it lies within NEAR_MARGIN of its threshold."""
    text = Text(_num(value, spec), style=PASS if ok else FAIL)
    if near:
        text.append("≈", style=WARN)
    return text


def near_conditions(layer: LayerReport, thresholds: dict[str, float]) -> set[str]:
    """The layer's conditions whose values lie within NEAR_MARGIN of their thresholds (the table's ≈)."""
    return set(near_threshold({f: getattr(layer, f) for f, _, _ in RULES.values()}, Thresholds.from_dict(thresholds)))


def _bound(layer: LayerReport) -> Text:
    b = layer.bound
    if b.get("lhs") is None:
        return Text("—", style="dim")
    text = f"{b['lhs']:.2f}{'≤' if b['holds'] else '>'}{b['rhs']:.2f}"
    return Text(text, style="" if b["holds"] else WARN)


def summary_line(report: Report) -> str:
    """k, the collapse onset and the gate in one line, e.g. 'k = 4 (target_dim) · onset: layer 2 · gate: passed'."""
    s, st = report.summary, report.settings
    onset = "none" if s.collapse_onset is None else f"layer {s.collapse_onset}"
    g = s.gate
    gate = ("disabled" if g.require_collapsed == 0 else f"passed (last {g.require_collapsed} collapsed)" if g.passed
            else f"FAILED (layers {', '.join(map(str, g.failing_layers))})")  # fmt: skip
    return f"k = {st['rank']} ({st['rank_source']}) · collapse onset: {onset} · gate: {gate}"


def rules(thresholds: dict[str, float]) -> list[str]:
    """Every condition of the report as captions state it ('NRC1 noise ≤ 0.25'); a report of an earlier
    version, without the fifth threshold, states four."""
    return [c.rule(thresholds[c.threshold]) for c in TABLE if c.threshold in thresholds]


def layer_table(report: Report, summary: bool = False) -> Table:
    """One row per layer: the four conditions (failing values in red), the bound and the verdict.
    ``summary``: the caption starts with k, the onset and the gate (for a table shown on its own)."""
    th = report.settings["thresholds"]
    table = Table(
        title=f"Deep NRC audit · {shown(report.model['architecture'])}",
        caption=(summary_line(report) + "\n" if summary else "") + "collapsed when " + " · ".join(rules(th))
        + f" · ≈: within {NEAR_MARGIN:g} of the threshold · bound: lhs ≤ √NRC1+√(1−NRC2)"
        + (" · h*: input averaged over spatial/extra dims" if any(layer.pooled for layer in report.layers) else ""),
        box=box.MINIMAL,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    onset = report.summary.collapse_onset
    rows = []
    for layer in report.layers:
        p, near = layer.passed, near_conditions(layer, th)
        nrc4 = Text(f"{_num(layer.nrc4, '.2g')} ({_times(layer.nrc4_ratio)})", style=PASS if p["nrc4"] else FAIL)
        if "nrc4" in near:
            nrc4.append("≈", style=WARN)
        verdict = Text("✓", style=PASS) if layer.collapsed else Text("✗", style=FAIL)
        if onset is not None and layer.index == onset:
            verdict.append(" onset", style="bold green")
        if layer.warnings:
            verdict.append(" ⚠", style=WARN)
        rows.append([Text(str(layer.index)), Text(shown(layer.name)), Text(f"{layer.in_dim}{'*' if layer.pooled else ''}"),
                     *(_cell(getattr(layer, c), p.get(c, True), near=c in near) for c in ("nrc1", "nrc2", "nrc3")),
                     nrc4, _cell(layer.noise_alignment, p.get("noise_alignment", True), ".2f", "noise_alignment" in near),
                     _bound(layer), verdict])  # fmt: skip
    headers = [("#", "right"), ("layer", "left"), ("h", "right"), ("NRC1", "right"), ("NRC2", "right"),
               ("NRC3", "right"), ("NRC4 (×MSE)", "right"), ("noise", "right"), ("bound", "right"), ("verdict", "left")]
    for i, (header, justify) in enumerate(headers):
        # every column but the layer name keeps its full width; long names wrap instead of numbers being cut
        width = max([len(header)] + [r[i].cell_len for r in rows]) if header != "layer" else None
        table.add_column(header, justify=justify, min_width=width, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


def summary_panel(report: Report) -> Panel:
    s, st, d = report.summary, report.settings, report.data
    onset = s.collapse_onset
    onset_text = "none (the last layer is not collapsed)" if onset is None else \
        f"layer {onset} ({shown(report.layers[onset].name)}): the top {s.num_layers - onset} of {s.num_layers} layers collapsed"
    g = s.gate
    if g.require_collapsed == 0:
        gate_text = Text("disabled (--require-collapsed 0)", style="dim")
    elif g.passed:
        gate_text = Text(f"PASSED: the last {g.require_collapsed} layer(s) are collapsed", style="bold green")
    else:
        gate_text = Text(f"FAILED: layer(s) {g.failing_layers} of the last {g.require_collapsed} not collapsed",
                         style="bold red")  # fmt: skip
    lines = [
        Text(f"samples N = {d['num_samples']}   target dim t = {report.target.dim}   rank k = {st['rank']} "
             f"({st['rank_source']}; target rank estimate {report.target.rank_estimate})"),
        Text(f"model MSE = {_num(report.model_mse, '.4g')}   device = {st['device']}"),
        Text(f"collapse onset: {onset_text}"),
        Text.assemble("gate: ", gate_text),
    ]
    for assumption in report.model.get("assumptions", []):
        lines.append(Text(f"note: {shown(assumption, 2000)}", style="dim"))
    for w in report.warnings:
        lines.append(Text(f"warning: {w}", style="bold yellow"))
    for layer in report.layers:
        for w in layer.warnings:
            lines.append(Text(f"warning: layer {layer.index} ({shown(layer.name)}): {shown(w, 2000)}", style=WARN))
    return Panel(Group(*lines), title="summary", expand=False)


def print_report(report: Report, console: Console) -> None:
    console.print(layer_table(report))
    console.print(summary_panel(report))
