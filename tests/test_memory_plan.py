"""Memory by plan: when the statistics of all layers exceed the memory budget, the layers are audited in
groups, one pass over the data each, and the report is the one-pass report."""

from __future__ import annotations

import numpy as np
import pytest

import nrc_audit
from conftest import make_mlp, make_xy, write_h5
from nrc_audit.config import AnalysisOptions, AuditConfig
from nrc_audit.engine import pipeline
from nrc_audit.engine.run import run_audit
from nrc_audit.errors import PlanError
from nrc_audit.io.plan import STATS_FACTOR, plan_groups


@pytest.fixture
def case(tmp_path):
    model = make_mlp([12, 48, 40, 32, 3], seed=5)
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "mlp.safetensors", arch={"family": "mlp", "activation": "relu"})
    x, y = make_xy(400, 12, 3, seed=6)
    return {"ckpt": ckpt, "data": write_h5(tmp_path / "data.h5", X=x, Y=y), "dir": tmp_path}


def _audit(case, **kw):
    return run_audit(AuditConfig(case["ckpt"], case["data"], batch_size=64, progress=False,
                                 analysis=AnalysisOptions(require_collapsed=0), **kw))  # fmt: skip


def test_tiny_budget_splits_the_layers_into_passes_with_the_same_report(case, monkeypatch, capfd):
    one = _audit(case, features_path=case["dir"] / "one.h5")
    passes = []
    inner = pipeline.pass_rows
    monkeypatch.setattr(pipeline, "pass_rows", lambda *a, **k: passes.append(a[-1] if len(a) > 6 else 0) or inner(*a, **k))
    # room for the widest layer's statistics (h = 48, t = 3) and the targets', not for two layers
    budget = 8 * (48 + 3) ** 2 * STATS_FACTOR + 8 * 9 * STATS_FACTOR + 1000
    monkeypatch.setenv("NRC_AUDIT_MAX_MEMORY", str(budget))
    split = _audit(case, features_path=case["dir"] / "split.h5")
    assert len(passes) >= 2  # one pass over the data per group
    assert "memory plan" in capfd.readouterr().err  # said before the pass
    assert split.to_dict()["layers"] == one.to_dict()["layers"]
    assert split.model_mse == one.model_mse and split.target == one.target
    import h5py

    with h5py.File(case["dir"] / "split.h5", "r") as a, h5py.File(case["dir"] / "one.h5", "r") as b:
        assert sorted(a["layers"]) == sorted(b["layers"])
        for key in a["layers"]:
            np.testing.assert_array_equal(a["layers"][key][...], b["layers"][key][...])


def test_groups_are_consecutive_and_a_layer_over_the_budget_is_refused():
    cost = lambda h: 8 * (h + 2) ** 2 * STATS_FACTOR  # noqa: E731
    fixed = 8 * 4 * STATS_FACTOR
    groups = plan_groups({"a": 10, "b": 10, "c": 10}, 2, fixed + 2 * cost(10))
    assert groups == (("a", "b"), ("c",))
    assert plan_groups({"a": 10, "b": 10}, 2, 10**9) == (("a", "b"),)
    with pytest.raises(PlanError, match="'b' alone"):
        plan_groups({"a": 10, "b": 100}, 2, fixed + cost(10))
