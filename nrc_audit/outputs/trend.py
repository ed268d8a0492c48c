"""Collapse over training: several reports of one run (checkpoints or monitor epochs) side by side.

Checkpoints are taken in training order as the checkpoints themselves record it (io/training_position.py);
histories are read by outputs/history.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence, TypeVar

from rich.table import Table
from rich.text import Text

from nrc_audit.core.verdicts import TABLE, gate
from nrc_audit.io.files import write_atomic
from nrc_audit.io.training_position import TrainingPosition, training_position
from nrc_audit.outputs.history import load_run
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


def load_history(path: Path, run_id: str | None = None) -> tuple[list[str], list[Report], str]:
    """Labels and reports of one run of a history file, in training order, and that order's key."""
    records, order = load_run(path, run_id)
    return [r.label for r in records], [r.report for r in records], order


def training_order(paths: Sequence[_P]) -> tuple[list[_P], str, list[TrainingPosition]]:
    """The checkpoints in training order, how it was decided, and each one's stored position.

    The step (``global_step``) stored in every checkpoint decides when all have one, else the epoch when all
    have one; otherwise the file names' natural order (:func:`natural_order`). Ties keep the name order.
    """
    named = natural_order(paths)
    positions = {id(p): training_position(Path(str(p))) for p in named}
    for key in ("step", "epoch"):
        if all(getattr(positions[id(p)], key) is not None for p in named):
            ordered = sorted(named, key=lambda p: getattr(positions[id(p)], key))
            return ordered, f"by {key} stored in the checkpoints", [positions[id(p)] for p in ordered]
    return named, "by file name (no step or epoch stored in every checkpoint)", [positions[id(p)] for p in named]


def trend_tables(labels: Sequence[str], reports: Sequence[Report], require_collapsed: int | None = None) -> list[Table]:
    """A summary table (one row per checkpoint) and one table per condition of :data:`TABLE` (layers × checkpoints).

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
    for c in TABLE:
        table = Table(title=c.label)
        table.add_column("#", justify="right")
        table.add_column("layer")
        for label in labels:
            table.add_column(label, justify="right")
        for i, name in enumerate(names):
            cells = []
            for r in reports:
                layer = r.layers[i] if i < len(r.layers) else None
                value = None if layer is None else getattr(layer, c.field)
                ok = layer is not None and layer.passed.get(c.name, False)
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
