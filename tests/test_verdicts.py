"""Trustworthy verdicts (issue 12): the choice of k, the verdict policy on lists alone, report-level warnings,
trend order and gate, the feature-store line; and the one per-layer record (issue 15)."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import nrc_audit
from conftest import SAMPLES, write_h5
from nrc_audit.cli.app import audit_app
from nrc_audit.cli.commands import trend_app
from nrc_audit.config import Thresholds
from nrc_audit.core.conditions import METRIC_FIELDS, LayerMetrics
from nrc_audit.core.diagnostics import DataFacts
from nrc_audit.core.verdicts import choose_rank, collapse_onset, condition_passed, exit_code, gate, is_collapsed, near_threshold
from nrc_audit.outputs.records import LayerReport
from nrc_audit.outputs.trend import natural_order

runner = CliRunner()


# ----------------------------------------------------------------------------- policy on numbers alone


def test_choose_rank_defaults_to_the_intrinsic_rank_and_keeps_the_papers_k_equals_t():
    assert choose_rank(None, 4, 2) == (2, "auto")
    assert choose_rank("auto", 4, 2) == (2, "auto")
    assert choose_rank("auto", 4, 4) == (4, "auto")  # full-rank targets: k = t as before
    assert choose_rank("t", 4, 2) == (4, "target_dim")
    assert choose_rank(3, 4, 2) == (3, "user")


def test_condition_passed_thresholds_and_nulls():
    th = Thresholds(nrc1_max=0.25, nrc2_min=0.6, nrc3_min=0.7, nrc4_ratio_max=2.0, noise_alignment_max=0.45)
    values = {"nrc1": 0.25, "nrc2": 0.6, "nrc3": 0.7, "nrc4_ratio": 2.0, "noise_alignment": 0.45}
    ok = condition_passed(values, th)  # boundaries pass
    assert ok == {"nrc1": True, "nrc2": True, "nrc3": True, "nrc4": True, "noise_alignment": True} and is_collapsed(ok)
    bad = condition_passed({"nrc1": 0.26, "nrc2": 0.59, "nrc3": None, "nrc4_ratio": 2.01, "noise_alignment": None}, th)
    assert bad == dict.fromkeys(ok, False) and not is_collapsed(bad)
    # the fifth alone decides a layer that passes the other four
    assert not is_collapsed(condition_passed({**values, "noise_alignment": 0.46}, th))
    # null noise alignment beside a defined NRC3: features of rank < k, no noise subspace to read
    assert condition_passed({**values, "noise_alignment": None}, th)["noise_alignment"] is True
    # a report of an earlier version has no fifth key and is judged on its four
    assert is_collapsed({"nrc1": True, "nrc2": True, "nrc3": True, "nrc4": True})


def test_near_threshold_on_either_side_absolute_and_relative_for_the_ratio():
    th = Thresholds()
    far = {"nrc1": 0.0, "nrc2": 1.0, "nrc3": 1.0, "nrc4_ratio": 1.0, "noise_alignment": 0.0}
    assert near_threshold(far, th) == []
    assert near_threshold({**far, "nrc3": th.nrc3_min - 0.049}, th) == ["nrc3"]
    assert near_threshold({**far, "nrc3": th.nrc3_min + 0.049}, th) == ["nrc3"]
    assert near_threshold({**far, "nrc3": th.nrc3_min + 0.051}, th) == []
    assert near_threshold({**far, "noise_alignment": th.noise_alignment_max + 0.03}, th) == ["noise_alignment"]
    assert near_threshold({**far, "nrc4_ratio": th.nrc4_ratio_max * 1.049}, th) == ["nrc4"]
    assert near_threshold({**far, "nrc4_ratio": th.nrc4_ratio_max + 0.11}, th) == []
    # only a near value that decides the verdict counts: not when another condition fails anyway
    assert near_threshold({**far, "nrc3": th.nrc3_min + 0.01, "nrc1": 0.9}, th) == []
    assert near_threshold({**far, "nrc3": th.nrc3_min - 0.01, "nrc1": 0.9}, th) == []
    assert near_threshold({**far, "nrc3": th.nrc3_min - 0.01, "nrc1": th.nrc1_max - 0.01}, th) == ["nrc3"]


def test_onset_gate_and_exit_code_on_lists():
    assert collapse_onset([False, True, False, True, True]) == 3
    assert collapse_onset([True, True, False]) is None and collapse_onset([]) is None
    assert gate([False, True, True], 2) == (True, []) and gate([False, True, True], 3) == (False, [0])
    assert gate([False], 0) == (True, [])
    assert exit_code(True) == 0 and exit_code(False) == 1 and exit_code(True, regressions=2) == 1
    assert exit_code(False, exit_zero=True) == 0 and exit_code(True, 1, exit_zero=True) == 0


def test_one_record_per_layer_with_the_json_field_order():
    assert LayerReport is LayerMetrics
    names = [f.name for f in fields(LayerMetrics)]
    assert names == ["index", "name", "kind", "in_dim", "out_dim", "pooled", "shares_input_with", *METRIC_FIELDS,
                     "bound", "passed", "collapsed", "warnings"]  # fmt: skip
    assert METRIC_FIELDS == ("nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio", "cka_signal", "noise_alignment",
                             "stable_rank", "stable_rank_cov", "stable_rank_w")  # fmt: skip


def test_data_facts_labels_and_regression_targets():
    facts = DataFacts()
    for _ in range(3):
        facts.observe_targets(torch.eye(5)[torch.randint(0, 5, (40,))].double())
    assert facts.looks_like_labels() == "every row of Y is one-hot"
    classes = DataFacts()
    classes.observe_targets(torch.randint(0, 7, (100, 1)).double())
    assert "integers, 7 distinct" in classes.looks_like_labels()
    ages = DataFacts()  # integer years over a wide range: a regression target, not labels
    ages.observe_targets(torch.arange(1, 101).double().reshape(-1, 1).repeat(3, 1))
    real = DataFacts()
    real.observe_targets(torch.randn(50, 3, dtype=torch.float64))
    real.observe_targets(torch.zeros(50, 3, dtype=torch.float64))  # later integer batches do not make it labels
    assert ages.looks_like_labels() is None and real.looks_like_labels() is None


# ----------------------------------------------------------------------------- a model trained on rank-2 targets


def rank2_targets(n: int = 1024, d: int = 20, t: int = 4, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's synthetic setting: x ~ N(0, I_d), y = relu(relu(x W1) W2) W3 with width r = 2, standardised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2, w3 = torch.randn(d, 2, generator=g) / d**0.5, torch.randn(2, 2, generator=g), torch.randn(2, t, generator=g)
    y = torch.relu(torch.relu(x @ w1) @ w2) @ w3
    return x, (y - y.mean(0)) / y.std(0)


@pytest.fixture(scope="module")
def rank2_case(tmp_path_factory, one_torch_thread):
    """A bias-free 5-layer ReLU MLP (20→32→32→32→32→4) trained with weight decay on t = 4, r = 2 targets (~4 s)."""
    x, y = rank2_targets()
    torch.manual_seed(1)
    dims = [20, 32, 32, 32, 32, 4]
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b, bias=False), nn.ReLU()]
    model = nn.Sequential(*mods[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [100, 150], 0.1)
    for _ in range(200):
        for i in range(0, len(x), 256):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[i : i + 256]), y[i : i + 256]).backward()
            opt.step()
        sched.step()
    folder = tmp_path_factory.mktemp("rank2")
    ckpt = nrc_audit.save_checkpoint(model.eval(), folder / "rank2.safetensors", arch={"family": "mlp", "activation": "relu"})
    data = write_h5(folder / "data.h5", X=x.numpy(), Y=y.numpy())
    return {"ckpt": ckpt, "data": data, "model": model, "x": x, "y": y}


def cli_json(*args) -> tuple[int, dict, str]:
    result = runner.invoke(audit_app, [*map(str, args), "--no-features", "--no-progress", "--format", "json"])
    assert result.exit_code in (0, 1), result.stderr
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_default_audit_of_rank_deficient_targets_uses_the_intrinsic_rank(rank2_case):
    base = (rank2_case["ckpt"], rank2_case["data"])
    code, default, err = cli_json(*base, "--require-collapsed", "3")
    _, at_r, _ = cli_json(*base, "--rank", "2", "--require-collapsed", "0")
    assert default["target"]["rank_estimate"] == 2 and default["target"]["dim"] == 4
    assert default["settings"]["rank"] == 2 and default["settings"]["rank_source"] == "auto"
    assert default["summary"]["collapsed_layers"] == at_r["summary"]["collapsed_layers"]
    assert len(default["summary"]["collapsed_layers"]) >= 3
    assert code == 0 and default["summary"]["gate"]["passed"]  # --require-collapsed 3 passes by default
    assert default["warnings"] == [] and "warning" not in err  # a well-posed audit: no warnings


def test_paper_view_k_equals_t_is_kept_and_warns_that_k_exceeds_the_rank(rank2_case):
    base = (rank2_case["ckpt"], rank2_case["data"])
    for flag in ("4", "t"):
        code, doc, err = cli_json(*base, "--rank", flag, "--require-collapsed", "3")
        assert doc["settings"]["rank"] == 4
        assert doc["settings"]["rank_source"] == ("user" if flag == "4" else "target_dim")
        assert code == 1  # at k = t the top layers fail NRC3: the wrong conclusion issue 12 is about
        (warning,) = doc["warnings"]
        assert "k = 4 exceeds the targets' intrinsic rank estimate 2" in warning
        assert "k = 4 exceeds" in err  # on stderr too


def test_collapse_monitor_shows_collapse_on_rank2_targets_with_its_defaults(rank2_case, tmp_path):
    from nrc_audit.engine.monitor import CollapseMonitor

    x, y = rank2_case["x"], rank2_case["y"]
    monitor = CollapseMonitor([(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)], tmp_path / "h.jsonl")
    report = monitor(rank2_case["model"], 0)
    assert report.settings["rank"] == 2 and report.layers[-1].collapsed and report.warnings == []
    tables = monitor.tables()  # gate column: the last layer collapsed
    assert tables[0].columns[-1].header == "gate (last 1)"


# ----------------------------------------------------------------------------- report-level warnings


def test_uint8_images_without_scale_uint8_warn_and_name_the_option(tmp_path):
    args = [SAMPLES / "resnet_wd.safetensors", SAMPLES / "images.h5", "--limit", "64", "--require-collapsed", "0"]
    _, raw, err = cli_json(*args)
    assert any("uint8" in w and "--scale-uint8" in w for w in raw["warnings"])
    assert "--scale-uint8" in err
    assert any("does not fit the data" in w for w in raw["warnings"])  # MSE ≈ 700 against variance ≈ 1
    _, scaled, err = cli_json(*args, "--scale-uint8")
    assert scaled["warnings"] == [] and "warning:" not in err


def test_reanalysis_repeats_the_uint8_warning(tmp_path):
    """The store records that X was fed unscaled, so a report rebuilt from it warns as the audit did."""
    from nrc_audit.cli.commands import reanalyze_app

    store = tmp_path / "f.h5"
    args = [SAMPLES / "resnet_wd.safetensors", SAMPLES / "images.h5", "--limit", "64", "--require-collapsed", "0"]
    audited = runner.invoke(audit_app, [*map(str, args), "--features", str(store), "--no-progress", "--format", "json"])
    again = runner.invoke(reanalyze_app, [str(store), "--no-progress", "--format", "json", "--require-collapsed", "0"])
    assert audited.exit_code == 0 and again.exit_code == 0, again.stderr
    uint8 = [w for w in json.loads(again.stdout)["warnings"] if "uint8" in w]
    assert uint8 and uint8 == [w for w in json.loads(audited.stdout)["warnings"] if "uint8" in w]


def test_unstandardised_targets_warn_that_the_model_does_not_fit(tmp_path):
    with h5py.File(SAMPLES / "data.h5", "r") as fh:
        x, y = fh["X"][:600], fh["Y"][:600]
    data = write_h5(tmp_path / "raw.h5", X=x, Y=(y * 1000 + 5000).astype(np.float32))
    code, doc, err = cli_json(SAMPLES / "mlp_wd.safetensors", data, "--exit-zero")
    (warning,) = doc["warnings"]
    assert warning.startswith("the model does not fit the data: model MSE") and "R² =" in warning
    assert "does not fit the data" in err and code == 0  # warnings never change the exit code
    table = runner.invoke(audit_app, [str(SAMPLES / "mlp_wd.safetensors"), str(data), "--no-features", "--no-progress"])
    assert "warning: the model does not fit the data" in " ".join(table.stdout.split())  # the summary panel


@pytest.mark.parametrize("kind", ["one-hot", "integers"])
def test_class_labels_warn(kind):
    torch.manual_seed(0)
    x = torch.randn(300, 8)
    labels = torch.randint(0, 3, (300,))
    y = torch.eye(3)[labels] if kind == "one-hot" else labels.float().reshape(-1, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, y.shape[1]))
    report = nrc_audit.audit(model, [(x[i : i + 100], y[i : i + 100]) for i in range(0, 300, 100)], require_collapsed=0)
    found = [w for w in report.warnings if "look like class labels" in w]
    assert len(found) == 1
    assert ("one-hot" if kind == "one-hot" else "3 distinct value(s) (0, 1, 2)") in found[0]
    assert report.to_dict()["warnings"] == report.warnings


def test_warnings_do_not_change_the_exit_code(rank2_case):
    base = (rank2_case["ckpt"], rank2_case["data"], "--rank", "4")
    code, doc, _ = cli_json(*base, "--require-collapsed", "0")
    assert doc["warnings"] and code == 0


# ----------------------------------------------------------------------------- trend


def test_natural_order():
    names = ["run/epoch_100", "run/epoch_10", "run/epoch_2", "run/epoch_20"]
    assert natural_order(names) == ["run/epoch_2", "run/epoch_10", "run/epoch_20", "run/epoch_100"]


def _without_position(src, dst):
    """A copy of a sample checkpoint without its stored epoch, so that only its file name orders it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "epoch"}
        save_file({k: fh.get_tensor(k) for k in fh.keys()}, str(dst), metadata=meta)


