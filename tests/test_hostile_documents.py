"""Hostile documents and user code (issue 17, docs/reliability.md "Hostile inputs"): baseline / history /
report JSON, ``[tool.nrc-audit]`` values, feature stores altered after writing, checkpoint metadata JSON,
and exceptions from ``--model-def`` factories and forwards. Each ends in exit 2 naming the file, the field
(or the callable) and what was expected — never a traceback, never exit 1 or the user's own exit code.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import nrc_audit
from conftest import make_mlp, make_xy, write_h5
from nrc_audit.errors import FeatureStoreError, OptionsError
from nrc_audit.io.store import FeatureStore
from nrc_audit.outputs.baseline import compare, load_baseline
from test_reliability import assert_usage_error, run, runner

NO_GATE = ("--require-collapsed", "0")


@pytest.fixture(scope="module")
def audited_case(tmp_path_factory) -> dict:
    """One small audit with its JSON report and feature store, reused read-only by the tests below."""
    tmp = tmp_path_factory.mktemp("hostile")
    ckpt = nrc_audit.save_checkpoint(make_mlp([4, 8, 6, 2], seed=3), tmp / "m.safetensors", arch={"family": "mlp"})
    x, y = make_xy(200, 4, 2, seed=4)
    data = write_h5(tmp / "d.h5", X=x, Y=y)
    result = run(ckpt, data, *NO_GATE, "--json", tmp / "r.json", "--features", tmp / "f.h5")
    assert result.exit_code == 0, result.stderr
    return {"dir": tmp, "ckpt": ckpt, "data": data, "report": json.loads((tmp / "r.json").read_text()),
            "store": tmp / "f.h5"}  # fmt: skip


# ---- baseline / history / validate ----------------------------------------------------------------

def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is KeyError:  # KeyError as the value means "remove this node"
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


BAD_BASELINES = [
    ("layers.0.nrc1", "0.1", "layers[0].nrc1", "a finite number or null"),
    ("layers.0.index", 1.5, "layers[0].index", "an integer"),
    ("layers.0.collapsed", "yes", "layers[0].collapsed", "true or false"),
    ("layers.0.passed", {"nrc1": 1}, "layers[0].passed", "true/false"),
    ("layers.1", [], "layers[1]", "expected a JSON object"),
    ("layers", {}, "layers", "a list"),
    ("model_mse", "low", "model_mse", "a finite number or null"),
    ("summary.gate", KeyError, "summary.gate is missing", "complete"),
    ("summary.collapse_onset", "2", "summary.collapse_onset", "an integer or null"),
    ("summary.gate.failing_layers", [None], "summary.gate.failing_layers", "a list of integers"),
    ("target", None, "target", "an object"),
    ("layers.0.warnings", "none", "layers[0].warnings", "a list of strings"),
]


@pytest.mark.parametrize("field, value, where, expected", BAD_BASELINES)
def test_malformed_baseline_fields_exit_2_naming_the_field(audited_case, tmp_path, field, value, where, expected):
    bad = tmp_path / "baseline.json"
    bad.write_text(json.dumps(_set(audited_case["report"], field, value)))
    result = run(audited_case["ckpt"], audited_case["data"], *NO_GATE, "--no-features", "--baseline", bad)
    assert_usage_error(result, str(bad), where, expected)


@pytest.mark.parametrize("text, fragment", [("[" * 100_000, "not valid JSON"),
                                            ('{"a":' * 100 + "1" + "}" * 100, "nested more than 64"),
                                            ('{"schema": NaN}', "NaN is not valid JSON")],
                         ids=["1e5-deep", "100-deep", "NaN"])  # fmt: skip
def test_deep_or_non_finite_json_exits_2_for_baseline_history_and_validate(audited_case, tmp_path, text, fragment):
    bad = tmp_path / "doc.json"
    bad.write_text(text)
    assert_usage_error(run(audited_case["ckpt"], audited_case["data"], *NO_GATE, "--no-features", "--baseline", bad),
                       fragment)
    from nrc_audit.cli.commands import trend_app, validate_app

    for app, args in ((trend_app, ["--history", str(bad)]), (validate_app, [str(bad)])):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert fragment in " ".join(result.stderr.split())
        assert "Traceback" not in result.output


@pytest.mark.parametrize("line, fragment", [('{"label": "e1"}', "report: the document is NoneType"),
                                            ('["e1", {}]', "expected a history record"),
                                            ('{"label": "e1", "report": {"schema": "nrc-audit-report/1"}}', "is missing")])  # fmt: skip
def test_malformed_history_records_exit_2_naming_the_line(tmp_path, line, fragment):
    from nrc_audit.cli.commands import trend_app

    bad = tmp_path / "h.jsonl"
    bad.write_text(line + "\n")
    result = runner.invoke(trend_app, ["--history", str(bad)])
    assert result.exit_code == 2, result.output
    assert f"{bad}:1" in " ".join(result.stderr.split()) and fragment in " ".join(result.stderr.split())


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_baseline_loads_or_raises_options_error(audited_case, tmp_path, data):
    """Property: replacing any one node of a valid report by any JSON value gives a Report or an
    OptionsError naming the file — never another exception."""
    doc = audited_case["report"]
    paths: list[str] = []

    def walk(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            paths.append(f"{prefix}{k}")
            walk(v, f"{prefix}{k}.")

    walk(doc, "")
    mutated = _set(doc, data.draw(st.sampled_from(paths)), data.draw(st.one_of(_JSON_LEAF, st.just(KeyError),
                                                                                 st.lists(_JSON_LEAF, max_size=2))))
    path = tmp_path / "b.json"
    path.write_text(json.dumps(mutated))
    try:
        load_baseline(path)
    except OptionsError as exc:
        assert str(path) in str(exc)


@pytest.mark.parametrize("tolerance", ["nan", "-0.1", "inf"])
def test_baseline_tolerance_must_be_finite_and_non_negative(audited_case, tolerance):
    base = audited_case["dir"] / "r.json"
    result = run(audited_case["ckpt"], audited_case["data"], *NO_GATE, "--no-features", "--baseline", base,
                 f"--baseline-tolerance={tolerance}")  # fmt: skip
    assert_usage_error(result, "--baseline-tolerance", "expected a finite number ≥ 0")


def test_identical_report_never_regresses_for_any_valid_tolerance(audited_case):
    report = load_baseline(audited_case["dir"] / "r.json")
    for tolerance in (0.0, 1e-12, 0.05, 1e9):
        assert compare(report, report, tolerance) == []
    for tolerance in (math.nan, -1e-9, math.inf):
        with pytest.raises(OptionsError, match="finite number ≥ 0"):
            compare(report, report, tolerance)


# ---- [tool.nrc-audit] values -------------------------------------------------------------------------

@pytest.mark.parametrize("line, fragment", [
    ("layers = [1, 2]", "a list of strings"), ("nrc1_max = nan", "a finite number"),
    ('batch_size = "big"', "expected int"), ("rank = 1.5", "expected int or str"),
    ("baseline_tolerance = -1", "finite number ≥ 0"), ("baseline_tolerance = inf", "a finite number"),
    ("require_collapsed = true", "expected int"), ("exclude = \"*down*\"", "expected list"),
    ("x_key = { a = 1 }", "expected str"),
])  # fmt: skip
def test_wrongly_typed_settings_exit_2(audited_case, tmp_path, line, fragment):
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(f"[tool.nrc-audit]\n{line}\n")
    result = run(audited_case["ckpt"], audited_case["data"], "--no-features", "--config", cfg)
    assert_usage_error(result, str(cfg), fragment)


# ---- feature stores altered after writing ----------------------------------------------------------

def _replace(fh: h5py.File, key: str, array: np.ndarray) -> None:
    """Put ``array`` in place of dataset ``key``, keeping its attributes."""
    attrs = dict(fh[key].attrs)
    del fh[key]
    fh[key] = array
    fh[key].attrs.update(attrs)


def _tamper(store: Path, how: str) -> None:
    with h5py.File(store, "a") as fh:
        first = sorted(fh["layers"])[0]
        width = fh[f"layers/{first}"].shape[1]
        if how == "10-of-200-rows":
            _replace(fh, f"layers/{first}", np.zeros((10, width), np.float32))
        elif how == "wrong-width":
            _replace(fh, f"layers/{first}", np.zeros((200, 3), np.float32))
        elif how == "no-layers-group":
            del fh["layers"]
        elif how == "no-weights":
            del fh[f"weights/{first}"]
        elif how == "no-targets":
            del fh["targets"]
        elif how == "missing-attr":
            del fh[f"layers/{first}"].attrs["in_dim"]
        elif how == "mistyped-attr":
            fh[f"layers/{first}"].attrs["in_dim"] = "four"
        elif how == "outputs-rows":
            del fh["outputs"]
            fh["outputs"] = np.zeros((199, 2))
        elif how == "context-not-json":
            fh.attrs["context"] = "{not json"
        elif how == "context-a-list":
            fh.attrs["context"] = "[1, 2]"
        elif how == "int-features":
            _replace(fh, f"layers/{first}", np.zeros((200, width), np.int32))
        else:
            raise AssertionError(how)


TAMPERING = {"10-of-200-rows": "holds 10 rows", "wrong-width": "of width 3", "no-layers-group": "/layers is missing",
             "no-weights": "/weights holds", "no-targets": "/targets is missing", "missing-attr": "lacks the attribute",
             "mistyped-attr": "mistyped attributes", "outputs-rows": "/outputs has shape",
             "context-not-json": "not valid JSON", "context-a-list": "expected a JSON object",
             "int-features": "not a 2-D float array"}  # fmt: skip


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampered_store_is_refused_by_reanalyze(audited_case, tmp_path, how):
    from nrc_audit.cli.commands import reanalyze_app

    store = tmp_path / "f.h5"
    store.write_bytes(audited_case["store"].read_bytes())
    _tamper(store, how)
    with pytest.raises(FeatureStoreError, match="re-run the audit with --features|expected"):
        FeatureStore(store)
    result = runner.invoke(reanalyze_app, [str(store), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert TAMPERING[how] in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output


def test_untampered_store_still_reanalyzes(audited_case):
    from nrc_audit.cli.commands import reanalyze_app

    result = runner.invoke(reanalyze_app, [str(audited_case["store"]), "--no-progress", "--format", "json"])
    assert result.exit_code in (0, 1), result.output


# ---- --model-def: user code is fenced ------------------------------------------------------------

MODEL_DEF = """
import sys
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, fail=None):
        super().__init__()
        self.fail = fail
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x):
        if self.fail == "KeyError":
            raise KeyError("missing_feature")
        if self.fail == "AssertionError":
            assert x.shape[1] == 99, "expected 99 features\\nsecond line"
        if self.fail == "SystemExit":
            sys.exit(7)
        if self.fail == "ZeroDivisionError":
            1 / 0
        return self.body(x)

