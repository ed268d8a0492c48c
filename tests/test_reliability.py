"""Reliability (docs/reliability.md): every bad input gets a clear exit-2 error, a degenerate layer gets null
metrics and a warning, outputs are atomic and deterministic, and nothing runs or reads outside the inputs.

One test per row of the table in docs/reliability.md; rows already tested elsewhere (tests/test_cli.py,
tests/test_checkpoint_formats.py, tests/test_model_def.py) are referenced there, not repeated here. The
signal rows live in tests/test_signals.py and the fuzz rows in tests/test_fuzz.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import nrc_audit
from conftest import REPO, make_mlp, write_h5
from nrc_audit.cli.app import audit_app

runner = CliRunner()
QUIET = ("--no-progress",)
NO_GATE = ("--require-collapsed", "0")


def run(*args: str | Path):
    return runner.invoke(audit_app, [str(a) for a in (*args, *QUIET)], env={"COLUMNS": "200"})


def flat(text: str) -> str:
    """Undo Rich's line wrapping."""
    return " ".join(text.split())


def without_notices(stderr: str) -> str:
    """stderr less the plan's notices printed before the pass (``nrc-audit: feature store: up to …``)."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("nrc-audit: "))


def assert_usage_error(result, *fragments: str, absent: tuple[Path, ...] = ()) -> None:
    """Exit 2, no traceback, nothing on stdout, every fragment in the message, no output file left."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    message = flat(without_notices(result.stderr))
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for path in absent:
        assert not path.exists(), path


def audited(result) -> dict:
    """The JSON report of a run that completed (exit 0 or 1) without a traceback."""
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return json.loads(result.stdout)


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


MLP_ARCH = json.dumps({"family": "mlp", "activation": "relu"})


# ------------------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("which", ["checkpoint", "data"])
def test_unreadable_file_exits_2(mlp_case, tmp_path, monkeypatch, which):
    """Permission bits do not stop root, so the opener is made to fail as it does for another user."""

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    target = "nrc_audit.io.checkpoint.safe_open" if which == "checkpoint" else "nrc_audit.io.dataset.h5py.File"
    monkeypatch.setattr(target, denied)
    out = tmp_path / "r.json"
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--features", tmp_path / "f.h5")
    needle = "is not a valid safetensors file" if which == "checkpoint" else "is not a readable HDF5 file"
    assert_usage_error(result, needle, "Permission denied", absent=(out, tmp_path / "f.h5"))


def test_directory_instead_of_file_exits_2(mlp_case, tmp_path):
    assert_usage_error(run(mlp_case["ckpt"], tmp_path, "--no-features"), "data file not found")
    assert_usage_error(run(tmp_path, mlp_case["data"], "--no-features"), "checkpoint not found")


# ------------------------------------------------------------------------------------- HDF5 files


@pytest.mark.parametrize(
    ("damage", "needle"),
    [("empty", "is not a readable HDF5 file"), ("truncated", "HDF5"), ("no arrays", "the file holds no arrays")],
)
def test_empty_truncated_or_empty_hdf5_exits_2(mlp_case, tmp_path, damage, needle):
    bad = tmp_path / "bad.h5"
    raw = mlp_case["data"].read_bytes()
    if damage == "no arrays":
        h5py.File(bad, "w").close()
    else:
        bad.write_bytes(b"" if damage == "empty" else raw[: len(raw) // 2])
    out, store = tmp_path / "r.json", tmp_path / "f.h5"
    assert_usage_error(run(mlp_case["ckpt"], bad, "--json", out, "--features", store), needle, absent=(out, store))


def test_target_of_wrong_rank_exits_2(mlp_case, tmp_path):
    x, y = mlp_case["x"], mlp_case["y"]
    data = write_h5(tmp_path / "y3.h5", X=x, Y=y[:, :, None])
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "Y 'Y' has shape (300, 3, 1)",
                       "expected numbers of shape (N,) or (N, t)")  # fmt: skip
    data = write_h5(tmp_path / "x1.h5", X=x[:, 0], Y=y)
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "X 'X' has shape (300,)", "expected (N, d)")
    data = write_h5(tmp_path / "y0.h5", X=x, Y=y[:, :0])
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features"), "no target columns")


