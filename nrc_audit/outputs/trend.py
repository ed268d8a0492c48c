"""Collapse over training: several reports of one run (checkpoints or monitor epochs) side by side.

History files are JSON lines, one ``{"label": str, "report": {...}}`` per audited checkpoint/epoch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence, TypeVar

from rich.table import Table
from rich.text import Text

from nrc_audit.core.verdicts import gate
from nrc_audit.errors import OptionsError
from nrc_audit.io.files import write_atomic
from nrc_audit.io.validate import check_report, parse_json
from nrc_audit.outputs.report import Report

_P = TypeVar("_P")


def natural_key(name: str) -> list:
    """Sort key that reads digit runs as numbers: epoch_2 < epoch_10 (an alphabetical sort says the reverse)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def natural_order(paths: Sequence[_P]) -> list[_P]:
    """The checkpoints in the natural order of their file names (then of their full paths, for ties)."""
    return sorted(paths, key=lambda p: (natural_key(Path(str(p)).name), natural_key(str(p))))


def gate_of(report: Report, require_collapsed: int) -> bool:
    """Whether ``report``'s last ``require_collapsed`` layers are all collapsed (the audit's gate, recomputed)."""
    return gate([layer.collapsed for layer in report.layers], require_collapsed)[0]


TREND_METRICS = (("nrc1", "NRC1 noise"), ("nrc2", "NRC2 CKA"), ("nrc3", "NRC3 alignment"),
                 ("nrc4_ratio", "NRC4 MSE / model MSE"))  # fmt: skip


def append_history(path: Path, label: str, report: Report) -> None:
    """Append one record to a JSON-lines history file."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"label": label, "report": report.to_dict()}, allow_nan=False) + "\n")


def load_history(path: Path) -> tuple[list[str], list[Report]]:
    """Read a history file written by :func:`append_history` (or the training monitor)."""
    labels, reports = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise OptionsError(f"cannot read the history file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_json(line, where)
        if not isinstance(record, dict) or not isinstance(record.get("label"), (str, int, float)):
            raise OptionsError(f"{where}: expected a history record {{\"label\": str, \"report\": {{...}}}}; "
                               f"found {type(record).__name__} without a string 'label'.")  # fmt: skip
        check_report(record.get("report"), f"{where}: report")
        try:
            labels.append(str(record["label"]))
            reports.append(Report.from_dict(record["report"]))
        except (KeyError, TypeError) as exc:
            raise OptionsError(f"{path}:{number} is not a history record ({exc}).") from None
    if not reports:
        raise OptionsError(f"{path} holds no history records.")
    return labels, reports


def trend_tables(labels: Sequence[str], reports: Sequence[Report], require_collapsed: int | None = None) -> list[Table]:
    """A summary table (one row per checkpoint) and one table per condition (layers × checkpoints).

    The gate column applies ``--require-collapsed N`` to each checkpoint on its own (None: each report's own gate).
    """
    summary = Table(title="collapse over training")
    n_text = "" if require_collapsed is None else f" (last {require_collapsed})"
    for col in ("checkpoint", "model MSE", "collapse onset", "collapsed layers", f"gate{n_text}"):
        summary.add_column(col)
    for label, r in zip(labels, reports):
        onset = "—" if r.summary.collapse_onset is None else str(r.summary.collapse_onset)
        ok = r.summary.gate.passed if require_collapsed is None else gate_of(r, require_collapsed)
        verdict = Text("pass", style="green") if ok else Text("fail", style="red")
        summary.add_row(label, f"{r.model_mse:.4g}", onset, f"{len(r.summary.collapsed_layers)}/{r.summary.num_layers}",
                        verdict)  # fmt: skip
    tables = [summary]
    names = [layer.name for layer in reports[-1].layers]
    for key, title in TREND_METRICS:
        table = Table(title=title)
        table.add_column("#", justify="right")
        table.add_column("layer")
        for label in labels:
            table.add_column(label, justify="right")
        for i, name in enumerate(names):
            cells = []
            for r in reports:
                layer = r.layers[i] if i < len(r.layers) else None
                value = None if layer is None else getattr(layer, key)
                ok = layer is not None and layer.passed.get(key.split("_")[0], False)
                cells.append(Text("—" if value is None else f"{value:.3f}", style="green" if ok else "red"))
            table.add_row(str(i), name, *cells)
        tables.append(table)
    return tables


def trend_json(labels: Sequence[str], reports: Sequence[Report]) -> str:
    """The trend document (schema ``nrc-audit-trend/1``): the labels and every report, in training order."""
    doc = {"schema": "nrc-audit-trend/1", "labels": list(labels), "reports": [r.to_dict() for r in reports]}
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_trend_json(path: Path, labels: Sequence[str], reports: Sequence[Report]) -> None:
    write_atomic(path, trend_json(labels, reports))
