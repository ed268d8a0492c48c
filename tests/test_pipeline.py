"""End-to-end properties of one audit pass: batch-size invariance, store re-analysis, field names."""

from __future__ import annotations

import json

import h5py
import jsonschema
import numpy as np
import pytest

from nrc_audit.config import AnalysisOptions, AuditConfig
from nrc_audit.engine.run import reanalyze, run_audit
from nrc_audit.outputs.report import METRIC_FIELDS, Report, load_schema

# SPEC §5, transcribed: the public field names of nrc-audit-report/1.
SPEC_FIELDS = {
    "": {"schema", "tool", "model", "data", "settings", "target", "model_mse", "layers", "summary",
         "warnings"},  # warnings: added by issue 12 (report-level)
    "tool": {"name", "version"},
    "model": {"path", "sha256", "format", "architecture", "num_parameters", "assumptions"},
    "data": {"path", "sha256", "x_key", "y_key", "num_samples", "input_shape", "target_dim"},
    "settings": {"rank", "rank_source", "device", "batch_size", "pinv_rtol", "rank_energy", "require_collapsed",
                 "thresholds"},
    "settings.thresholds": {"nrc1_max", "nrc2_min", "nrc3_min", "nrc4_ratio_max", "noise_alignment_max"},
    "target": {"dim", "rank_estimate", "eigenvalues", "stable_rank_cov"},
    "layer": {"index", "name", "kind", "in_dim", "out_dim", "pooled", "shares_input_with", "nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio",
              "cka_signal", "noise_alignment", "stable_rank", "stable_rank_cov", "stable_rank_w", "bound", "passed",
              "collapsed", "warnings"},
    "layer.bound": {"lhs", "rhs", "holds"},
    "layer.passed": {"nrc1", "nrc2", "nrc3", "nrc4", "noise_alignment"},
    "summary": {"num_layers", "collapsed_layers", "not_collapsed_layers", "collapse_onset", "gate"},
    "summary.gate": {"require_collapsed", "passed", "failing_layers"},
}  # fmt: skip
# layer.shares_input_with: an nrc-audit extension of SPEC §5, in the JSON schema and docs/performance.md


def audit(case: dict, **overrides) -> Report:
    kwargs = {"model_path": case["ckpt"], "data_path": case["data"], "progress": False,
              "analysis": AnalysisOptions(require_collapsed=0)} | overrides  # fmt: skip
    return run_audit(AuditConfig(**kwargs))


def metrics(report: Report) -> np.ndarray:
    rows = [[getattr(layer, f) for f in METRIC_FIELDS] + [layer.bound["lhs"], layer.bound["rhs"]] for layer in report.layers]
    return np.array(rows, dtype=float)


def test_report_has_exactly_the_spec_field_names(mlp_case):
    doc = audit(mlp_case).to_dict()
    assert set(doc) == SPEC_FIELDS[""]
    for section in ("tool", "model", "data", "settings", "target", "summary"):
        assert set(doc[section]) == SPEC_FIELDS[section], section
    assert set(doc["settings"]["thresholds"]) == SPEC_FIELDS["settings.thresholds"]
    assert set(doc["summary"]["gate"]) == SPEC_FIELDS["summary.gate"]
    for layer in doc["layers"]:
        assert set(layer) == SPEC_FIELDS["layer"]
        assert set(layer["bound"]) == SPEC_FIELDS["layer.bound"]
        assert set(layer["passed"]) == SPEC_FIELDS["layer.passed"]
    jsonschema.validate(doc, load_schema())


def test_schema_rejects_a_renamed_field(mlp_case):
    doc = audit(mlp_case).to_dict()
    doc["layers"][0]["nrc_1"] = doc["layers"][0].pop("nrc1")
    with pytest.raises(jsonschema.ValidationError, match="nrc1"):
        jsonschema.validate(doc, load_schema())


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_invariance(mlp_case, batch_size, tmp_path):
    # A float64 model, so that the forward pass itself is batch-size independent to ~1e-16 (float32 GEMM
    # kernels round differently for different batch shapes, ~1e-7); what is left is the streaming statistics.
    import nrc_audit

    case = dict(mlp_case, ckpt=nrc_audit.save_checkpoint(mlp_case["model"].double(), tmp_path / "m64.safetensors",
                                                          arch={"family": "mlp", "activation": "relu"}))  # fmt: skip
    full = audit(case, batch_size=10_000)
    small = audit(case, batch_size=batch_size)
    np.testing.assert_allclose(metrics(small), metrics(full), rtol=1e-9, atol=1e-11)
    assert small.model_mse == pytest.approx(full.model_mse, rel=1e-12)
    assert [layer.passed for layer in small.layers] == [layer.passed for layer in full.layers]