@pytest.mark.parametrize(("rows", "limit"), [(0, None), (300, "3")])
def test_fewer_than_t_plus_1_rows_exits_2(mlp_case, tmp_path, rows, limit):
    """Complements tests/test_cli.py::test_too_few_samples: an empty file, and --limit below t + 1."""
    data = write_h5(tmp_path / "few.h5", X=mlp_case["x"][:rows], Y=mlp_case["y"][:rows])
    extra = ("--limit", limit) if limit else ()
    n = rows if limit is None else int(limit)
    assert_usage_error(run(mlp_case["ckpt"], data, "--no-features", *extra),
                       f"{n} samples for 3 target dims", "at least t+1 = 4 samples")  # fmt: skip


def _odd_arrays(n: int) -> dict[str, np.ndarray]:
    compound = np.zeros(n, dtype=[("a", "f4"), ("b", "f4")])
    return {
        "bytes": np.array([[b"a"] * 12] * n, dtype="S1"),
        "bool": np.ones((n, 12), dtype=bool),
        "complex": np.ones((n, 12), dtype=np.complex64),
        "compound": compound,
    }


ODD_KINDS = [(role, kind) for role in ("X", "Y") for kind in ("bytes", "bool", "complex", "compound", "vlen str")
             if (role, kind) != ("Y", "bool")]  # boolean targets are numbers (0/1): accepted, cast to float


@pytest.mark.parametrize(("role", "kind"), ODD_KINDS)
def test_non_numeric_dtypes_exit_2(mlp_case, tmp_path, role, kind):
    x, y = mlp_case["x"], mlp_case["y"]
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as fh:
        other = "Y" if role == "X" else "X"
        fh[other] = y if other == "Y" else x
        if kind == "vlen str":
            fh.create_dataset(role, data=np.array([["ab"] * 3] * len(x), dtype=object), dtype=h5py.string_dtype())
        else:
            fh[role] = _odd_arrays(len(x))[kind]
    needle = "input array 'X' has dtype" if role == "X" else "Y 'Y' has shape"
    assert_usage_error(run(mlp_case["ckpt"], path, "--no-features"), needle, "expected")


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.longdouble, np.uint8])
def test_numeric_dtypes_of_x_are_accepted(mlp_case, tmp_path, dtype):
    x = mlp_case["x"]
    x = np.clip(np.abs(x) * 40, 0, 255) if dtype == np.uint8 else x
    data = write_h5(tmp_path / "d.h5", X=x.astype(dtype), Y=mlp_case["y"])
    doc = audited(run(mlp_case["ckpt"], data, "--no-features", "--format", "json", *NO_GATE))
    assert doc["data"]["num_samples"] == 300 and all(layer["warnings"] == [] for layer in doc["layers"])


@pytest.mark.parametrize(("value", "needle"), [(np.inf, "Y 'Y' has NaN or Inf at row 123"),
                                               (np.nan, "Y 'Y' has NaN or Inf at row 123"),
                                               (1e200, "Y 'Y' has a value beyond ±1e+100 at row 123")])  # fmt: skip
def test_nonfinite_or_overflowing_targets_exit_2(mlp_case, tmp_path, value, needle):
    """Complements tests/test_cli.py::test_nan_in_x_names_first_bad_row for Y (float64, so 1e200 is storable)."""
    y = mlp_case["y"].astype(np.float64)
    y[123, 1] = value
    y[200, 0] = value
    data = write_h5(tmp_path / "bad_y.h5", X=mlp_case["x"], Y=y)
    out, store = tmp_path / "r.json", tmp_path / "f.h5"
    result = run(mlp_case["ckpt"], data, "--json", out, "--features", store, "--batch-size", "100")
    assert_usage_error(result, needle, absent=(out, store))  # the store was started, then removed


