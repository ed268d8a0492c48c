"""Compare a report with an earlier one of the same architecture (``--baseline``).

A regression is any of: the collapse onset moves later (or disappears); a layer collapsed in the baseline
no longer is; a metric worsens beyond the tolerance — NRC1 up, NRC2 or NRC3 down by more than
``tolerance`` (absolute, they live in [0, 1]), NRC4's ratio up by more than ``tolerance`` relative.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nrc_audit.core.verdicts import TABLE
from nrc_audit.errors import OptionsError
from nrc_audit.io.validate import check_report, check_tolerance, parse_json, read_document
from nrc_audit.outputs.report import Report



@dataclass(frozen=True)
class Regression:
    layer: int | None  # None: a model-level regression (the onset)
    name: str
    what: str
    metric: str | None = None  # the metric field that worsened (e.g. "nrc4_ratio"); None: onset or collapse
    failing: tuple[str, ...] = ()  # a layer no longer collapsed: the conditions it now fails

    @property
    def conditions(self) -> tuple[str, ...]:
        """The conditions concerned: the one whose metric worsened (``nrc4`` for ``nrc4_ratio``), or those a
        layer no longer collapsed fails; () for the onset."""
        worsened = tuple(c.name for c in TABLE if c.field == self.metric)
        return worsened or self.failing


def load_baseline(path: Path) -> Report:
    """Read a baseline report (a JSON file written by ``--json``)."""
    text = read_document(path, f"--baseline {path}")
    doc = parse_json(text, f"--baseline {path}")
    if not isinstance(doc, dict) or doc.get("schema") != "nrc-audit-report/1":
        raise OptionsError(f"--baseline {path} is not an nrc-audit-report/1 document (its 'schema' field differs).")
    check_report(doc, f"--baseline {path}")
    try:
        return Report.from_dict(doc)
    except (KeyError, TypeError) as exc:
        raise OptionsError(f"--baseline {path}: the report is incomplete ({exc}).") from None


def compare(report: Report, baseline: Report, tolerance: float) -> list[Regression]:
    """All regressions of ``report`` against ``baseline``; raises OptionsError for another architecture
    or a tolerance that is not a finite number ≥ 0."""
    tolerance = check_tolerance(tolerance)
    now = [(layer.name, layer.in_dim) for layer in report.layers]
    before = [(layer.name, layer.in_dim) for layer in baseline.layers]
    if now != before:
        raise OptionsError(
            f"the baseline audits other layers ({len(before)} layers, e.g. {before[:3]}) than this model "
            f"({len(now)}, e.g. {now[:3]}); --baseline needs a report of the same architecture."
        )
    found: list[Regression] = []
    old_onset, new_onset = baseline.summary.collapse_onset, report.summary.collapse_onset
    if old_onset is not None and (new_onset is None or new_onset > old_onset):
        found.append(Regression(None, "model", f"collapse onset moved from layer {old_onset} to {new_onset}"))
    for old, new in zip(baseline.layers, report.layers):
        if old.collapsed and not new.collapsed:
            failing = tuple(k for k, ok in new.passed.items() if not ok)
            found.append(Regression(new.index, new.name, f"no longer collapsed (fails {', '.join(failing)})",
                                    failing=failing))
        for c in (c for c in TABLE if c.baseline):
            key, sign = c.field, (+1 if c.larger_is_worse else -1)
            a, b = getattr(old, key), getattr(new, key)
            if a is None:
                continue
            if b is None:
                found.append(Regression(new.index, new.name, f"{key} is now undefined (was {a:.4g})", key))
                continue
            allowed = tolerance * abs(a) if c.relative else tolerance
            if sign * (b - a) > allowed:
                found.append(Regression(new.index, new.name, f"{key} worsened from {a:.4g} to {b:.4g}", key))
    return found
