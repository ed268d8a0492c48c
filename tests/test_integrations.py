"""Training callbacks: the values a tiny CPU training logs (read back with TensorBoard's own reader and the HF
Trainer's log_history) equal a direct ``nrc_audit.audit`` of the same weights on the same probe set, and
``nrc-audit trend`` on the callback's history reproduces them."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import _tv_ops  # noqa: F401  (before lightning / transformers import torchvision)
import nrc_audit
from conftest import make_xy
from nrc_audit.cli.commands import trend_app
from nrc_audit.config import Thresholds
from nrc_audit.errors import OptionsError
from nrc_audit.integrations.common import scalars

L = pytest.importorskip("lightning")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

runner = CliRunner()
BATCH = 64


def _probe():
    x, y = map(torch.from_numpy, make_xy(256, 6, 2, seed=11, rank=1))
    return x, y


def _direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: dict | None = None) -> nrc_audit.Report:
    """The reference: the public API on the same rows in the same batches."""
    batches = [(x[a:a + BATCH], y[a:a + BATCH], {k: v[a:a + BATCH] for k, v in (extra or {}).items()})
               for a in range(0, len(x), BATCH)]  # fmt: skip
    return nrc_audit.audit(model, batches)


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)


class _Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


class _Snapshots(L.Callback):
    """Keeps the weights each audit saw (runs after NRCCallback) and checks the module is back in train mode."""

    def __init__(self) -> None:
        self.weights: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        assert pl_module.training
        self.weights.append(copy.deepcopy(pl_module.state_dict()))


def test_lightning_callback_logs_what_a_direct_audit_finds(tmp_path, one_torch_thread):
    from torch.utils.data import DataLoader, TensorDataset

    from nrc_audit.integrations.lightning import NRCCallback

    x, y = _probe()
    history = tmp_path / "nrc.jsonl"
    nrc, snaps = NRCCallback((x, y), history=history, batch_size=BATCH), _Snapshots()
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=logger, callbacks=[nrc, snaps],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = _Regressor()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"nrc/net.0/nrc1", "nrc/net.4/nrc3", "nrc/collapsed_layers", "nrc/model_mse"} <= tags
    references = []
    for epoch, weights in enumerate(snaps.weights):
        model = _Regressor()
        model.load_state_dict(weights)
        references.append(_direct(model, x, y))
        for tag, value in scalars(references[-1]).items():  # TensorBoard stores float32 scalars
            assert _close(events.Scalars(tag)[epoch].value, value, 1e-6), (epoch, tag)
        assert set(scalars(references[-1])) - {"nrc/onset"} <= tags
    assert len(snaps.weights) == 3 and len(events.Scalars("nrc/net.2/nrc2")) == 3

    # the history holds the full reports; trend renders them and its JSON carries the same numbers
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(r["epoch"], r["source"]) for r in records] == [(1, "lightning"), (2, "lightning"), (3, "lightning")]
    out = tmp_path / "trend.json"
    result = runner.invoke(trend_app, [str(history), "--require-collapsed", "0", "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "order (by step): epoch 1, epoch 2, epoch 3" in result.stderr
    for doc, ref in zip(json.loads(out.read_text())["reports"], references):
        for layer, expected in zip(doc["layers"], ref.layers):
            for m in ("nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio"):
                assert _close(layer[m], getattr(expected, m), 1e-12), (layer["name"], m)


def test_lightning_callback_stops_training_once_collapsed_and_refuses_an_old_history(tmp_path, one_torch_thread):
    from torch.utils.data import DataLoader, TensorDataset

    from nrc_audit.integrations.lightning import NRCCallback

    x, y = _probe()
    history = tmp_path / "nrc.jsonl"
    history.write_text("")  # an empty file holds no earlier run
    nrc = NRCCallback((x, y), history=history, batch_size=BATCH, stop_on_collapse=1,
                      thresholds=Thresholds(0.99, 0.0, 0.0, 1e9, 1.0))  # the last layer always passes
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, callbacks=[nrc], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_Regressor(), DataLoader(TensorDataset(x, y), batch_size=64))
    assert trainer.current_epoch == 1 and nrc.last_report.layers[-1].collapsed  # stopped after the first epoch
    with pytest.raises(OptionsError, match="already holds 1 audit record"):
        NRCCallback((x, y), history=history)
    with pytest.raises(OptionsError, match=r"unknown audit option\(s\) \['nrc3'\]"):
        NRCCallback((x, y), nrc3=0.5)
    with pytest.raises(OptionsError, match="outside \\[0, 1\\]"):
        NRCCallback((x, y), thresholds=Thresholds(nrc3_min=7.0))