# ------------------------------------------------------------------------------------- HDF5: other files


def _external_variants(tmp: Path, x: np.ndarray, y: np.ndarray) -> dict[str, tuple[Path, tuple[str, ...]]]:
    other = write_h5(tmp / "other.h5", g__X=x, g__Y=y)
    x.tofile(tmp / "raw.bin")
    out: dict[str, tuple[Path, tuple[str, ...]]] = {}
    with h5py.File(tmp / "group_link.h5", "w") as fh:  # the link is a group above the array
        fh["ext"] = h5py.ExternalLink(str(other), "g")
    out["external link to a group"] = (tmp / "group_link.h5", ("--x-key", "ext/X", "--y-key", "ext/Y"))
    with h5py.File(tmp / "soft_to_ext.h5", "w") as fh:  # a soft link inside the file that leads outside
        fh["ext"] = h5py.ExternalLink(str(other), "g")
        fh["X"] = h5py.SoftLink("/ext/X")
        fh["Y"] = y
    out["soft link through an external link"] = (tmp / "soft_to_ext.h5", ())
    with h5py.File(tmp / "vds.h5", "w") as fh:
        layout = h5py.VirtualLayout(shape=x.shape, dtype=x.dtype)
        layout[:] = h5py.VirtualSource(str(other), "g/X", shape=x.shape)
        fh.create_virtual_dataset("X", layout)
        fh["Y"] = y
    out["virtual dataset"] = (tmp / "vds.h5", ())
    with h5py.File(tmp / "ext_storage.h5", "w") as fh:
        fh.create_dataset("X", shape=x.shape, dtype=x.dtype, external=[(str(tmp / "raw.bin"), 0, x.nbytes)])
        fh["Y"] = y
    out["external raw storage"] = (tmp / "ext_storage.h5", ())
    return out


@pytest.mark.parametrize("variant", ["external link to a group", "soft link through an external link",
                                     "virtual dataset", "external raw storage"])  # fmt: skip
def test_arrays_stored_in_other_files_are_refused(mlp_case, tmp_path, variant):
    """Complements tests/test_cli.py::test_external_link_refused (a direct external link)."""
    path, keys = _external_variants(tmp_path, mlp_case["x"], mlp_case["y"])[variant]
    assert_usage_error(run(mlp_case["ckpt"], path, "--no-features", *keys),
                       "reads only data stored inside the given file")  # fmt: skip


# ------------------------------------------------------------------------------------- checkpoints


def _lying_header(ckpt: Path, lie: str) -> bytes:
    raw = ckpt.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    if lie == "header length beyond the file":
        return struct.pack("<Q", len(raw) * 4) + raw[8:]
    if lie == "header length 2^62":
        return struct.pack("<Q", 2**62) + raw[8:]
    entry = header["0.weight"]
    a, b = entry["data_offsets"]
    if lie == "offsets beyond the data":
        entry["data_offsets"] = [a, b + 10**6]
    elif lie == "shape larger than its bytes":
        entry["shape"] = [entry["shape"][0] * 4, entry["shape"][1]]
    elif lie == "dtype wider than its bytes":
        entry["dtype"] = "F64"
    elif lie == "header is not JSON":
        text = b"{not json" + b" " * (n - 9)
        return raw[:8] + text + body
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


LIES = ["offsets beyond the data", "shape larger than its bytes", "dtype wider than its bytes",
        "header length beyond the file", "header length 2^62", "header is not JSON"]


