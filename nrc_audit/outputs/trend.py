"""Collapse over training: several reports of one run (checkpoints or monitor epochs) side by side.

History files are JSON lines, one ``{"label": str, "report": {...}}`` per audited checkpoint/epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.table import Table
from rich.text import Text

from nrc_audit.errors import OptionsError
from nrc_audit.io.files import write_atomic
from nrc_audit.io.validate import check_report, parse_json
from nrc_audit.outputs.report import Report

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


def trend_tables(labels: Sequence[str], reports: Sequence[Report]) -> list[Table]:
    """A summary table (one row per checkpoint) and one table per condition (layers × checkpoints)."""
    summary = Table(title="collapse over training")
    for col in ("checkpoint", "model MSE", "collapse onset", "collapsed layers", "gate"):
        summary.add_column(col)
    for label, r in zip(labels, reports):
        onset = "—" if r.summary.collapse_onset is None else str(r.summary.collapse_onset)
        gate = Text("pass", style="green") if r.summary.gate.passed else Text("fail", style="red")
        summary.add_row(label, f"{r.model_mse:.4g}", onset, f"{len(r.summary.collapsed_layers)}/{r.summary.num_layers}", gate)
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


def write_trend_json(path: Path, labels: Sequence[str], reports: Sequence[Report]) -> None:
    doc = {"schema": "nrc-audit-trend/1", "labels": list(labels), "reports": [r.to_dict() for r in reports]}
    write_atomic(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
