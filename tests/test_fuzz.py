"""Property-based fuzzing of the readers and the statistics (docs/reliability.md, "Fuzzing").

- Damaged checkpoints (.safetensors, .pt) and forged safetensors headers: ``load_checkpoint`` and
  ``resolve_model`` either succeed or raise :class:`CheckpointError`, never anything else.
- Damaged HDF5 files, and HDF5 files of random shapes and dtypes: ``HDF5Dataset`` either validates and
  yields well-formed batches or raises :class:`DatasetError`.
- Statistics of random shapes, scales, ranks and constant columns: ``layer_metrics`` never raises and
  every metric is a finite number in its range, or None.

Deterministic and bounded for CI (``derandomize=True``, a few hundred examples in all). For a deeper local
search set ``NRC_FUZZ_SCALE`` (e.g. 20): every test runs that many times more examples.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nrc_audit
from conftest import make_mlp, make_xy
from nrc_audit.core.conditions import layer_metrics, target_summary
from nrc_audit.config import DataOptions, ModelOptions, Thresholds
from nrc_audit.errors import CheckpointError, DatasetError
from nrc_audit.models.architecture import resolve_model
from nrc_audit.io.checkpoint import load_checkpoint
from nrc_audit.io.dataset import HDF5Dataset
from nrc_audit.core.stats import JointAccumulator

SCALE = int(os.environ.get("NRC_FUZZ_SCALE", "1"))
MAX_ROW_ELEMENTS = 1 << 16  # a forged shape may ask for terabytes per row: validate it, do not read it


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


_names = itertools.count()


def _fresh(folder: Path, suffix: str) -> Path:
    return folder / f"case{next(_names)}{suffix}"


# ----------------------------------------------------------------------------- byte-level damage


def mutations(size: int, hot: int) -> st.SearchStrategy:
    """Truncations, bit flips and spliced random bytes; positions biased to the first ``hot`` bytes (the header)."""
    pos = st.one_of(st.integers(0, max(0, min(hot, size - 1))), st.integers(0, size - 1))
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(pos, st.integers(0, 7)), min_size=1, max_size=8)),
        st.tuples(st.just("splice"), st.tuples(pos, st.binary(min_size=1, max_size=64))),
        st.tuples(st.just("zero"), st.tuples(pos, st.integers(1, 512))),
    )


def damage(raw: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    b = bytearray(raw)
    if kind == "truncate":
        return bytes(b[:arg])
    if kind == "flip":
        for p, bit in arg:
            b[p] ^= 1 << bit
    elif kind == "splice":
        p, data = arg
        b[p : p + len(data)] = data[: len(b) - p]
    else:
        p, n = arg
        b[p : p + n] = bytes(len(b[p : p + n]))
    return bytes(b)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fuzz")
    model = make_mlp([5, 6, 2], seed=1, bias=True)
    st_path = nrc_audit.save_checkpoint(model, tmp / "m.safetensors", arch={"family": "mlp", "activation": "relu"})
    torch.save({"state_dict": model.state_dict()}, tmp / "m.pt")
    x, y = make_xy(40, 5, 2, seed=2)
    with h5py.File(tmp / "d.h5", "w") as fh:
        fh.create_dataset("train/X", data=x, chunks=(8, 5))
        fh["train/Y"] = y.astype(np.float64)
    st_raw = st_path.read_bytes()
    return Originals(dir=tmp, st=st_raw, st_header=8 + struct.unpack("<Q", st_raw[:8])[0],
                     pt=(tmp / "m.pt").read_bytes(), h5=(tmp / "d.h5").read_bytes())  # fmt: skip


class Originals(dict):
    """The valid files every damage starts from; a short repr keeps hypothesis' failure reports readable."""

    def __init__(self, **files: object) -> None:
        super().__init__(files)

    def __repr__(self) -> str:
        return "<originals>"


def _checkpoint_survives(path: Path) -> None:
    """Load and build: success or CheckpointError; anything else propagates and fails the test."""
    try:
        ckpt = load_checkpoint(path)
        resolved = resolve_model(ckpt, ModelOptions())
    except CheckpointError:
        return
    first = next(m for m in resolved.module.modules() if isinstance(m, torch.nn.Linear))
    with torch.inference_mode():  # whatever was built runs on inputs of its own width
        resolved.module(torch.zeros(3, first.in_features, dtype=first.weight.dtype))




