"""The default verdicts separate what the paper separates: trained in its regime (SGD with momentum 0.9, MSE,
multi-step LR), a network with weight decay collapses at its last layer and the same network without weight decay
does not, at the default k, on rank-deficient and on full-rank targets (docs/validation.md, "Calibration").
The models are those of validation/calibrate.py's smallest architecture, trained here in a few seconds each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import nrc_audit
from nrc_audit.config import Thresholds

N, D, T = 512, 20, 4


def targets(r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I_20); y from a random width-r two-hidden-layer ReLU net mapped to t = 4 (rank r), plus a
    full-rank linear term when r = t; standardised. The first draw whose units are all alive is used."""
    for attempt in range(100):
        rng = np.random.default_rng(1000 * seed + 10 * r + attempt)
        x = rng.standard_normal((N, D))
        z = np.maximum(np.maximum(x @ rng.standard_normal((D, r)) / math.sqrt(D), 0)
                       @ rng.standard_normal((r, r)) / math.sqrt(r), 0)  # fmt: skip
        y = z @ rng.standard_normal((r, T)) / math.sqrt(r)
        if r == T:
            y = y + 0.3 * y.std() * (x @ rng.standard_normal((D, T)) / math.sqrt(D))
        active = (z > 0).mean(0)
        if ((active > 0.2) & (active < 0.8)).all():
            y = (y - y.mean(0)) / y.std(0)
            return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    raise RuntimeError("no draw")  # pragma: no cover


def trained(x: torch.Tensor, y: torch.Tensor, wd: float, seed: int = 0, epochs: int = 300) -> nn.Sequential:
    """Bias-free ReLU MLP 20→32→32→32→4, He init; SGD lr 0.05, momentum 0.9, batch 64, ×0.1 at 1/3 and 2/3."""
    torch.manual_seed(seed)
    dims = [D, 32, 32, 32, T]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        lin = nn.Linear(a, b, bias=False)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        mods += [lin, nn.ReLU()] if i < len(dims) - 2 else [lin]
    net = nn.Sequential(*mods)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 3, 2 * epochs // 3], gamma=0.1)
    order = torch.Generator().manual_seed(100 + seed)
    for _ in range(epochs):
        perm = torch.randperm(N, generator=order)
        for i in range(0, N, 64):
            idx = perm[i : i + 64]
            loss = ((net(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


@pytest.fixture(scope="module", params=[2, T], ids=["rank-deficient r=2", "full-rank"])
def pair(request):
    """(target rank r, report without weight decay, report with weight decay 1e-2), at the default k."""
    torch.set_num_threads(1)
    x, y = targets(request.param, seed=0)
    reports = [nrc_audit.audit(trained(x, y, wd), [(x, y)], require_collapsed=0) for wd in (0.0, 1e-2)]
    return request.param, *reports


def test_default_k_is_the_targets_rank(pair):
    r, no_wd, wd = pair
    assert no_wd.settings["rank"] == wd.settings["rank"] == r


def test_without_weight_decay_the_last_layer_is_not_collapsed(pair):
    _, no_wd, _ = pair
    last = no_wd.layers[-1]
    assert not last.collapsed
    assert not last.passed["noise_alignment"] or not last.passed["nrc3"]


def test_with_weight_decay_the_last_layer_is_collapsed(pair):
    _, _, wd = pair
    assert wd.layers[-1].collapsed, wd.layers[-1]


def test_the_noise_alignment_separates_them_with_margin(pair):
    """The fifth condition does the separating: the no-weight-decay last layer is far above its threshold and the
    weight-decay one below (the margins measured in the calibration study are larger than the NEAR margin)."""
    _, no_wd, wd = pair
    th = Thresholds().noise_alignment_max
    assert no_wd.layers[-1].noise_alignment > th + 0.05
    assert wd.layers[-1].noise_alignment < th

