"""Layers that read one tensor (q/k/v, gate/up) share one set of statistics and one store dataset.

The reference is the same model with its key/value inputs cloned (distinct tensors, the same values): an
unshared audit. Sharing must not change one metric, must name the first layer per sharing layer, and must
leave one store dataset per distinct input, from which a re-analysis reproduces the report.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nrc_audit
from conftest import write_h5
from nrc_audit.config import AnalysisOptions, AuditConfig, ModelOptions
from nrc_audit.engine.run import reanalyze, run_audit
from nrc_audit.outputs.report import METRIC_FIELDS

NETS = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Attention(nn.Module):
        """inp, then q/k/v on one tensor (or on clones of it), a product, the output projection."""

        def __init__(self, share: bool = True, d: int = 6, h: int = 10, t: int = 3):
            super().__init__()
            self.share = share
            self.inp = nn.Linear(d, h)
            self.query, self.key, self.value = nn.Linear(h, 8), nn.Linear(h, 8), nn.Linear(h, 8)
            self.out = nn.Linear(8, t)

        def forward(self, x):
            z = torch.relu(self.inp(x))
            zk, zv = (z, z) if self.share else (z.clone(), z.clone())
            return self.out(torch.tanh(self.query(z) * self.key(zk)) + self.value(zv))


    def build(share: bool = True) -> nn.Module:
        return Attention(share)
    '''
)


@pytest.fixture
def case(tmp_path: Path) -> dict:
    (tmp_path / "nets.py").write_text(NETS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_shared_nets", tmp_path / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    torch.manual_seed(3)
    model = nets.build().eval()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((240, 6)).astype(np.float32)
    y = (np.tanh(x[:, :3]) + 0.1 * rng.standard_normal((240, 3))).astype(np.float32)
    return {"dir": tmp_path, "data": write_h5(tmp_path / "data.h5", X=x, Y=y),
            "ckpt": nrc_audit.save_checkpoint(model, tmp_path / "attn.safetensors")}  # fmt: skip


def _audit(case: dict, share: bool, store: Path | None = None):
    opts = ModelOptions(model_def=f"{case['dir'] / 'nets.py'}:build", model_kwargs={"share": share})
    return run_audit(AuditConfig(case["ckpt"], case["data"], model=opts, batch_size=64, features_path=store,
                                 analysis=AnalysisOptions(require_collapsed=0), progress=False))  # fmt: skip


def test_shared_inputs_give_the_unshared_metrics_and_one_dataset_per_input(case):
    store = case["dir"] / "features.h5"
    shared, unshared = _audit(case, True, store), _audit(case, False)
    assert [layer.name for layer in shared.layers] == ["inp", "query", "key", "value", "out"]
    assert [layer.shares_input_with for layer in shared.layers] == [None, None, 1, 1, None]
    assert [layer.shares_input_with for layer in unshared.layers] == [None] * 5
    for a, b in zip(shared.layers, unshared.layers):
        for f in METRIC_FIELDS:
            got, want = getattr(a, f), getattr(b, f)
            assert (got is None) == (want is None), (a.name, f)
            if got is not None:
                assert got == pytest.approx(want, abs=1e-12, rel=1e-12), (a.name, f)
    # key and value keep their own W-side metrics
    assert len({layer.stable_rank_w for layer in shared.layers[1:4]}) == 3
    with h5py.File(store, "r") as fh:
        assert sorted(fh["layers"]) == ["00", "01", "04"]  # inp, the q/k/v input once, out
        assert sorted(fh["weights"]) == ["00", "01", "02", "03", "04"]
        assert int(fh["weights/02"].attrs["shares_input_with"]) == 1
    again = reanalyze(store, AnalysisOptions(require_collapsed=0), batch_size=64)  # the audit's blocks: bit for bit
    assert again.to_dict()["layers"] == shared.to_dict()["layers"]
    assert [layer["shares_input_with"] for layer in shared.to_dict()["layers"]] == [None, None, 1, 1, None]
