"""``NRCCallback``: audit a LightningModule for Deep NRC during training, into the trainer's loggers.

Needs the ``lightning`` extra (``pip install 'nrc-audit[lightning]'``); importing this module imports
``lightning``, nothing else in nrc-audit does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("nrc_audit.integrations.lightning needs Lightning: pip install 'nrc-audit[lightning]'.") from None

from nrc_audit.integrations.common import Auditor, scalars
from nrc_audit.outputs.report import Report

WHEN = ("train", "validation")


class NRCCallback(Callback):
    """Audit the module on a fixed probe set every ``every_n_epochs`` epochs and log the NRC metrics.

    The audit is :func:`nrc_audit.audit` (the CLI's exact float64 statistics and defaults); the module's
    ``training`` flag and device are restored. Scalars go through ``pl_module.log`` — so every logger of the
    trainer (TensorBoard, W&B, MLflow, CSV) and callbacks monitoring them (``EarlyStopping("nrc/onset")``)
    receive them — named ``nrc/<layer>/<metric>`` (nrc1, nrc2, nrc3, nrc4, nrc4_ratio),
    ``nrc/collapsed_layers``, ``nrc/onset`` and ``nrc/model_mse``. Under DDP every rank audits a shard of the
    probe set and the statistics are merged exactly (all ranks log the same values; rank 0 writes ``history``).

    Args:
        data: ``(X, Y)`` tensors (optionally ``(X, Y, {"attention_mask": M})``), a DataLoader, or an HDF5 path.
        every_n_epochs: audit after epochs n, 2n, … (counted from 1).
        when: "train" (at the end of a training epoch) or "validation" (at the end of validation; the
            sanity check is skipped).
        history: ``.jsonl`` file, one ``nrc-audit-history/1`` record per audit (``nrc-audit trend FILE``).
        if_exists: "refuse" (default), "overwrite" or "resume" when ``history`` already holds records.
        stop_on_collapse: set ``trainer.should_stop`` once the last N layers are collapsed (0: never).
        batch_size, x_key, y_key, data_options: how the probe set is batched and read (see ``ProbeSet``).
        **audit_options: rank, thresholds, layers, exclude, require_collapsed, pinv_rtol, rank_energy,
            output_key, token_pooling — as for :func:`nrc_audit.audit` and the CLI.

    Example:
        >>> trainer = L.Trainer(max_epochs=30, callbacks=[NRCCallback((x_probe, y_probe), history="nrc.jsonl")])  # doctest: +SKIP
        >>> trainer.fit(module, train_loader)                                                   # doctest: +SKIP
    """

    def __init__(self, data: Any, every_n_epochs: int = 1, *, when: str = "train", history: str | Path | None = None,
                 if_exists: str = "refuse", stop_on_collapse: int = 0, batch_size: int | None = None,
                 x_key: str | None = None, y_key: str | None = None, data_options: Any = None,
                 **audit_options: Any) -> None:  # fmt: skip
        self.auditor = Auditor(data, every_n_epochs=every_n_epochs, history=history, if_exists=if_exists,
                               stop_on_collapse=stop_on_collapse, source="lightning", when=when, whens=WHEN,
                               batch_size=batch_size, x_key=x_key, y_key=y_key, data_options=data_options,
                               audit_options=audit_options)  # fmt: skip
        self.when = when

    @property
    def last_report(self) -> Report | None:
        """The report of the latest audit (None before the first)."""
        return self.auditor.last

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.when == "train":
            self._audit(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.when == "validation" and not trainer.sanity_checking:
            self._audit(trainer, pl_module)

    def _audit(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1  # epochs completed: the hook runs before the counter moves
        if not self.auditor.due(epoch):
            return
        report = self.auditor.run(pl_module, epoch=epoch, step=trainer.global_step, is_main=trainer.is_global_zero)
        pl_module.log_dict(scalars(report), on_step=False, on_epoch=True)
        if self.auditor.should_stop(report):
            trainer.should_stop = True
