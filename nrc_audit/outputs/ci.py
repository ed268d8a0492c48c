"""CI formats, as ruff and mypy offer them: GitHub workflow commands (``--format github``) and JUnit XML
(``--junit-xml``). Presentation only: everything comes from the report and the baseline comparison.

GitHub: one ``::error`` per layer that fails the gate and per baseline regression, one ``::warning`` per
report-level warning (the audit may not be well posed) and per layer warning, each titled with the layer and
the condition (workflow commands: https://docs.github.com/actions/reference/workflow-commands-for-github-actions).
JUnit: one testsuite named after the model, one testcase per audited layer; a layer that fails the gate is
a failure; a layer that is not collapsed but lies outside the gate passes, with the finding in system-out.
Report-level warnings are suite properties (``nrc-audit.warning``) and lines of the suite's system-out: they
inform and never fail a test, as they never change the exit code.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from nrc_audit.core.verdicts import TABLE
from nrc_audit.outputs.baseline import Regression
from nrc_audit.outputs.records import LayerReport, ReportData as Report

WARNING_PROPERTY = "nrc-audit.warning"  # JUnit suite property holding one report-level warning


def failed_conditions(layer: LayerReport, thresholds: dict[str, float]) -> list[tuple[str, str]]:
    """[(condition, 'NRC1 noise 0.41, needs ≤ 0.25'), …] for every condition the layer fails."""
    out = []
    for c in TABLE:
        if layer.passed.get(c.name, c.threshold not in thresholds):  # a report of an earlier version lacks the fifth
            continue
        value = getattr(layer, c.field)
        shown = "undefined" if value is None else f"{value:.4g}"
        out.append((c.name.upper(), f"{c.label} {shown}, needs {c.op} {thresholds[c.threshold]}"))
    return out


def _escape(text: str, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def _command(kind: str, title: str, message: str) -> str:
    return f"::{kind} title={_escape(title, prop=True)}::{_escape(message)}"


def github_annotations(report: Report, regressions: Sequence[Regression] = ()) -> list[str]:
    """The workflow-command lines ``--format github`` prints on stdout, ending with a ``::notice`` summary."""
    th = report.settings["thresholds"]
    by_index = {layer.index: layer for layer in report.layers}
    lines = []
    for index in report.summary.gate.failing_layers:
        layer = by_index[index]
        failed = failed_conditions(layer, th)
        names = " ".join(c for c, _ in failed) or "collapse"
        lines.append(_command("error", f"nrc-audit gate: layer {index} {layer.name} fails {names}",
                              f"layer {index} ({layer.name}) is not collapsed: " + "; ".join(t for _, t in failed)))
    for r in regressions:
        where = "model" if r.layer is None else f"layer {r.layer} {r.name}"
        conditions = " ".join(c.upper() for c in r.conditions)
        lines.append(_command("error", f"nrc-audit baseline: {where} {conditions or 'collapse onset'}",
                              f"regression against the baseline: {where}: {r.what}"))
    for w in report.warnings:
        lines.append(_command("warning", "nrc-audit: audit", w))
    for layer in report.layers:
        for w in layer.warnings:
            lines.append(_command("warning", f"nrc-audit: layer {layer.index} {layer.name}", w))
    s = report.summary
    gate = "disabled" if s.gate.require_collapsed == 0 else "passed" if s.gate.passed else "FAILED"
    lines.append(_command("notice", "nrc-audit", f"gate {gate}; collapse onset {s.collapse_onset}; "
                          f"{len(s.collapsed_layers)}/{s.num_layers} layers collapsed; "
                          f"{len(regressions)} baseline regression(s)"))  # fmt: skip
    return lines


def github_failure(message: str) -> str:
    """The annotation printed when the audit could not run (exit 2)."""
    return _command("error", "nrc-audit could not run", message)


def _suite(name: str, tests: int, failures: int, errors: int = 0) -> tuple[ET.Element, ET.Element]:
    root = ET.Element("testsuites", name="nrc-audit", tests=str(tests), failures=str(failures), errors=str(errors))
    suite = ET.SubElement(root, "testsuite", name=name, tests=str(tests), failures=str(failures),
                          errors=str(errors), skipped="0")  # fmt: skip
    return root, suite


def _text(root: ET.Element) -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def junit_xml(report: Report, regressions: Sequence[Regression] = (), name: str | None = None) -> str:
    """JUnit XML: one testcase per layer (gate failures are failures), plus one for the baseline if compared."""
    th = report.settings["thresholds"]
    model = name or Path(report.model["path"]).stem
    failing = set(report.summary.gate.failing_layers)
    compared = "baseline" in report.extensions
    tests = len(report.layers) + compared
    root, suite = _suite(model, tests, len(failing) + bool(regressions))
    if report.warnings:
        props = ET.SubElement(suite, "properties")
        for w in report.warnings:
            ET.SubElement(props, "property", name=WARNING_PROPERTY, value=w)
    for layer in report.layers:
        case = ET.SubElement(suite, "testcase", classname=f"nrc-audit.{model}", name=f"layer {layer.index}: {layer.name}")
        failed = failed_conditions(layer, th)
        if layer.index in failing:
            ET.SubElement(case, "failure", type="gate", message=f"not collapsed: {'; '.join(t for _, t in failed)}")
        out = [] if layer.collapsed else [f"not collapsed: {'; '.join(t for _, t in failed)}"
                                          + ("" if layer.index in failing else " (outside the gate)")]  # fmt: skip
        out += [f"warning: {w}" for w in layer.warnings]
        if out:
            ET.SubElement(case, "system-out").text = "\n".join(out)
    if compared:
        case = ET.SubElement(suite, "testcase", classname=f"nrc-audit.{model}", name="baseline comparison")
        if regressions:
            ET.SubElement(case, "failure", type="baseline", message=f"{len(regressions)} regression(s)").text = \
                "\n".join(f"{'model' if r.layer is None else f'layer {r.layer} ({r.name})'}: {r.what}" for r in regressions)
    if report.warnings:
        ET.SubElement(suite, "system-out").text = "\n".join(f"warning: {w}" for w in report.warnings)
    return _text(root)


def junit_failure(message: str, name: str) -> str:
    """JUnit XML for an audit that could not run (exit 2): one testcase in error."""
    root, suite = _suite(name, 1, 0, errors=1)
    case = ET.SubElement(suite, "testcase", classname=f"nrc-audit.{name}", name="audit")
    ET.SubElement(case, "error", type="could-not-run", message=message.splitlines()[0] if message else "")
    ET.SubElement(case, "system-out").text = message
    return _text(root)
