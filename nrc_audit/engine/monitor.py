"""Watch collapse appear during training (the paper's Figure 5) without saving a checkpoint per epoch.

The monitor audits the model on a fixed evaluation set at chosen epochs (one pass, same code as the
CLI) and writes each report to a ``nrc-audit-history/1`` JSON-lines file (outputs/history.py, the format the
Lightning and transformers callbacks write too); ``nrc-audit trend FILE.jsonl`` renders it.
Outside the evaluation pass it costs nothing: no hooks stay registered, the model's mode and device
are restored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

from torch import nn

from nrc_audit.engine.api import audit
from nrc_audit.errors import OptionsError
from nrc_audit.outputs.report import Report
from nrc_audit.outputs.history import HistoryWriter
from nrc_audit.outputs.trend import load_history, trend_tables


class CollapseMonitor:
    """Audit ``model`` every ``every`` epochs on ``batches`` and write the report to ``history``.

    Args:
        batches: a re-iterable of ``(x, y)`` batches (a ``DataLoader`` or a list), iterated once per audit.
        history: JSON-lines file, one ``nrc-audit-history/1`` record per audit (epoch, run id, full report).
        every: audit when ``epoch % every == 0``.
        if_exists: when ``history`` already holds records: "refuse" (OptionsError, the default), "overwrite"
            or "resume" (see :class:`nrc_audit.outputs.history.HistoryWriter`).
        **audit_kwargs: forwarded to :func:`nrc_audit.audit` (rank, thresholds, layers, …).

    Example:
        >>> monitor = CollapseMonitor(eval_loader, "nrc-history.jsonl", every=10)   # doctest: +SKIP
        >>> for epoch in range(epochs):                                           # doctest: +SKIP
        ...     train_one_epoch(model)
        ...     monitor(model, epoch)
    """

    def __init__(self, batches: Iterable, history: str | Path, *, every: int = 1, if_exists: str = "refuse",
                 **audit_kwargs: Any) -> None:  # fmt: skip
        if isinstance(batches, Iterator):
            raise OptionsError("CollapseMonitor needs re-iterable batches (a DataLoader or a list), not an iterator.")
        if every < 1:
            raise OptionsError(f"every={every} must be ≥ 1.")
        self.batches, self.history_path, self.every = batches, Path(history), every
        self.writer = HistoryWriter(self.history_path, "monitor", if_exists)
        self.audit_kwargs = {"require_collapsed": 0} | audit_kwargs

    def __call__(self, model: nn.Module, epoch: int) -> Report | None:
        """Audit now if ``epoch`` is due; returns the report (None when skipped)."""
        if epoch % self.every:
            return None
        report = audit(model, self.batches, **self.audit_kwargs)
        self.writer.append(report, epoch=epoch)
        return report

    def history(self) -> tuple[list[str], list[Report]]:
        """This run's labels and reports, in epoch order."""
        labels, reports, _ = load_history(self.history_path, self.writer.run_id)
        return labels, reports

    def tables(self, require_collapsed: int = 1) -> list:
        """Rich tables of every condition per layer against epoch (same as ``nrc-audit trend``); the gate
        column asks that the last ``require_collapsed`` layers be collapsed at each epoch."""
        return trend_tables(*self.history(), require_collapsed)

    def plot(self, path: str | Path) -> Path:
        from nrc_audit.outputs.plot import plot_trend

        return plot_trend(*self.history(), Path(path))
