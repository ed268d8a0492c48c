"""A collapsed layer whose NRC1 and noise alignment both lie where the calibration study's networks trained without
weight decay were called collapsed too carries a layer warning saying so (docs/validation.md, "Calibration").

Two kinds of evidence: a constructed layer whose every metric is known in closed form (features with exactly
diagonal covariance, a head with a known tilt into the noise directions), audited end to end; and the committed
calibration study's per-layer metrics, re-judged with the package's policy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nrc_audit
from nrc_audit.config import NO_WEIGHT_DECAY_REGION, Thresholds
from nrc_audit.core.verdicts import condition_passed, in_no_weight_decay_region, is_collapsed, verdict_warnings

STUDY = Path(__file__).resolve().parents[1] / "docs" / "calibration_results.json"
WARNING = "collapsed, but"
N = 2000


def constructed(noise_var: float, tilt: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Inputs x (N, 4) with covariance exactly diag(1, 1, s², s²) (orthonormal centred columns); targets y = x[:, :2];
    a linear net x → I₄ → W = [I₂ | tilt·I₂]. The head's closed forms (k = t = 2):
    NRC1 = s²/(1 + s²); NRC3 = 1/√(1 + tilt²); noise alignment = tilt/√(1 + tilt²); probe MSE 0 (NRC4 ratio 0)."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((N, 4))
    q, _ = np.linalg.qr(m - m.mean(0))
    x = math.sqrt(N) * q * np.array([1.0, 1.0, math.sqrt(noise_var), math.sqrt(noise_var)])
    first = nn.Linear(4, 4, bias=False, dtype=torch.float64)
    head = nn.Linear(4, 2, bias=False, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4, dtype=torch.float64))
        head.weight.copy_(torch.cat([eye, tilt * eye], dim=1))
    xt = torch.tensor(x, dtype=torch.float64)
    return nn.Sequential(first, head), xt, xt[:, :2].clone()


def head_of(noise_var: float, tilt: float):
    model, x, y = constructed(noise_var, tilt)
    return nrc_audit.audit(model, [(x, y)], require_collapsed=0).layers[-1]


@pytest.mark.parametrize("noise_var, tilt, warned", [
    (0.25, 0.374, True),  # NRC1 0.20, noise alignment 0.35: where λ = 0 ResNet heads lie
    (0.25, 0.10, False),  # NRC1 0.20 but W reads almost no noise (the shipped ResNet sample's case)
    (1 / 9, 0.374, False),  # NRC1 0.10: little noise to read
])  # fmt: skip
def test_a_collapsed_head_is_warned_only_when_both_values_are_high(noise_var, tilt, warned):
    layer = head_of(noise_var, tilt)
    # the metrics are the closed forms (an independent reference), so the region is tested where it is meant
    assert layer.nrc1 == pytest.approx(noise_var / (1 + noise_var), abs=1e-9)
    assert layer.nrc3 == pytest.approx(1 / math.sqrt(1 + tilt**2), abs=1e-9)
    assert layer.noise_alignment == pytest.approx(tilt / math.sqrt(1 + tilt**2), abs=1e-9)
    assert layer.collapsed, layer.passed
    assert any(w.startswith(WARNING) for w in layer.warnings) is warned, layer.warnings


def test_the_warning_names_the_values_and_the_region():
    (message,) = [w for w in head_of(0.25, 0.374).warnings if w.startswith(WARNING)]
    assert "nrc1 0.2 > 0.12" in message and "noise_alignment 0.35 > 0.3" in message
    assert "docs/validation.md" in message


def test_a_layer_that_is_not_collapsed_is_never_warned_for_the_region():
    values = {"nrc1": 0.2, "nrc2": 0.9, "nrc3": 0.5, "nrc4_ratio": 0.5, "noise_alignment": 0.4}  # fails NRC3
    assert not is_collapsed(condition_passed(values, Thresholds()))
    assert not any(w.startswith(WARNING) for w in verdict_warnings(values, Thresholds()))


@pytest.mark.parametrize("field", sorted(NO_WEIGHT_DECAY_REGION))
def test_the_region_is_open_at_each_bound(field):
    inside = {f: b + 0.01 for f, b in NO_WEIGHT_DECAY_REGION.items()}
    assert in_no_weight_decay_region(inside, collapsed=True)
    assert not in_no_weight_decay_region(inside, collapsed=False)
    assert not in_no_weight_decay_region({**inside, field: NO_WEIGHT_DECAY_REGION[field]}, collapsed=True)
    assert not in_no_weight_decay_region({**inside, field: None}, collapsed=True)


def _study_last_layers() -> list[tuple[dict, dict]]:
    runs = json.loads(STUDY.read_text())["runs"]
    fitted = [r for r in runs if r["model_mse"] <= 0.1 * r["target_variance"]]
    return [(r, r["audits"]["auto"]["layers"][-1]) for r in fitted]


def test_in_the_study_every_no_weight_decay_network_fails_or_is_warned():
    """The issue's claim for the default k: each λ = 0 network's last layer is not collapsed, or its report says the
    collapse is in the no-weight-decay region."""
    zero = [(r, layer) for r, layer in _study_last_layers() if r["wd"] == 0]
    assert len(zero) == 36
    unflagged = [(r["arch"], r["target"], r["seed"]) for r, layer in zero
                 if is_collapsed(condition_passed(layer, Thresholds()))
                 and not any(w.startswith(WARNING) for w in verdict_warnings(layer, Thresholds()))]  # fmt: skip
    assert unflagged == []


def test_in_the_study_no_well_decayed_network_is_warned():
    """The warning is not a blanket: no last layer of a λ ≥ 1e-2 model of the study carries it."""
    decayed = [(r, layer) for r, layer in _study_last_layers() if r["wd"] >= 1e-2]
    assert len(decayed) >= 60
    warned = [(r["arch"], r["target"], r["wd"], r["seed"]) for r, layer in decayed
              if any(w.startswith(WARNING) for w in verdict_warnings(layer, Thresholds()))]  # fmt: skip
    assert warned == []


NOISE_ONLY = "not collapsed by the noise condition alone"


@pytest.mark.parametrize("noise_var, tilt, warned", [
    (1 / 99, 1 / math.sqrt(3), True),  # NRC1 0.01, NRC3 0.866, noise alignment 0.5: fails the noise condition only
    (1 / 99, 0.855, False),  # noise alignment 0.65: above the band the decayed rank-1 MLPs ended in
    (0.5, 1 / math.sqrt(3), False),  # NRC1 0.33 fails too: not the noise condition alone
    (1 / 99, 0.374, False),  # noise alignment 0.35: collapsed, nothing to warn
])  # fmt: skip
def test_a_head_failing_only_the_noise_condition_is_warned(noise_var, tilt, warned):
    layer = head_of(noise_var, tilt)
    assert layer.noise_alignment == pytest.approx(tilt / math.sqrt(1 + tilt**2), abs=1e-9)  # the closed form
    assert layer.nrc1 == pytest.approx(noise_var / (1 + noise_var), abs=1e-9)
    messages = [w for w in layer.warnings if w.startswith(NOISE_ONLY)]
    assert bool(messages) is warned, layer.warnings
    if warned:
        assert not layer.collapsed and "noise alignment 0.5 > 0.45" in messages[0] and "--noise-alignment-max 1" in messages[0]


def test_in_the_study_the_decayed_rank_1_mlps_that_fail_are_warned_and_no_undecayed_mlp_is():
    """The misses of docs/validation.md: every λ ≥ 1e-2 MLP whose last layer is not collapsed fails only the noise
    condition and is warned; no λ = 0 MLP gets this warning (they fail NRC3 as well)."""
    def warned(layer: dict) -> bool:
        return any(w.startswith(NOISE_ONLY) for w in verdict_warnings(layer, Thresholds()))

    last = [(r, layer) for r, layer in _study_last_layers() if r["arch"].startswith("mlp")]
    missed = [(r, layer) for r, layer in last
              if r["wd"] >= 1e-2 and not is_collapsed(condition_passed(layer, Thresholds()))]  # fmt: skip
    assert len(missed) >= 6 and all(warned(layer) for _, layer in missed), [layer for _, layer in missed]
    assert not any(warned(layer) for r, layer in last if r["wd"] == 0)