def test_store_reanalysis_equals_direct_run(mlp_case, tmp_path):
    store = tmp_path / "features.h5"
    direct = audit(mlp_case, features_path=store, batch_size=64)
    again = reanalyze(store, AnalysisOptions(require_collapsed=0), batch_size=64)
    np.testing.assert_allclose(metrics(again), metrics(direct), rtol=1e-12, atol=1e-14)
    assert again.to_dict()["layers"] == direct.to_dict()["layers"]
    assert again.model == direct.model and again.data == direct.data
    # another batch size still agrees to rounding
    other = reanalyze(store, AnalysisOptions(require_collapsed=0), batch_size=1000)
    np.testing.assert_allclose(metrics(other), metrics(direct), rtol=1e-10, atol=1e-12)


def test_store_layout(mlp_case, tmp_path):
    store = tmp_path / "features.h5"
    report = audit(mlp_case, features_path=store, batch_size=100)
    with h5py.File(store, "r") as fh:
        assert fh.attrs["schema"] == "nrc-audit-features/1" and bool(fh.attrs["complete"])
        assert fh.attrs["model_sha256"] == report.model["sha256"]
        assert fh["targets"].shape == (300, 3) and fh["outputs"].shape == (300, 3)
        assert sorted(fh["layers"]) == ["00", "01", "02", "03"]
        layer = fh["layers/01"]
        assert layer.shape == (300, 32) and layer.dtype == np.float32 and layer.chunks is not None
        assert layer.attrs["name"] == "2" and layer.attrs["kind"] == "linear"
        np.testing.assert_array_equal(fh["weights/01"][...], mlp_case["model"][2].weight.detach().numpy())
        np.testing.assert_array_equal(fh["layers/00"][...], mlp_case["x"])  # layer 0's input is X itself


def test_incomplete_store_is_refused(mlp_case, tmp_path):
    from nrc_audit.errors import FeatureStoreError

    store = tmp_path / "features.h5"
    audit(mlp_case, features_path=store)
    with h5py.File(store, "a") as fh:
        fh.attrs["complete"] = False
    with pytest.raises(FeatureStoreError, match="incomplete"):
        reanalyze(store, AnalysisOptions())


def test_rank_options(mlp_case):
    default = audit(mlp_case)  # the default is the targets' intrinsic rank (issue 12); here r = 2 < t = 3
    assert default.settings | {"rank": 2, "rank_source": "auto"} == default.settings
    assert default.target.rank_estimate == 2
    auto = audit(mlp_case, analysis=AnalysisOptions(rank="auto", require_collapsed=0))
    assert auto.settings["rank_source"] == "auto" and auto.settings["rank"] == auto.target.rank_estimate
    user = audit(mlp_case, analysis=AnalysisOptions(rank=2, require_collapsed=0))
    assert user.settings == user.settings | {"rank": 2, "rank_source": "user"}
    paper = audit(mlp_case, analysis=AnalysisOptions(rank="t", require_collapsed=0))  # the paper's k = t view
    assert paper.settings == paper.settings | {"rank": 3, "rank_source": "target_dim"}


def test_json_is_deterministic(mlp_case):
    assert audit(mlp_case).to_json() == audit(mlp_case).to_json()


def test_model_mse_is_the_models_own(mlp_case):
    import torch

    with torch.no_grad():
        pred = mlp_case["model"](torch.from_numpy(mlp_case["x"])).double().numpy()
    expected = ((pred - mlp_case["y"].astype(np.float64)) ** 2).mean()
    assert audit(mlp_case).model_mse == pytest.approx(expected, rel=1e-6)


def test_report_round_trips_through_json(mlp_case):
    report = audit(mlp_case)
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()


def test_a_symlinked_store_path_is_written_through(mlp_case, tmp_path):
    """--features LINK → real/store.h5: the new store lands at the link's target and the link stays a link."""
    real = tmp_path / "real"
    real.mkdir()
    target, link = real / "store.h5", tmp_path / "link.h5"
    target.write_bytes(b"an earlier store")
    link.symlink_to(target)
    audit(mlp_case, features_path=link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    with h5py.File(target, "r") as fh:
        assert bool(fh.attrs["complete"])
    assert reanalyze(link, AnalysisOptions(require_collapsed=0)).data == audit(mlp_case).data