def build(fail=None):
    return Net(fail)

def factory_keyerror():
    return {}["width"]

def factory_assert():
    assert False, "factory check failed"

def factory_exit():
    sys.exit(7)

def factory_base():
    raise GeneratorExit("odd")
"""


@pytest.fixture
def model_def(tmp_path) -> dict:
    src = tmp_path / "netdef.py"
    src.write_text(MODEL_DEF)
    import importlib.util

    spec = importlib.util.spec_from_file_location("netdef_for_test", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.Net()
    ckpt = nrc_audit.save_checkpoint(net, tmp_path / "m.safetensors")
    x, y = make_xy(60, 4, 2)
    return {"src": src, "ckpt": ckpt, "data": write_h5(tmp_path / "d.h5", X=x, Y=y), "dir": tmp_path}


@pytest.mark.parametrize("factory, fragment", [("factory_keyerror", "raised KeyError: 'width'"),
                                               ("factory_assert", "raised AssertionError: factory check failed"),
                                               ("factory_exit", "raised SystemExit: 7")])  # fmt: skip
def test_model_def_factory_exceptions_exit_2_naming_the_callable(model_def, factory, fragment):
    target = f"{model_def['src']}:{factory}"
    result = run(model_def["ckpt"], model_def["data"], *NO_GATE, "--no-features", "--model-def", target)
    assert_usage_error(result, f"--model-def '{target}'", fragment)


def test_model_def_module_calling_sys_exit_at_import_exits_2(model_def):
    bad = model_def["dir"] / "exits.py"
    bad.write_text("import sys\nsys.exit(7)\n")
    result = run(model_def["ckpt"], model_def["data"], *NO_GATE, "--no-features", "--model-def", f"{bad}:build")
    assert_usage_error(result, "importing", "SystemExit: 7")


@pytest.mark.parametrize("fail, fragment", [("KeyError", "raised KeyError: 'missing_feature'"),
                                            ("AssertionError", "raised AssertionError: expected 99 features"),
                                            ("SystemExit", "raised SystemExit: 7"),
                                            ("ZeroDivisionError", "raised ZeroDivisionError: division by zero")])  # fmt: skip
@pytest.mark.parametrize("fingerprinted", [False, True])
def test_model_def_forward_exceptions_exit_2_naming_the_forward(model_def, fail, fragment, fingerprinted):
    """Without a fingerprint the pass's fence reports it; with one, the fingerprint check runs the forward first."""
    ckpt = model_def["ckpt"]
    if not fingerprinted:
        from safetensors.torch import load_file, save_file

        ckpt = model_def["dir"] / "plain.safetensors"
        save_file(load_file(model_def["ckpt"]), ckpt)
    target = f"{model_def['src']}:build"
    result = run(ckpt, model_def["data"], *NO_GATE, "--no-features", "--model-def", target,
                 "--model-kwargs", json.dumps({"fail": fail}))  # fmt: skip
    where = "saved probe batch" if fingerprinted else "batch starting at row 0"
    assert_usage_error(result, "Net.forward", fragment, where)
    assert "second line" not in result.stderr  # the first line only


