"""The Python API and the training monitor share the CLI's pass and report code (no second implementation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import nrc_audit
from conftest import make_mlp, make_xy
from nrc_audit.cli.app import audit_app
from nrc_audit.errors import DatasetError, OptionsError
from nrc_audit.engine.monitor import CollapseMonitor
from nrc_audit.outputs.report import METRIC_FIELDS


def layer_values(doc: dict) -> np.ndarray:
    return np.array([[np.nan if layer[f] is None else layer[f] for f in METRIC_FIELDS] for layer in doc["layers"]])


@pytest.mark.parametrize("kind", ["dataloader", "list"])
def test_audit_in_memory_equals_the_cli_on_the_saved_model(mlp_case, kind):
    x, y = torch.from_numpy(mlp_case["x"]), torch.from_numpy(mlp_case["y"])
    if kind == "dataloader":
        batches = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    else:
        batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    report = nrc_audit.audit(mlp_case["model"], batches, require_collapsed=0)
    cli = CliRunner().invoke(audit_app, [str(mlp_case["ckpt"]), str(mlp_case["data"]), "--no-features",
                                         "--format", "json", "--batch-size", "64", "--require-collapsed", "0"])  # fmt: skip
    assert cli.exit_code == 0, cli.stderr
    doc = json.loads(cli.stdout)
    np.testing.assert_allclose(layer_values(report.to_dict()), layer_values(doc), rtol=1e-12, atol=1e-14)
    assert report.model_mse == pytest.approx(doc["model_mse"], rel=1e-12)
    assert report.target.eigenvalues == pytest.approx(doc["target"]["eigenvalues"], rel=1e-12)
    assert [layer.name for layer in report.layers] == [layer["name"] for layer in doc["layers"]]
    assert report.layers[1].nrc3 == pytest.approx(doc["layers"][1]["nrc3"], rel=1e-12)
    assert report.summary.collapse_onset == doc["summary"]["collapse_onset"]


def test_audit_leaves_mode_and_device_and_raises_package_errors(mlp_case):
    model = mlp_case["model"].train()
    x, y = torch.from_numpy(mlp_case["x"]), torch.from_numpy(mlp_case["y"])
    nrc_audit.audit(model, [(x, y)], require_collapsed=0)
    assert model.training and next(model.parameters()).device.type == "cpu"
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())
    bad = y.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(DatasetError, match="y has NaN or Inf at row 5"):
        nrc_audit.audit(model, [(x, bad)])
    assert model.training  # restored after a failure too
    with pytest.raises(DatasetError, match="no batches"):
        nrc_audit.audit(model, [])
    with pytest.raises(OptionsError, match="--rank 0"):
        nrc_audit.audit(model, [(x, y)], rank=0)


def test_report_to_table_renders(mlp_case):
    from rich.console import Console

    x, y = torch.from_numpy(mlp_case["x"]), torch.from_numpy(mlp_case["y"])
    report = nrc_audit.audit(mlp_case["model"], [(x, y)], require_collapsed=0)
    console = Console(record=True, width=140)
    console.print(report.to_table())
    assert "NRC3" in console.export_text()


def test_monitor_records_each_monitored_epoch_and_restores_the_model(tmp_path):
    x_np, y_np = make_xy(256, 12, 3, seed=4)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = make_mlp([12, 32, 32, 3], seed=5).train()
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    history = tmp_path / "history.jsonl"
    monitor = CollapseMonitor(loader, history, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    audited = []
    for epoch in range(6):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
        report = monitor(model, epoch)
        audited.append(report is not None)
        assert model.training and next(model.parameters()).device.type == "cpu"
    assert audited == [True, False, True, False, True, False]
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["label"] for r in records] == ["epoch 0", "epoch 2", "epoch 4"]
    labels, reports = monitor.history()
    assert len(reports) == 3 and reports[0].model_mse > reports[-1].model_mse  # training made progress
    assert len(monitor.tables()) == 6  # summary + one table per condition (NRC1–NRC4 and the noise condition)


def test_monitor_rejects_one_shot_iterators(tmp_path):
    with pytest.raises(OptionsError, match="re-iterable"):
        CollapseMonitor(iter([]), tmp_path / "h.jsonl")
