"""Shared fixtures: small MLP checkpoints and HDF5 datasets built in tmp_path (offline, deterministic)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import nrc_audit

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"


def make_mlp(dims: list[int], seed: int = 0, bias: bool = False) -> nn.Sequential:
    """ReLU MLP ``Linear(d0,d1), ReLU, …, Linear(d_{L-1}, d_L)`` with keys 0.weight, 2.weight, …"""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        mods.append(nn.Linear(a, b, bias=bias))
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def make_xy(n: int, d: int, t: int, seed: int = 0, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs and targets of (intrinsic) rank ``rank`` computed from them, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    r = rank or t
    z = np.tanh(x @ rng.standard_normal((d, r)) / np.sqrt(d))
    y = (z @ rng.standard_normal((r, t)) + 0.05 * rng.standard_normal((n, t))).astype(np.float32)
    return x, y


def write_h5(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as fh:
        for key, value in arrays.items():
            fh[key.replace("__", "/")] = value
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches gain nothing from torch's intra-op pool and lose a lot when the 2 CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mlp_case(tmp_path: Path) -> dict:
    """A 4-layer random ReLU MLP (12→32→32→16→3) saved with arch metadata, plus 300 samples."""
    model = make_mlp([12, 32, 32, 16, 3], seed=1)
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "mlp.safetensors", arch={"family": "mlp", "activation": "relu"})
    x, y = make_xy(300, 12, 3, seed=2)
    data = write_h5(tmp_path / "data.h5", X=x, Y=y)
    return {"model": model, "ckpt": ckpt, "data": data, "x": x, "y": y, "dir": tmp_path}