@pytest.mark.parametrize("lie", LIES)
def test_safetensors_header_that_lies_exits_2(mlp_case, tmp_path, lie):
    bad = tmp_path / "lie.safetensors"
    bad.write_bytes(_lying_header(mlp_case["ckpt"], lie))
    out = tmp_path / "r.json"
    assert_usage_error(run(bad, mlp_case["data"], "--json", out, "--features", tmp_path / "f.h5"),
                       "is not a valid safetensors file", "Re-save it", absent=(out, tmp_path / "f.h5"))  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "metadata", "needle"),
    [("extra key", True, "does not match the 'mlp' architecture in its metadata"),
     ("extra key", False, "matches no known architecture"),
     ("bias without weight", False, "matches no known architecture"),
     # keys of an MLP whose shapes break the chain: the message names the key and both widths
     ("shapes do not chain", True, "2.weight has shape (32, 31): it takes 31 inputs, but the layer before it gives 32"),
     ("shapes do not chain", False, "2.weight has shape (32, 31): it takes 31 inputs, but the layer before it gives 32")],
)  # fmt: skip
def test_state_dict_that_fits_no_architecture_exits_2(mlp_case, tmp_path, edit, metadata, needle):
    """Auto-detection. With --model-def every bad key is listed in one message instead
    (tests/test_model_def.py::test_strict_loading_lists_every_bad_key)."""
    sd = state_dict(mlp_case["model"])
    if edit == "extra key":
        sd["head.scale"] = torch.ones(3)
    elif edit == "bias without weight":
        sd["4.bias"] = torch.zeros(16)
        del sd["4.weight"]
    else:
        sd["2.weight"] = torch.zeros(32, 31)  # takes 31 inputs, but 0.weight gives 32
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata={"nrc_audit.arch": MLP_ARCH} if metadata else None)
    assert_usage_error(run(path, mlp_case["data"], "--no-features"), needle, "--model-def")


@pytest.mark.parametrize("arch", [{"family": ["mlp"]}, {"family": "mlp", "activation": ["relu"]}, "mlp", "{oops"])
def test_malformed_arch_metadata_exits_2(mlp_case, tmp_path, arch):
    path = tmp_path / "m.safetensors"
    save_file(state_dict(mlp_case["model"]), str(path),
              metadata={"nrc_audit.arch": arch if isinstance(arch, str) else json.dumps(arch)})  # fmt: skip
    assert_usage_error(run(path, mlp_case["data"], "--no-features"), "metadata 'nrc_audit.arch'")


# ------------------------------------------------------------------------------------- degenerate layers


def _checkpoint(tmp: Path, model: torch.nn.Module, name: str = "m.safetensors", **edits: torch.Tensor) -> Path:
    sd = state_dict(model)
    sd.update(edits)
    path = tmp / name
    save_file(sd, str(path), metadata={"nrc_audit.arch": MLP_ARCH})
    return path


def _assert_null_with_warning(layer: dict, fragment: str, *, fields=("nrc1", "nrc2", "nrc3", "nrc4")) -> None:
    for name in fields:
        assert layer[name] is None, (layer["name"], name)
    assert any(fragment in w for w in layer["warnings"]), layer["warnings"]
    assert layer["collapsed"] is False


def test_layer_narrower_than_the_target_rank(tmp_path, mlp_case):
    """t ≥ h: h < k gives null subspace metrics and a warning; h = k is defined (NRC1 = 0: no noise subspace)."""
    ckpt = nrc_audit.save_checkpoint(make_mlp([12, 2, 3, 3], seed=3), tmp_path / "narrow.safetensors",
                                     arch={"family": "mlp", "activation": "relu"})  # fmt: skip
    result = run(ckpt, mlp_case["data"], "--no-features", "--format", "json", "--rank", "t")  # k = t = 3
    doc = audited(result)
    narrow, square = doc["layers"][1], doc["layers"][2]
    assert (narrow["in_dim"], square["in_dim"]) == (2, 3)
    _assert_null_with_warning(narrow, "2 feature dims, fewer than the rank k=3", fields=("nrc1", "nrc3"))
    assert narrow["nrc2"] is not None and narrow["nrc4"] is not None  # still defined without a top-k subspace
    assert square["nrc1"] == pytest.approx(0.0, abs=1e-12)
    table = flat(run(ckpt, mlp_case["data"], "--no-features", "--rank", "t").stdout)
    assert "warning: layer 1 (2): the layer has 2 feature dims, fewer than the rank k=3" in table


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_width_layer_gives_null_metrics(mlp_case, tmp_path):
    """A Linear(12, 0) leaves the next layer nothing to measure (h = 0): null and a warning, no crash."""
    model = torch.nn.Sequential(torch.nn.Linear(12, 0), torch.nn.ReLU(), torch.nn.Linear(0, 3))
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "zero.safetensors", arch={"family": "mlp", "activation": "relu"})
    first, empty = audited(run(ckpt, mlp_case["data"], "--no-features", "--format", "json"))["layers"]
    assert first["nrc1"] is not None and empty["in_dim"] == 0
    _assert_null_with_warning(empty, "the layer has no input features (h = 0)")