def test_trend_sorts_checkpoints_naturally_and_gates_the_last(tmp_path):
    # epoch_2 is the collapsed sample (4 of 6 layers), epoch_10 the not-yet-collapsed one (none)
    _without_position(SAMPLES / "trend/mlp_wd_epoch100.safetensors", tmp_path / "epoch_2.safetensors")
    _without_position(SAMPLES / "trend/mlp_wd_epoch20.safetensors", tmp_path / "epoch_10.safetensors")
    given = sorted(map(str, tmp_path.glob("epoch_*.safetensors")))  # the shell's alphabetical order
    assert [p.rsplit("/", 1)[1] for p in given] == ["epoch_10.safetensors", "epoch_2.safetensors"]
    base = [*given, "--data", str(SAMPLES / "data.h5"), "--limit", "600", "--no-progress"]
    out = tmp_path / "trend.json"
    result = runner.invoke(trend_app, [*base, "--require-collapsed", "1", "--json", str(out)])
    assert result.exit_code == 1, result.stderr  # the last checkpoint, epoch_10, is not collapsed
    assert "order (by file name (no step or epoch stored in every checkpoint)): epoch_2, epoch_10" in result.stderr
    assert json.loads(out.read_text())["labels"] == ["epoch_2", "epoch_10"]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ epoch_")]
    assert rows[0].split("│")[-2].strip() == "pass" and rows[1].split("│")[-2].strip() == "fail"
    # the gate column uses the same N: epoch_2 has 4 collapsed layers, not 5
    five = runner.invoke(trend_app, [*base, "--require-collapsed", "5"])
    assert five.exit_code == 1 and all(r.split("│")[-2].strip() == "fail"
                                       for r in five.stdout.splitlines() if r.startswith("│ epoch_"))  # fmt: skip
    as_given = runner.invoke(trend_app, [*base, "--require-collapsed", "1", "--as-given"])
    assert as_given.exit_code == 0 and "order (as given): epoch_10, epoch_2" in as_given.stderr
    assert runner.invoke(trend_app, [*base, "--require-collapsed", "0"]).exit_code == 0
    # a monitor history (recorded without a gate) is gated the same way
    history = tmp_path / "history.jsonl"
    with open(history, "w") as fh:
        for label, report in zip(["epoch 2", "epoch 10"], json.loads(out.read_text())["reports"]):
            report["summary"]["gate"] = {"require_collapsed": 0, "passed": True, "failing_layers": []}
            fh.write(json.dumps({"label": label, "report": report}) + "\n")
    replay = runner.invoke(trend_app, ["--history", str(history), "--require-collapsed", "1"])
    assert replay.exit_code == 1, replay.stderr
    assert [r.split("│")[-2].strip() for r in replay.stdout.splitlines() if r.startswith("│ epoch")] == ["pass", "fail"]
    bad = runner.invoke(trend_app, [*base, "--require-collapsed", "9"])
    assert bad.exit_code == 2 and "exceeds the 6 audited layers" in bad.stderr


