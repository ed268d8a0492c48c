"""Model-card markdown: the section a card (or a CI job summary) carries; the Hub model-index is in model_card.py.

Presentation only: everything comes from the report; nothing is computed here but formatting.
"""

from __future__ import annotations

from pathlib import Path

from nrc_audit.core.verdicts import PAPER, TABLE
from nrc_audit.config import NEAR_MARGIN
from nrc_audit.outputs.records import LayerReport, ReportData as Report, md_code, shown
from nrc_audit.outputs.render import near_conditions, rules

HOW_TO_READ = (
    "How to read this: each row is a Linear/Conv2d layer and its *input* features H on the audited data. "
    "NRC1 is the share of feature variance outside the top-k principal subspace (small is collapsed); NRC2 is "
    "linear CKA between H and the targets (large is collapsed); NRC3 is the mean cosine of the principal angles "
    "between that subspace and the layer weight's top-k input subspace (near 1 is collapsed); NRC4 is the MSE "
    "of the best linear probe from H to the targets, shown as a multiple of the model's own MSE (near 1× is "
    "collapsed); noise align is the mean singular value of U_⊥ᵀV_k, how much the weight's top-k input subspace "
    "reads the features' noise subspace (small is collapsed). A layer is collapsed when all five pass; the collapse onset is the first layer of the run of "
    "collapsed layers that ends at the output (Rangamani & Unal, *Deep Neural Regression Collapse*, 2026). "
    "The bound column checks the paper's Proposition 1 (‖(I−P_Y)H‖/‖H‖ ≤ √NRC1 + √(1−NRC2)); a failure there is "
    "a finding about anisotropic spectra, not an error."
)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _mark(text: str, ok: bool, near: bool = False) -> str:
    text = text + " ≈" if near else text
    return text if ok else f"**{text}**"


def _row(layer: LayerReport, thresholds: dict[str, float]) -> str:
    p, b, near = layer.passed, layer.bound, near_conditions(layer, thresholds)
    bound = "—" if b.get("lhs") is None else f"{b['lhs']:.3f} {'≤' if b['holds'] else '>'} {b['rhs']:.3f}"
    nrc4 = f"{_fmt(layer.nrc4, '.3g')} ({_fmt(layer.nrc4_ratio, '.2f')}×)"
    cells = [str(layer.index), md_code(layer.name), layer.kind, str(layer.in_dim),
             *(_mark(_fmt(getattr(layer, c)), p.get(c, True), c in near) for c in ("nrc1", "nrc2", "nrc3")),
             _mark(nrc4, p["nrc4"], "nrc4" in near),
             _mark(_fmt(layer.noise_alignment), p.get("noise_alignment", True), "noise_alignment" in near),
             bound, "✅" if layer.collapsed else "❌"]  # fmt: skip
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _verdict(report: Report) -> str:
    s = report.summary
    names = {layer.index: layer.name for layer in report.layers}
    if s.collapse_onset is None:
        onset = "no collapse onset (the last layer is not collapsed)"
    else:
        onset = (f"collapse onset at layer {s.collapse_onset} ({md_code(names[s.collapse_onset])}): the top "
                 f"{s.num_layers - s.collapse_onset} of {s.num_layers} layers are collapsed")  # fmt: skip
    g = s.gate
    if g.require_collapsed == 0:
        return f"**Gate disabled.** {onset[0].upper() + onset[1:]}."
    if g.passed:
        return f"**Gate passed**: the last {g.require_collapsed} layer(s) are collapsed; {onset}."
    failing = ", ".join(f"{i} ({md_code(names[i])})" for i in g.failing_layers)
    return f"**Gate FAILED**: failing layer(s) {failing} among the last {g.require_collapsed}; {onset}."


def _warnings(report: Report) -> list[str]:
    """Report-level warnings as a quote block under the verdict: a card reader must see them with it."""
    lines: list[str] = []
    for w in report.warnings:
        if lines:
            lines.append(">")
        lines.append(f"> **Warning:** {w}")
    return lines + [""] if lines else []


def to_markdown(report: Report) -> str:
    """A self-contained model-card section (also fit for a CI job summary)."""
    m, d, st = report.model, report.data, report.settings
    th = st["thresholds"]
    lines = [
        "## Deep Neural Regression Collapse audit",
        "",
        f"Audited with nrc-audit {report.tool['version']}: model {md_code(Path(m['path']).name)} ({shown(m['architecture'])}, "
        f"{m['num_parameters']:,} parameters, sha256 `{m['sha256'][:12]}…`) on {d['num_samples']:,} samples of "
        f"{md_code(Path(d['path']).name)} (sha256 `{d['sha256'][:12]}…`), target dim t = {report.target.dim}, "
        f"rank k = {st['rank']} ({st['rank_source']}), model MSE {_fmt(report.model_mse, '.4g')}.",
        "",
        _verdict(report),
        "",
        *_warnings(report),
        "| # | layer | kind | h | NRC1 noise | NRC2 CKA | NRC3 align | NRC4 MSE (×model) | noise align | "
        "bound lhs vs rhs | collapsed |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|:---:|",
        *(_row(layer, th) for layer in report.layers),
        "",
        f"Thresholds: {', '.join(rules(th))}; failing values in **bold**; ≈: within {NEAR_MARGIN:g} of the "
        f"threshold ({', '.join(f'{c.column}: within {NEAR_MARGIN:.0%}' for c in TABLE if c.relative)}), a verdict "
        "that could flip.",
    ]
    notes = list(m.get("assumptions", [])) + [f"layer {layer.index} ({md_code(layer.name)}): {w}"
                                              for layer in report.layers for w in layer.warnings]  # fmt: skip
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    lines += ["", HOW_TO_READ, ""]
    return "\n".join(lines)


def headline_metrics(report: Report) -> list[dict]:
    """The figures a model card carries: onset, collapsed count and the last layer's conditions."""
    last = report.layers[-1]
    metrics: list[dict] = [
        {"type": "nrc_collapse_onset", "name": "Deep NRC collapse onset (layer index)", "value": report.summary.collapse_onset},
        {"type": "nrc_collapsed_layers", "name": "Collapsed layers", "value": len(report.summary.collapsed_layers)},
        {"type": "nrc_gate_passed", "name": "nrc-audit gate passed", "value": report.summary.gate.passed},
        {"type": "model_mse", "name": "Model MSE on audited data", "value": report.model_mse},
        # the count travels in the card's metadata; the warnings themselves are in the body (to_markdown)
        {"type": "nrc_report_warnings", "name": "nrc-audit report-level warnings", "value": len(report.warnings)},
    ]  # fmt: skip
    # the paper's four conditions are the card's headline metrics; the noise condition is in the card's table
    for c in PAPER:
        metrics.append({"type": f"{c.field}_last_layer", "name": f"{c.label} (last layer)", "value": getattr(last, c.field)})
    return metrics


def failure_markdown(message: str) -> str:
    """The section written when the audit could not run (exit 2): what went wrong, and that nothing was measured."""
    return "\n".join([
        "## Deep Neural Regression Collapse audit",
        "",
        "**The audit could not run** (nrc-audit exit code 2); no metrics were computed and no gate was applied.",
        "",
        "```text",
        message.replace("```", "` ` `"),
        "```",
        "",
    ])  # fmt: skip