def test_constant_features_give_null_metrics_and_a_warning(mlp_case, tmp_path):
    """A zero weight makes every later layer's input constant; a constant X does the same for layer 0."""
    ckpt = _checkpoint(tmp_path, mlp_case["model"], **{"2.weight": torch.zeros(32, 32)})
    doc = audited(run(ckpt, mlp_case["data"], "--no-features", "--format", "json"))
    layers = doc["layers"]
    assert layers[0]["warnings"] == [] and layers[0]["nrc1"] is not None
    assert any("weight is all zeros" in w for w in layers[1]["warnings"]) and layers[1]["nrc3"] is None
    for layer in layers[2:]:
        _assert_null_with_warning(layer, "the features are constant over the data")
    table = flat(run(ckpt, mlp_case["data"], "--no-features").stdout)
    assert "⚠" in table and "warning: layer 2 (4): the features are constant over the data" in table

    const = write_h5(tmp_path / "const.h5", X=np.full((300, 12), 0.5, np.float32), Y=mlp_case["y"])
    doc = audited(run(mlp_case["ckpt"], const, "--no-features", "--format", "json"))
    for layer in doc["layers"]:
        _assert_null_with_warning(layer, "the features are constant over the data")


def test_nan_weight_gives_null_metrics_downstream(mlp_case, tmp_path):
    """A NaN in a checkpoint weight: that layer's NRC3 and every later layer are null with a warning; the
    model's output is NaN, so model_mse is null. Exit 1 (gate), never a traceback."""
    w = mlp_case["model"][2].weight.detach().clone()
    w[0, 0] = float("nan")
    ckpt = _checkpoint(tmp_path, mlp_case["model"], **{"2.weight": w})
    result = run(ckpt, mlp_case["data"], "--no-features", "--format", "json")
    assert result.exit_code == 1
    doc = audited(result)
    assert doc["model_mse"] is None
    first, nan_weight, *later = doc["layers"]
    assert first["nrc1"] is not None and first["nrc4_ratio"] is None
    assert any("outputs contain NaN/Inf" in w for w in first["warnings"])
    assert any("weight contains NaN/Inf" in w for w in nan_weight["warnings"]) and nan_weight["nrc3"] is None
    for layer in later:
        _assert_null_with_warning(layer, "300 of 300 samples produced NaN/Inf features")
    table = flat(run(ckpt, mlp_case["data"], "--no-features").stdout)
    assert re.search(r"model MSE = (nan|—) ", table)
    assert "warning: layer 2 (4): 300 of 300 samples produced NaN/Inf features in this layer" in table