# ----------------------------------------------------------------------------- the feature store line


def test_the_feature_store_path_and_size_are_printed(mlp_case, tmp_path):
    store = tmp_path / "f.h5"
    result = runner.invoke(audit_app, [str(mlp_case["ckpt"]), str(mlp_case["data"]), "--features", str(store),
                                       "--no-progress", "--require-collapsed", "0"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("feature store: ")]
    assert len(lines) == 1 and str(store) in lines[0] and "KiB" in lines[0]


# ----------------------------------------------------------------------------- the warnings' thresholds, at their edges


def _warnings(model_mse: float, k: int, source: str, eigenvalues=(3.0, 1.0), rank_estimate: int = 1) -> list[str]:
    from nrc_audit.core.conditions import TargetSummary
    from nrc_audit.core.diagnostics import report_warnings

    target = TargetSummary(len(eigenvalues), rank_estimate, list(eigenvalues), None)
    return report_warnings(DataFacts(), target, model_mse, k, source)


def test_no_fit_warning_starts_exactly_at_the_targets_mean_variance():
    """Mean variance of Y = (3 + 1) / 2 = 2: an MSE of 2 (R² = 0) warns, one just below does not."""
    assert any("does not fit" in w for w in _warnings(2.0, 1, "auto"))
    assert not any("does not fit" in w for w in _warnings(2.0 * (1 - 1e-12), 1, "auto"))
    assert not any("does not fit" in w for w in _warnings(1.0, 1, "auto"))


@pytest.mark.parametrize("source", ["user", "t"])
def test_rank_warning_starts_one_above_the_intrinsic_rank(source):
    """k = rank estimate + 1 warns for a user's or the paper's k; k = rank estimate does not; auto never does."""
    assert any("exceeds the targets' intrinsic rank" in w for w in _warnings(0.1, 2, source, rank_estimate=1))
    assert not any("exceeds" in w for w in _warnings(0.1, 1, source, rank_estimate=1))
    assert not any("exceeds" in w for w in _warnings(0.1, 2, "auto", rank_estimate=1))
