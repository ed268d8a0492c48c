"""The shipped sample checkpoints: verdicts as documented, and every SPEC §4 field against the dense reference."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SAMPLES
from fixtures_models import assert_layers_match, capture, default_names
from nrc_audit.cli.app import audit_app
from nrc_audit.config import AnalysisOptions, AuditConfig, DataOptions, ModelOptions
from nrc_audit.models.architecture import resolve_model
from nrc_audit.io.checkpoint import load_checkpoint
from nrc_audit.engine.run import run_audit

runner = CliRunner()


def audit_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(audit_app, [*args, "--no-features", "--no-progress", "--format", "json"])
    return result.exit_code, json.loads(result.stdout)


def test_weight_decay_sample_passes_and_no_weight_decay_sample_fails_the_gate():
    data = str(SAMPLES / "data.h5")
    code, wd = audit_json(str(SAMPLES / "mlp_wd.safetensors"), data, "--require-collapsed", "1")
    assert code == 0 and wd["summary"]["gate"]["passed"]
    assert wd["summary"]["collapse_onset"] is not None and wd["layers"][-1]["collapsed"]
    code, nowd = audit_json(str(SAMPLES / "mlp_nowd.safetensors"), data, "--require-collapsed", "1")
    assert code == 1 and nowd["summary"]["gate"]["failing_layers"] == [nowd["summary"]["num_layers"] - 1]
    # the paper's weight-decay finding: without weight decay the feature–weight alignment (NRC3) fails
    assert not nowd["layers"][-1]["passed"]["nrc3"] and wd["layers"][-1]["passed"]["nrc3"]
    hidden = slice(1, -1)
    assert max(l["stable_rank_w"] for l in wd["layers"][hidden]) < min(l["stable_rank_w"] for l in nowd["layers"][hidden])
    assert runner.invoke(audit_app, [str(SAMPLES / "mlp_nowd.safetensors"), data, "--no-features", "--exit-zero"]).exit_code == 0


def _dense_check(model_file: str, data_file: str, data_opts: DataOptions, scale: float = 1.0) -> int:
    ckpt = load_checkpoint(SAMPLES / model_file)
    model = resolve_model(ckpt, ModelOptions()).module
    with h5py.File(SAMPLES / data_file, "r") as fh:
        x_raw, y = fh["X"][...], fh["Y"][...].astype(np.float64)
    x = torch.from_numpy(x_raw).to(torch.float32) / scale
    names, feats, weights, out = capture(model, x)  # our own hooks, one full-batch float32 forward
    report = run_audit(AuditConfig(SAMPLES / model_file, SAMPLES / data_file, data=data_opts,
                                   analysis=AnalysisOptions(require_collapsed=0), batch_size=len(x), progress=False))  # fmt: skip
    assert report.model_mse == pytest.approx(float(((out - y.reshape(len(y), -1)) ** 2).mean()), rel=1e-9)
    return assert_layers_match(report.layers, default_names(names), feats, weights, y, out)  # downsample convs excluded


@pytest.mark.parametrize("model_file", ["mlp_wd.safetensors", "mlp_nowd.safetensors"])
def test_sample_mlps_match_the_dense_reference(model_file):
    compared = _dense_check(model_file, "data.h5", DataOptions())
    assert compared >= 4  # NRC3/noise_alignment compared on most layers (eigengap rule)


def test_sample_resnet_matches_the_dense_reference():
    compared = _dense_check("resnet_wd.safetensors", "images.h5", DataOptions(scale_uint8=True), scale=255.0)
    assert compared >= 4


@pytest.mark.parametrize(
    ("model_file", "data_file", "extra"),
    [("mlp_wd.safetensors", "data.h5", []), ("mlp_nowd.safetensors", "data.h5", []),
     ("resnet_wd.safetensors", "images.h5", ["--scale-uint8"])]
    + [(f"trend/{p.name}", "data.h5", []) for p in sorted((SAMPLES / "trend").glob("*.safetensors"))],
)  # fmt: skip
def test_every_sample_report_validates_against_the_shipped_schema(model_file, data_file, extra):
    import jsonschema

    from nrc_audit.outputs.report import load_schema

    _, doc = audit_json(str(SAMPLES / model_file), str(SAMPLES / data_file), *extra, "--require-collapsed", "0")
    jsonschema.Draft202012Validator(load_schema()).validate(doc)
    assert doc["warnings"] == []  # every shipped sample is a well-posed audit (issue 12)