SPIKY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Spiky(nn.Module):
        '''Every 7th sample overflows to Inf before layer b; the output is made finite again.'''

        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            spike = (torch.arange(len(x)) % 7 == 0)[:, None]
            h = torch.where(spike, torch.full_like(h, float("inf")), h)
            return self.c(torch.nan_to_num(torch.relu(self.b(h)), nan=0.0, posinf=0.0, neginf=0.0))


    def build():
        torch.manual_seed(0)
        return Spiky()
    """
)


def test_model_with_nonfinite_features_in_one_layer(mlp_case, tmp_path):
    """NaN/Inf inside the model in one layer only: that layer is null with a warning, the others are audited."""
    src = tmp_path / "spiky.py"
    src.write_text(SPIKY_SOURCE)
    ns: dict = {}
    exec(compile(SPIKY_SOURCE, str(src), "exec"), ns)  # the test builds the same weights the CLI will load
    ckpt = nrc_audit.save_checkpoint(ns["build"](), tmp_path / "spiky.safetensors")
    result = run(ckpt, mlp_case["data"], "--model-def", f"{src}:build", "--no-features", "--format", "json")
    a, b, c = audited(result)["layers"]
    bad = len(range(0, 300, 7))
    _assert_null_with_warning(b, f"{bad} of 300 samples produced NaN/Inf features in this layer")
    assert a["warnings"] == [] and c["warnings"] == []
    assert None not in (a["nrc1"], a["nrc4_ratio"], c["nrc1"], c["nrc4_ratio"])


# ------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_output_in_a_missing_folder_exits_2(mlp_case, tmp_path, option):
    target = tmp_path / "no" / "such" / "out.txt"
    result = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", option, target, *NO_GATE)
    # checked before the pass: the message names the option and the missing folder
    assert_usage_error(result, f"{option} {target}", "does not exist; create it", absent=(target,))


@pytest.mark.parametrize("case", ["constant_targets", "gate_too_large"])
def test_error_after_the_pass_leaves_no_store(mlp_case, tmp_path, case):
    store, out = tmp_path / "f.h5", tmp_path / "r.json"
    data, extra = mlp_case["data"], []
    if case == "constant_targets":
        data = write_h5(tmp_path / "const.h5", X=mlp_case["x"], Y=np.ones((len(mlp_case["x"]), 3), np.float32))
    else:
        extra = ["--require-collapsed", "9"]
    result = run(mlp_case["ckpt"], data, "--features", store, "--json", out, *extra)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert not store.exists() and not out.exists()


def test_report_failure_keeps_an_earlier_store_and_no_partial(mlp_case, tmp_path):
    """The store is completed only once the report exists: a report that cannot be built (constant targets,
    found after the pass) drops the new store's partial file and leaves the earlier store as it was."""
    folder = tmp_path / "out"
    folder.mkdir()
    store = folder / "f.h5"
    store.write_text("earlier store")
    data = write_h5(tmp_path / "const.h5", X=mlp_case["x"], Y=np.ones((len(mlp_case["x"]), 3), np.float32))
    result = run(mlp_case["ckpt"], data, "--features", store, *NO_GATE)
    assert result.exit_code == 2 and "targets are constant" in result.stderr
    assert store.read_text() == "earlier store"
    assert sorted(p.name for p in folder.iterdir()) == ["f.h5"]


def test_existing_outputs_are_replaced_atomically(mlp_case, tmp_path):
    """Policy: outputs are replaced, through a temporary file in the same folder and a rename (a new inode)."""
    folder = tmp_path / "out"
    folder.mkdir()
    out, md, store = folder / "r.json", folder / "r.md", folder / "f.h5"
    for path in (out, md, store):
        path.write_text("old")
    before = {p: p.stat().st_ino for p in (out, md)}
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--markdown", md, "--features", store, *NO_GATE)
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["schema"] == "nrc-audit-report/1" and md.read_text() != "old"
    assert all(p.stat().st_ino != ino for p, ino in before.items())  # renamed into place, not rewritten
    with h5py.File(store) as fh:
        assert bool(fh.attrs["complete"]) is True
    assert sorted(p.name for p in folder.iterdir()) == ["f.h5", "r.json", "r.md"]  # no temporary files


