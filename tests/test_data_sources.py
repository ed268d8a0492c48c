"""Data as users export it: 3-D inputs ``(N, T, d)`` / ``(N, C, L)``, token ids of every integer dtype (uint8
too, when the model begins with an embedding), an attention mask stored in the file, and pandas ``to_hdf``
groups. Audits are compared with the dense float64 reference from hooks on the model's own modules."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import _loader_nets as nets
from conftest import write_h5
from test_library_models import audit, check, reference
from fixtures_models import assert_layers_match
from nrc_audit.cli.app import audit_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NETS = str(Path(__file__).resolve().parent / "_loader_nets.py")
N = 160


def _saved(tmp_path: Path, net: str, seed: int) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(seed)
    model = getattr(nets, net)().double().eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    return model, tmp_path / "m.pth"


@pytest.mark.parametrize("net, shape", [("SeqLinear", (7, 5)), ("Signal1d", (3, 16))])
def test_three_dimensional_inputs(tmp_path: Path, net: str, shape: tuple) -> None:
    model, ckpt = _saved(tmp_path, net, 1)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((N, *shape)), rng.standard_normal((N, 2))
    report = audit(ckpt, write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:{net}")
    check(report, model, torch.from_numpy(x), y)
    assert report.data["input_shape"] == list(shape)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "int64", "uint16", "uint32"])
def test_token_ids_of_every_integer_dtype_stay_integer(tmp_path: Path, dtype: str) -> None:
    model, ckpt = _saved(tmp_path, "TokenNet", 2)
    rng = np.random.default_rng(2)
    ids, y = rng.integers(0, 120, size=(N, 10)).astype(dtype), rng.standard_normal((N, 2))
    report = audit(ckpt, write_h5(tmp_path / "d.h5", X=ids, Y=y), model_def=f"{NETS}:TokenNet")
    check(report, model, torch.from_numpy(ids.astype(np.int64)), y)
    assert not any("uint8" in w for w in report.warnings)  # no "pass --scale-uint8" advice for token ids
    if dtype == "uint8":
        assert any("fed as integer token ids" in a for a in report.model["assumptions"])


def _bert_with_padding(tmp_path: Path) -> tuple[torch.nn.Module, np.ndarray, np.ndarray, np.ndarray]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=1)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).double().eval()
    model.save_pretrained(tmp_path / "bert")
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 13, size=N)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    return model, rng.integers(1, 40, size=(N, 12)) * mask, mask, rng.standard_normal(N)


def test_attention_mask_in_the_file_is_passed_to_a_forward_that_takes_one(tmp_path: Path) -> None:
    model, ids, mask, y = _bert_with_padding(tmp_path)
    data = write_h5(tmp_path / "d.h5", X=ids, Y=y, attention_mask=mask)
    report = audit(tmp_path / "bert", data)  # no --input-key: the file's attention_mask is found
    m = torch.from_numpy(mask)
    names, feats, weights, out = reference(model, torch.from_numpy(ids), {"attention_mask": m}, mask)
    assert report.model_mse == pytest.approx(float(((out[:, 0] - y) ** 2).mean()), rel=1e-6)
    assert_layers_match(report.layers, names, feats, weights, y, out)
    assert any("passed as attention_mask=" in a for a in report.model["assumptions"])
    assert not any("padding mask" in w for w in report.warnings)


def test_attention_mask_the_model_cannot_take_is_warned_about(tmp_path: Path) -> None:
    model, ckpt = _saved(tmp_path, "MaskFree", 4)
    rng = np.random.default_rng(4)
    mask = (np.arange(12)[None, :] < rng.integers(3, 13, size=N)[:, None]).astype(np.int64)
    ids, y = rng.integers(1, 40, size=(N, 12)) * mask, rng.standard_normal(N)
    data = write_h5(tmp_path / "d.h5", X=ids, Y=y, attention_mask=mask)
    report = audit(ckpt, data, model_def=f"{NETS}:MaskFree")
    check(report, model, torch.from_numpy(ids), y)  # fed unmasked, as the model's forward allows
    assert any("'attention_mask'" in w and "--input-key" in w for w in report.warnings), report.warnings


def _pandas_frame(fh: h5py.File, key: str, blocks: list[np.ndarray]) -> None:
    """pandas' fixed-format frame layout, as ``DataFrame.to_hdf(path, key)`` writes it (pandas 2.x)."""
    group = fh.create_group(key)
    group.attrs.update({"pandas_type": b"frame", "pandas_version": b"0.15.2", "encoding": b"UTF-8",
                        "errors": b"strict", "ndim": 2, "axis0_variety": b"regular", "axis1_variety": b"regular",
                        "nblocks": len(blocks), "block0_items_variety": b"regular"})  # fmt: skip
    columns = [f"c{i}".encode() for i in range(sum(b.shape[1] for b in blocks))]
    group["axis0"], group["axis1"] = np.array(columns), np.arange(len(blocks[0]))
    start = 0
    for i, values in enumerate(blocks):
        group[f"block{i}_items"] = np.array(columns[start:start + values.shape[1]])
        group[f"block{i}_values"] = values
        group[f"block{i}_values"].attrs["transposed"] = 1
        start += values.shape[1]


def test_pandas_to_hdf_frames_are_read(tmp_path: Path) -> None:
    model, ckpt = _saved(tmp_path, "Tied", 5)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((N, 8)), rng.standard_normal((N, 2))
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        _pandas_frame(fh, "X", [x])
        _pandas_frame(fh, "Y", [y])
    report = audit(ckpt, tmp_path / "d.h5", model_def=f"{NETS}:Tied")
    check(report, model, torch.from_numpy(x), y)
    assert report.data["x_key"] == "X/block0_values"
    assert any("pandas frame 'X'" in a for a in report.model["assumptions"])


def test_pandas_frame_of_several_dtypes_names_its_arrays(tmp_path: Path) -> None:
    _, ckpt = _saved(tmp_path, "Tied", 6)
    rng = np.random.default_rng(6)
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        _pandas_frame(fh, "X", [rng.standard_normal((N, 6)), rng.integers(0, 3, size=(N, 2))])
        fh["Y"] = rng.standard_normal((N, 2))
    result = CliRunner().invoke(audit_app, [str(ckpt), str(tmp_path / "d.h5"), "--model-def", f"{NETS}:Tied",
                                            "--no-features", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    assert "X/block0_values (160, 6) float64" in text and "X/block1_values (160, 2) int64" in text
    assert "--x-key" in text


def test_real_pandas_to_hdf(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("tables")
    model, ckpt = _saved(tmp_path, "Tied", 7)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((N, 8)), rng.standard_normal(N)
    pd.DataFrame(x).to_hdf(tmp_path / "d.h5", key="X")
    pd.Series(y).to_hdf(tmp_path / "d.h5", key="Y")
    model.head = torch.nn.Linear(8, 1).double()
    torch.save(model.state_dict(), ckpt)
    report = audit(ckpt, tmp_path / "d.h5", model_def=f"{NETS}:Tied1")
    check(report, model, torch.from_numpy(x), y)