@fuzz(90)
@given(data=st.data())
def test_damaged_safetensors_raise_checkpoint_error(originals, data):
    raw = originals["st"]
    path = _fresh(originals["dir"], ".safetensors")
    path.write_bytes(damage(raw, data.draw(mutations(len(raw), originals["st_header"]))))
    _checkpoint_survives(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a flipped protocol byte: torch warns, then refuses
@fuzz(40)
@given(data=st.data())
def test_damaged_pt_raise_checkpoint_error(originals, data):
    raw = originals["pt"]
    path = _fresh(originals["dir"], ".pt")
    path.write_bytes(damage(raw, data.draw(mutations(len(raw), 600))))
    _checkpoint_survives(path)


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "XYZ"]
tensor_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.lists(st.integers(-1, 12), max_size=3),
    "data_offsets": st.lists(st.integers(-1, 2000), min_size=0, max_size=3),
})  # fmt: skip
header_key = st.sampled_from(["0.weight", "0.bias", "2.weight", "2.bias", "fc.weight", "x"])
metadata = st.one_of(st.none(), st.dictionaries(st.sampled_from(["nrc_audit.arch", "k"]),
                                                st.one_of(st.text(max_size=8), st.just('{"family": "mlp"}'),
                                                          st.integers())))  # fmt: skip


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # forged (0, n) weights
@fuzz(60)
@given(entries=st.dictionaries(header_key, tensor_entry, max_size=4), meta=metadata,
       body=st.integers(0, 1200), pad=st.integers(0, 8))  # fmt: skip
def test_forged_safetensors_headers_raise_checkpoint_error(originals, entries, meta, body, pad):
    """A header that lies about dtypes, shapes, offsets or metadata types is refused, never trusted."""
    header: dict = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header).encode() + b" " * pad
    path = _fresh(originals["dir"], ".safetensors")
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(range(256)) * (body // 256) + bytes(body % 256))
    _checkpoint_survives(path)


@fuzz(90)
@given(data=st.data())
def test_damaged_hdf5_raise_dataset_error(originals, data):
    raw = originals["h5"]
    path = _fresh(originals["dir"], ".h5")
    path.write_bytes(damage(raw, data.draw(mutations(len(raw), 2048))))
    try:
        with HDF5Dataset(path, DataOptions(x_key="train/X", y_key="train/Y")) as ds:
            if math.prod(ds.info.input_shape) <= MAX_ROW_ELEMENTS:
                for _start, x, y in ds.batches(16):
                    assert y.dtype == torch.float64 and bool(torch.isfinite(y).all())
    except DatasetError:
        pass


# ----------------------------------------------------------------------------- random shapes and dtypes

NUMERIC = ["f2", "f4", "f8", "i1", "i4", "i8", "u1", "u2", "?"]
ODD = ["c8", "S3", "compound"]


def _array(draw, shape: tuple[int, ...], dtype: str, poison: bool) -> np.ndarray:
    if dtype == "compound":
        return np.zeros(shape, dtype=[("a", "f4"), ("b", "i2")])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = (rng.standard_normal(shape) * 3).astype("f8")
    if dtype == "S3":
        return a.astype("S3")
    if poison and a.size and np.dtype(dtype).kind in "fc":
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(invalid="ignore", over="ignore"):
        return a.astype(dtype)


@st.composite
def datasets(draw) -> tuple[np.ndarray, np.ndarray, DataOptions]:
    n = draw(st.integers(0, 12))
    x_shape = (draw(st.sampled_from([n, n, n + 1])), *draw(st.lists(st.integers(0, 4), max_size=4)))
    y_shape = (n, *draw(st.lists(st.integers(0, 4), max_size=2)))
    x = _array(draw, x_shape, draw(st.sampled_from(NUMERIC + ODD)), draw(st.booleans()))
    y = _array(draw, y_shape, draw(st.sampled_from(NUMERIC + ODD)), draw(st.booleans()))
    opts = DataOptions(channels_last=draw(st.booleans()), scale_uint8=draw(st.booleans()),
                       limit=draw(st.one_of(st.none(), st.integers(1, 14))))  # fmt: skip
    return x, y, opts


@fuzz(80)
@given(case=datasets(), batch=st.integers(1, 5))
def test_random_shapes_and_dtypes_validate_or_raise_dataset_error(originals, case, batch):
    x, y, opts = case
    path = _fresh(originals["dir"], ".h5")
    with h5py.File(path, "w") as fh:
        fh["X"], fh["Y"] = x, y
    try:
        with HDF5Dataset(path, opts) as ds:
            info = ds.info
            rows = [(start, xb, yb) for start, xb, yb in ds.batches(batch)]
    except DatasetError:
        return
    # what validation promises to everything downstream
    assert x.shape[0] == y.shape[0] and info.num_samples >= info.target_dim + 1
    assert info.num_samples == (x.shape[0] if opts.limit is None else min(opts.limit, x.shape[0]))
    assert len(info.input_shape) in (1, 2, 3, 4) and info.x_kind in ("float", "uint8", "tokens")  # X_NDIMS
    assert [r[0] for r in rows] == list(range(0, info.num_samples, batch))
    assert sum(len(r[1]) for r in rows) == info.num_samples
    for _start, xb, yb in rows:
        assert tuple(xb.shape[1:]) == info.input_shape
        assert yb.shape == (len(xb), info.target_dim) and yb.dtype == torch.float64
        assert bool(torch.isfinite(yb).all())
        if info.x_kind == "tokens":
            assert xb.dtype == torch.int64
        else:
            assert xb.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(xb).all())