def test_failed_run_leaves_existing_outputs_untouched(mlp_case, tmp_path):
    x = mlp_case["x"].copy()
    x[250, 3] = np.nan  # found in the last batch, after the store was started
    data = write_h5(tmp_path / "nan.h5", X=x, Y=mlp_case["y"])
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    out.write_text("old report")
    md.write_text("old card")
    result = run(mlp_case["ckpt"], data, "--json", out, "--markdown", md, "--features", tmp_path / "f.h5",
                 "--batch-size", "64")  # fmt: skip
    assert_usage_error(result, "X 'X' has NaN or Inf at row 250", absent=(tmp_path / "f.h5",))
    assert out.read_text() == "old report"
    # the markdown (a CI job summary) states this run's failure rather than showing a stale verdict
    assert "**The audit could not run**" in md.read_text() and "has NaN or Inf at row 250" in md.read_text()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_report_write_keeps_the_old_file(mlp_case, tmp_path, monkeypatch, failure):
    """Ctrl-C (or a full disk) at the rename: the old report stays whole and the temporary file is gone."""
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "r.json"
    out.write_text("old report")

    def fail(src, dst):
        raise failure(28, "No space left on device") if failure is OSError else failure()

    monkeypatch.setattr("nrc_audit.io.files.os.replace", fail)
    result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--no-features", *NO_GATE)
    assert result.exit_code == (130 if failure is KeyboardInterrupt else 2)
    assert "Traceback" not in result.stdout + result.stderr
    assert out.read_text() == "old report"
    assert sorted(p.name for p in folder.iterdir()) == ["r.json"]


def test_reports_are_byte_identical_across_runs(mlp_case, tmp_path):
    """Same inputs and options → the same bytes (the report carries no timestamp); the store does not enter it."""
    outs = []
    for i in range(2):
        out, md = tmp_path / f"r{i}.json", tmp_path / f"r{i}.md"
        result = run(mlp_case["ckpt"], mlp_case["data"], "--json", out, "--markdown", md,
                     "--features", tmp_path / f"f{i}.h5", "--batch-size", "64", "--format", "json")  # fmt: skip
        assert result.exit_code == 1, result.stderr
        outs.append((out.read_bytes(), md.read_bytes(), result.stdout.encode()))
    assert outs[0] == outs[1]
    assert outs[0][0] == outs[0][2]  # the file and stdout are the same document
    assert b"time" not in outs[0][0] and b"date" not in outs[0][0]


# ------------------------------------------------------------------------------------- security


class _Boom:
    """Unpickling this would call os.mkdir (any callable would do): nrc-audit must refuse, not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_payload_is_refused_and_never_runs(mlp_case, tmp_path):
    """Complements tests/test_checkpoint_formats.py::test_pickled_objects_are_refused with a live payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict(mlp_case["model"]), "extra": _Boom(marker)}, path)
    result = run(path, mlp_case["data"], "--no-features")
    assert_usage_error(result, "refused to load", "mkdir", "weights_only=True")
    assert not marker.exists()


def test_source_never_unpickles_unsafely():
    """Every torch.load passes weights_only=True; nothing calls pickle/np.load(allow_pickle=True) or eval/exec."""
    loads = 0
    for path in (REPO / "nrc_audit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func == "torch.load":
                loads += 1
                assert keywords.get("weights_only") == "True", f"{path}: {ast.unparse(node)}"
            assert not re.fullmatch(r"(c?pickle|dill|joblib|marshal)\.loads?|eval|exec", func), f"{path}: {func}"
            assert keywords.get("allow_pickle") != "True", f"{path}: {ast.unparse(node)}"
    assert loads >= 1


def test_model_def_help_says_it_executes_code():
    result = runner.invoke(audit_app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "EXECUTES that code" in flat(result.stdout)


# ------------------------------------------------------------------------------------- the table itself


def test_every_test_named_in_docs_reliability_exists():
    """docs/reliability.md names a test for each row; each must exist (a rename breaks this test, not the doc)."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", doc))
    assert len(named) >= 30
    defined: dict[str, set[str]] = {}
    for file in {f for f, _ in named}:
        source = (REPO / file).read_text() if (REPO / file).is_file() else ""
        defined[file] = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    missing = sorted(f"{file}::{name}" for file, name in named if name not in defined[file])
    assert not missing, missing
