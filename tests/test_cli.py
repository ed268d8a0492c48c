"""The command line: outputs, exit codes (SPEC §6) and clear exit-2 errors that leave no files behind."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import nrc_audit
from conftest import make_mlp, make_xy, write_h5
from nrc_audit.cli.app import audit_app, main
from nrc_audit.cli.commands import reanalyze_app

runner = CliRunner()


def run(*args: str | Path):
    return runner.invoke(audit_app, [str(a) for a in args])


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, message


def test_json_to_stdout_is_the_whole_product(mlp_case):
    result = run(mlp_case["ckpt"], mlp_case["data"], "--format", "json", "--no-features", "--require-collapsed", "0")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # stdout holds nothing but the report
    assert doc["schema"] == "nrc-audit-report/1"
    assert [layer["name"] for layer in doc["layers"]] == ["0", "2", "4", "6"]


def test_table_on_stdout_and_json_file_written(mlp_case, tmp_path):
    out = tmp_path / "report.json"
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--no-features", "--require-collapsed", "0")
    assert result.exit_code == 0
    assert "NRC1" in result.stdout and "summary" in result.stdout
    assert json.loads(out.read_text())["summary"]["num_layers"] == 4
    assert not list(tmp_path.glob(".report.json.*"))  # the temp file of the atomic write is gone


def test_gate_exit_codes(mlp_case):
    base = [mlp_case["ckpt"], mlp_case["data"], "--no-features", "--format", "json"]
    failed = run(*base)  # a random network is not collapsed: the default gate (last layer) fails
    doc = json.loads(failed.stdout)
    assert failed.exit_code == 1
    assert doc["summary"]["gate"] == {"require_collapsed": 1, "passed": False, "failing_layers": [3]}
    assert run(*base, "--exit-zero").exit_code == 0
    assert run(*base, "--require-collapsed", "0").exit_code == 0
    # a threshold loose enough to pass every condition turns the verdict around
    loose = ["--nrc1-max", "1", "--nrc2-min", "0", "--nrc3-min", "0", "--nrc4-ratio-max", "1e9", "--noise-alignment-max", "1"]
    passed = run(*base, *loose, "--require-collapsed", "4")
    assert passed.exit_code == 0, passed.stdout
    assert json.loads(passed.stdout)["summary"]["collapse_onset"] == 0


def test_feature_store_default_path_and_reanalysis(mlp_case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    direct = run(mlp_case["ckpt"], mlp_case["data"], "--format", "json", "--require-collapsed", "0")
    assert direct.exit_code == 0
    (store,) = tmp_path.glob("mlp-*.features.h5")  # the model's stem and a hash of its path
    again = runner.invoke(reanalyze_app, [str(store), "--format", "json", "--require-collapsed", "0"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["layers"] == json.loads(direct.stdout)["layers"]


def test_main_dispatches_subcommands(mlp_case, tmp_path, capsys):
    store = tmp_path / "f.h5"
    with pytest.raises(SystemExit) as exc:
        main([str(mlp_case["ckpt"]), str(mlp_case["data"]), "--features", str(store), "--no-progress",
              "--require-collapsed", "0", "--format", "json"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["reanalyze", str(store), "--no-progress", "--require-collapsed", "0", "--format", "json"])
    assert exc.value.code == 0


# ------------------------------------------------------------------------------------------ exit 2


def test_missing_model_file(mlp_case, tmp_path):
    assert_usage_error(run(tmp_path / "nope.safetensors", mlp_case["data"], "--no-features"),
                       "checkpoint not found", "nope.safetensors")


def test_missing_data_file(mlp_case, tmp_path):
    assert_usage_error(run(mlp_case["ckpt"], tmp_path / "nope.h5", "--no-features"), "data file not found")


def test_non_hdf5_data_file(mlp_case, tmp_path):
    bad = tmp_path / "data.h5"
    bad.write_text("x,y\n1,2\n")
    assert_usage_error(run(mlp_case["ckpt"], bad, "--no-features"), "is not a readable HDF5 file")


def test_corrupt_safetensors(mlp_case, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mlp_case["ckpt"].read_bytes()[:40])
    assert_usage_error(run(bad, mlp_case["data"], "--no-features"), "not a valid safetensors file")


def test_xy_length_mismatch(mlp_case, tmp_path):
    x, y = make_xy(50, 12, 3)
    data = write_h5(tmp_path / "mismatch.h5", X=x, Y=y[:40])
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "X has 50 rows but Y has 40")


def test_model_input_dimension_mismatch(mlp_case, tmp_path):
    x, y = make_xy(50, 7, 3)
    data = write_h5(tmp_path / "d7.h5", X=x, Y=y)
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "7 features", "takes 12")


def test_output_target_mismatch(mlp_case, tmp_path):
    x, y = make_xy(50, 12, 2)
    data = write_h5(tmp_path / "t2.h5", X=x, Y=y)
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "output has shape (50, 3)", "2 columns")


def test_missing_key_lists_available_arrays(mlp_case):
    assert_usage_error(run(mlp_case["ckpt"], mlp_case["data"], "--x-key", "inputs", "--no-features"),
                       "no array 'inputs'", "'X'", "--x-key")


def test_nan_in_x_names_first_bad_row(mlp_case, tmp_path):
    x, y = make_xy(60, 12, 3)
    x[37, 4] = np.nan
    x[50, 0] = np.inf
    data = write_h5(tmp_path / "nan.h5", X=x, Y=y)
    out, store = tmp_path / "r.json", tmp_path / "f.h5"
    result = run(mlp_case["ckpt"], data, "--json", out, "--features", store, "--batch-size", "16")
    assert_usage_error(result, "X 'X' has NaN or Inf at row 37")
    assert not out.exists() and not store.exists()  # no partial output files


def test_too_few_samples(mlp_case, tmp_path):
    x, y = make_xy(3, 12, 3)
    data = write_h5(tmp_path / "tiny.h5", X=x, Y=y)
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "3 samples for 3 target dims")


def test_constant_targets(mlp_case, tmp_path):
    x, _ = make_xy(40, 12, 3)
    data = write_h5(tmp_path / "const.h5", X=x, Y=np.ones((40, 3), np.float32))
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "targets are constant")


@pytest.mark.parametrize(
    ("option", "fragment"),
    [(["--rank", "0"], "--rank 0"), (["--rank", "two"], "--rank 'two'"), (["--nrc1-max", "1.5"], "nrc1_max=1.5"),
     (["--device", "tpu"], "--device"), (["--batch-size", "0"], "--batch-size 0"),
     (["--require-collapsed", "9"], "exceeds the 4 audited layers"), (["--layers", "nothing*"], "no Linear or Conv2d")],
)  # fmt: skip
def test_bad_options(mlp_case, option, fragment):
    assert_usage_error(run(mlp_case["ckpt"], mlp_case["data"], "--no-features", *option), fragment)


def test_unknown_architecture_names_model_def(tmp_path, mlp_case):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"encoder.proj": torch.zeros(3, 3), "head": torch.zeros(3)}, str(path))
    assert_usage_error(run(path, mlp_case["data"], "--no-features"), "matches no known architecture", "--model-def")


def test_unknown_family_in_metadata(tmp_path, mlp_case):
    path = nrc_audit.save_checkpoint(make_mlp([12, 3]), tmp_path / "m.safetensors", arch={"family": "transformer"})
    assert_usage_error(run(path, mlp_case["data"], "--no-features"), "'transformer'", "--model-def")


def test_group_path_keys_and_limit(tmp_path, mlp_case):
    x, y = make_xy(120, 12, 3)
    data = write_h5(tmp_path / "g.h5", train__X=x, train__Y=y)
    result = run(mlp_case["ckpt"], data, "--x-key", "train/X", "--y-key", "train/Y", "--limit", "70",
                 "--no-features", "--format", "json", "--require-collapsed", "0")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["data"]["num_samples"] == 70 and doc["data"]["x_key"] == "train/X"


def test_one_dimensional_targets(tmp_path):
    model = make_mlp([5, 8, 1])
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "m.safetensors", arch={"family": "mlp", "activation": "relu"})
    x, y = make_xy(80, 5, 1)
    data = write_h5(tmp_path / "d.h5", X=x, Y=y[:, 0])
    result = run(ckpt, data, "--no-features", "--format", "json", "--require-collapsed", "0")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["target"]["dim"] == 1


def test_external_link_refused(tmp_path, mlp_case):
    x, y = make_xy(40, 12, 3)
    write_h5(tmp_path / "other.h5", X=x)
    with h5py.File(tmp_path / "linked.h5", "w") as fh:
        fh["X"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "X")
        fh["Y"] = y
    assert_usage_error(run(mlp_case["ckpt"], tmp_path / "linked.h5", "--no-features"), "external link")