@pytest.mark.parametrize("raw, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                           ('{"fail": NaN}', "NaN is not valid JSON")])  # fmt: skip
def test_non_json_model_kwargs_metadata_exits_2(model_def, raw, fragment):
    from safetensors.torch import load_file, save_file

    ckpt = model_def["dir"] / "meta.safetensors"
    save_file(load_file(model_def["ckpt"]), ckpt, metadata={"nrc_audit.model_kwargs": raw})
    result = run(ckpt, model_def["data"], *NO_GATE, "--no-features", "--model-def", f"{model_def['src']}:build")
    assert_usage_error(result, "metadata 'nrc_audit.model_kwargs'", fragment)


def test_deeply_nested_arch_metadata_exits_2(model_def, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "arch.safetensors"
    save_file(load_file(model_def["ckpt"]), ckpt, metadata={"nrc_audit.arch": "[" * 100_000})
    result = run(ckpt, model_def["data"], *NO_GATE, "--no-features")
    assert_usage_error(result, "metadata 'nrc_audit.arch'", "not valid JSON")


def test_reanalysis_plans_its_statistics_before_reading(audited_case, monkeypatch):
    """A store whose declared widths need more than the budget is refused before any row is read."""
    from nrc_audit.cli.commands import reanalyze_app

    monkeypatch.setenv("NRC_AUDIT_MAX_MEMORY", "1K")
    result = runner.invoke(reanalyze_app, [str(audited_case["store"]), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "8·(h+t)² bytes" in " ".join(result.stderr.split()) and "NRC_AUDIT_MAX_MEMORY" in result.stderr