# ----------------------------------------------------------------------------- statistics

TH = Thresholds()
UNIT_FIELDS = ("nrc1", "nrc2", "nrc3", "cka_signal", "noise_alignment")  # fractions and cosines: in [0, 1]
POSITIVE_FIELDS = ("nrc4", "nrc4_ratio", "stable_rank", "stable_rank_cov", "stable_rank_w", "bound_lhs", "bound_rhs")


@st.composite
def layers(draw) -> dict:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, h, t = draw(st.integers(2, 40)), draw(st.integers(1, 10)), draw(st.integers(1, 4))
    rank = draw(st.integers(0, h))  # rank-deficient (0: constant) features
    feats = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, h)) if rank else np.zeros((n, h))
    const_cols = draw(st.lists(st.integers(0, h - 1), max_size=h))
    feats[:, const_cols] = 0.0
    scale = 10.0 ** draw(st.floats(-30, 30))
    offset = draw(st.sampled_from([0.0, 1.0, 1e6])) * scale
    feats = feats * scale + offset  # large means on purpose: cancellation must not make numbers up
    y_rank = draw(st.integers(0, t))
    targets = (rng.standard_normal((n, y_rank)) @ rng.standard_normal((y_rank, t)) if y_rank
               else np.zeros((n, t))) * 10.0 ** draw(st.floats(-10, 10))  # fmt: skip
    if draw(st.booleans()):
        weight = rng.standard_normal((draw(st.integers(1, 6)), h))
    else:
        weight = rng.standard_normal((draw(st.integers(1, 4)), h, *draw(st.sampled_from([(1, 1), (3, 3), (1, 2)]))))
    weight *= draw(st.sampled_from([0.0, 1e-20, 1.0, 1e20]))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=4))) if n > 1 else []
    return {"feats": feats, "targets": targets, "weight": weight, "cuts": cuts,
            "k": draw(st.integers(1, t + 2)), "model_mse": draw(st.sampled_from([0.0, 1e-12, 0.3, 1e12, math.nan])),
            "pinv_rtol": draw(st.sampled_from([1e-6, 1e-3, 0.5]))}  # fmt: skip


@fuzz(80)
@given(case=layers())
def test_statistics_never_raise_and_stay_in_range(case):
    acc = JointAccumulator(case["feats"].shape[1])
    for a, b in zip([0, *case["cuts"]], [*case["cuts"], len(case["feats"])]):
        acc.update_pair(torch.from_numpy(case["feats"][a:b]), torch.from_numpy(case["targets"][a:b]))
    stats = acc.finalize()
    got = layer_metrics(stats, case["weight"], case["k"], case["model_mse"], case["pinv_rtol"], TH)
    for name in UNIT_FIELDS:
        value = getattr(got, name)
        assert value is None or (math.isfinite(value) and -1e-9 <= value <= 1 + 1e-9), (name, value)
    for name in POSITIVE_FIELDS:
        value = getattr(got, name)
        assert value is None or (math.isfinite(value) and value >= 0), (name, value)
    assert got.bound_holds in (None, True, False)
    assert set(got.passed) == {"nrc1", "nrc2", "nrc3", "nrc4", "noise_alignment"} and got.collapsed == all(got.passed.values())
    assert all(isinstance(w, str) and w for w in got.warnings)
    defined = {name: getattr(got, name) is not None for name in ("nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio")}
    if not all(defined.values()) and np.trace(stats.s_yy) > 0:  # constant targets are refused before this
        assert got.warnings, defined  # a null metric always comes with its reason

    target = target_summary(stats.s_yy, stats.n, 0.99)
    assert 0 <= target.rank_estimate <= target.dim
    assert all(math.isfinite(v) and v >= 0 for v in target.eigenvalues)
