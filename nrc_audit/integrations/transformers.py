"""``NRCTrainerCallback``: audit a model trained by the Hugging Face ``Trainer`` for Deep NRC, into its logs.

Needs ``transformers`` (and ``accelerate``, which its Trainer needs); importing this module imports them,
nothing else in nrc-audit does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("nrc_audit.integrations.transformers needs transformers: pip install 'nrc-audit[hf]'.") from None

from nrc_audit.errors import OptionsError
from nrc_audit.integrations.common import Auditor, scalars
from nrc_audit.outputs.report import Report

WHEN = ("epoch", "evaluate")


class NRCTrainerCallback(TrainerCallback):
    """Audit the Trainer's model on a fixed probe set every ``every_n_epochs`` epochs and log the NRC metrics.

    The audit is :func:`nrc_audit.audit` (the CLI's exact statistics and defaults); a ``ModelOutput`` is read
    at ``output_key`` (default ``logits``) and an ``attention_mask`` in the probe batches masks token pooling,
    as on the command line. The scalars (``nrc/<layer>/<metric>``, ``nrc/collapsed_layers``, ``nrc/onset``,
    ``nrc/model_mse``) are logged with ``trainer.log``: they land in ``trainer.state.log_history`` and reach
    every ``report_to`` tracker (whose TensorBoard writer files them under ``train/nrc/…``). A ``TrainerCallback`` is not handed the trainer, so pass ``trainer=``
    (``trainer.add_callback(NRCTrainerCallback(probe, trainer=trainer))``); without it the scalars are put in
    ``state.log_history`` only, and a warning says the trackers miss them.

    Args:
        data: ``(X, Y)`` / ``(X, Y, {"attention_mask": M})`` tensors, a DataLoader (tuple batches, or dict
            batches read at ``x_key``/``y_key``, default ``input_ids``/``labels``), or an HDF5 path.
        every_n_epochs: audit after epochs n, 2n, … (``when="epoch"``) or at every n-th evaluation.
        when: "epoch" (``on_epoch_end``) or "evaluate" (``on_evaluate``).
        history, if_exists, stop_on_collapse, batch_size, x_key, y_key, data_options, **audit_options: as for
            :class:`nrc_audit.integrations.lightning.NRCCallback`; ``stop_on_collapse`` sets
            ``control.should_training_stop``.
        trainer: the ``Trainer`` to log through.
    """

    def __init__(self, data: Any, every_n_epochs: int = 1, *, when: str = "epoch", history: str | Path | None = None,
                 if_exists: str = "refuse", stop_on_collapse: int = 0, batch_size: int | None = None,
                 x_key: str | None = None, y_key: str | None = None, data_options: Any = None, trainer: Any = None,
                 **audit_options: Any) -> None:  # fmt: skip
        self.auditor = Auditor(data, every_n_epochs=every_n_epochs, history=history, if_exists=if_exists,
                               stop_on_collapse=stop_on_collapse, source="transformers", when=when, whens=WHEN,
                               batch_size=batch_size, x_key=x_key, y_key=y_key, data_options=data_options,
                               audit_options=audit_options)  # fmt: skip
        self.when, self.trainer, self._evaluations = when, trainer, 0

    @property
    def last_report(self) -> Report | None:
        """The report of the latest audit (None before the first)."""
        return self.auditor.last

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.when == "epoch" and self.auditor.due(state.epoch or 0):
            return self._audit(state, control, model)
        return control

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.when != "evaluate":
            return control
        self._evaluations += 1
        return self._audit(state, control, model) if self.auditor.due(self._evaluations) else control

    def _audit(self, state: Any, control: Any, model: Any) -> Any:
        if model is None:
            raise OptionsError("the Trainer passed no model to NRCTrainerCallback; add it with trainer.add_callback.")
        report = self.auditor.run(model, epoch=state.epoch, step=state.global_step, is_main=state.is_world_process_zero)
        values = scalars(report)
        if self.trainer is not None:
            pending = control.should_log
            self.trainer.log(values)  # log_history and every report_to tracker (through on_log)
            control.should_log = pending  # on_log clears the flag; the epoch's own loss log must still happen
        else:
            warnings.warn("NRCTrainerCallback has no trainer=: the NRC scalars go to state.log_history only, not "
                          "to the report_to trackers.", stacklevel=2)  # fmt: skip
            state.log_history.append({**values, "epoch": state.epoch, "step": state.global_step})
        if self.auditor.should_stop(report):
            control.should_training_stop = True
        return control
