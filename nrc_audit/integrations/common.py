"""What the Lightning and transformers callbacks share: when to audit, the audit itself (exact across DDP
ranks), the scalars they log, the history they write and the collapse stop.

Every audit is :func:`nrc_audit.audit` (the CLI's pass and report code) with the CLI's defaults; the
callbacks only decide when, on which rows, and where the numbers go.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from nrc_audit.config import AnalysisOptions, Thresholds
from nrc_audit.engine import distributed
from nrc_audit.engine.api import audit
from nrc_audit.errors import OptionsError
from nrc_audit.integrations.probe import ProbeSet
from nrc_audit.outputs.history import HistoryWriter
from nrc_audit.outputs.report import Report
from nrc_audit.outputs.trend import gate_of

PREFIX = "nrc"
LAYER_METRICS = ("nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio")
# audit() options a callback forwards; model, batches, device and across_ranks are the callback's own
AUDIT_OPTIONS = tuple(n for n in inspect.signature(audit).parameters
                      if n not in ("model", "batches", "device", "across_ranks"))  # fmt: skip


def scalars(report: Report) -> dict[str, float]:
    """The logged numbers: ``nrc/<layer>/<metric>`` per layer, ``nrc/collapsed_layers``, ``nrc/onset`` (the
    collapse onset's layer index, left out when no run of collapsed layers reaches the last layer) and
    ``nrc/model_mse``. Undefined metrics (null in the report) are left out rather than logged as a number."""
    out = {f"{PREFIX}/{layer.name}/{m}": float(getattr(layer, m)) for layer in report.layers for m in LAYER_METRICS
           if getattr(layer, m) is not None}  # fmt: skip
    out[f"{PREFIX}/collapsed_layers"] = float(len(report.summary.collapsed_layers))
    if report.summary.collapse_onset is not None:
        out[f"{PREFIX}/onset"] = float(report.summary.collapse_onset)
    if report.model_mse is not None:
        out[f"{PREFIX}/model_mse"] = float(report.model_mse)
    return out


class Auditor:
    """The callbacks' shared state: the probe set, the audit options, the schedule and the history.

    Args:
        data: the probe set (see :class:`ProbeSet`).
        every_n_epochs: audit after epochs n, 2n, … (epochs counted from 1, as completed).
        history: a ``.jsonl`` file (``nrc-audit-history/1``) written on rank 0, or None.
        if_exists: "refuse" | "overwrite" | "resume" when ``history`` already holds records.
        stop_on_collapse: stop training once the last N layers are collapsed (0: never).
        source: who writes the history ("lightning", "transformers").
        when, whens: the callback's hook choice and the ones it offers (checked here, before training).
        batch_size, x_key, y_key, data_options: how :class:`ProbeSet` batches and reads ``data``.
        audit_options: forwarded to :func:`nrc_audit.audit` (rank, thresholds, layers, exclude, …).
    """

    def __init__(self, data: Any, *, every_n_epochs: int, history: str | Path | None, if_exists: str,
                 stop_on_collapse: int, source: str, when: str, whens: tuple[str, ...], batch_size: int | None,
                 x_key: str | None, y_key: str | None, data_options: Any,
                 audit_options: dict[str, Any]) -> None:  # fmt: skip
        if when not in whens:
            raise OptionsError(f"when={when!r}: expected one of {list(whens)}.")
        unknown = sorted(set(audit_options) - set(AUDIT_OPTIONS))
        if unknown:
            raise OptionsError(f"unknown audit option(s) {unknown}; the callback takes {list(AUDIT_OPTIONS)}.")
        if every_n_epochs < 1 or stop_on_collapse < 0:
            raise OptionsError(f"every_n_epochs={every_n_epochs} must be ≥ 1 and stop_on_collapse="
                               f"{stop_on_collapse} ≥ 0 (0: never stop).")  # fmt: skip
        AnalysisOptions(audit_options.get("rank"), audit_options.get("pinv_rtol", AnalysisOptions.pinv_rtol),
                        audit_options.get("rank_energy", AnalysisOptions.rank_energy),
                        audit_options.get("require_collapsed", AnalysisOptions.require_collapsed),
                        audit_options.get("thresholds") or Thresholds()).validate()  # fail before training
        probe: dict[str, Any] = {"x_key": x_key, "y_key": y_key, "data_options": data_options}
        if batch_size is not None:  # else ProbeSet's own default
            probe["batch_size"] = batch_size
        self.probe = ProbeSet(data, **probe)
        self.every_n_epochs, self.stop_on_collapse, self.options = every_n_epochs, stop_on_collapse, audit_options
        self.writer = None if history is None else HistoryWriter(history, source, if_exists)
        self.last: Report | None = None

    def due(self, epoch: float) -> bool:
        return round(epoch) >= 1 and round(epoch) % self.every_n_epochs == 0

    def run(self, model: nn.Module, *, epoch: float | None, step: int | None, is_main: bool) -> Report:
        """Audit ``model`` on the probe set (every rank its shard, merged exactly), write the history on the
        main process, and return the report (the same on every rank)."""
        group = distributed.joined_group()
        report = audit(model, self.probe.batches(group), across_ranks=True, **self.options)
        if is_main and self.writer is not None:
            self.writer.append(report, epoch=epoch, step=step)
        self.last = report
        return report

    def should_stop(self, report: Report) -> bool:
        return bool(self.stop_on_collapse) and gate_of(report, self.stop_on_collapse)
