"""The per-layer analysis at width (core/spectra.py) against the full decompositions it avoids.

The Σ_H path is LAPACK's tridiagonal reduction with part of the back-transformation left out (exact); the W
path is a Ritz approximation accepted only with a proof of its accuracy, else the exact SVD. Both are checked
against numpy's full eigh/SVD, and whole layers against the dense path (FAST_MIN_WIDTH raised out of reach).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nrc_audit.config import Thresholds
from nrc_audit.core import spectra
from nrc_audit.core.conditions import METRIC_FIELDS, layer_metrics
from nrc_audit.core.stats import LayerStatistics


def _relu_stats(n: int, h: int, t: int, seed: int, dead: int = 0) -> LayerStatistics:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, h)) @ (rng.standard_normal((h, h)) / np.sqrt(h)), 0.0)
    x[:, :dead] = 0.0  # dead units: Σ_H is singular, the pseudo-inverse drops their directions
    y = x[:, dead : dead + t] * 3.0 + 0.1 * rng.standard_normal((n, t))
    z = np.hstack([x, y])
    zc = z - z.mean(0)
    s = zc.T @ zc
    return LayerStatistics(n, z[:, :h].mean(0), z[:, h:].mean(0), s[:h, :h], s[:h, h:], s[h:, h:])


def _top_weight(h: int, m: int, seed: int) -> np.ndarray:
    """A weight with a clear top-4 input subspace and a random rest, as after training."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, h)) / np.sqrt(h)
    return w + rng.standard_normal((m, 4)) @ rng.standard_normal((4, h)) * 0.5


def _principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a.T @ b, compute_uv=False)


def test_tridiagonal_feature_spectrum_equals_the_full_eigh():
    st = _relu_stats(1200, 300, 3, seed=1, dead=40)
    sigma, c = st.s_hh / st.n, st.s_hy / st.n
    fast = spectra.feature_spectrum(sigma, c, 5)
    dense = spectra.dense_feature_spectrum(sigma, c, 5)
    assert np.abs(fast.lam - dense.lam).max() <= 1e-12 * dense.lam[0]
    assert _principal_cosines(fast.top, dense.top) == pytest.approx(np.ones(5), abs=1e-10)
    keep = dense.lam > 1e-6 * dense.lam[0]
    quad = lambda sp: float(((sp.coords[keep] ** 2) / sp.lam[keep, None]).sum())  # noqa: E731 — tr(Cᵀ Σ⁺ C)
    assert quad(fast) == pytest.approx(quad(dense), rel=1e-10)


@pytest.mark.parametrize("h, m", [(300, 300), (300, 180), (180, 300)])
def test_certified_weight_spectrum_spans_the_exact_subspace(h, m):
    a = _top_weight(h, m, seed=h + m).T  # (h, m): input space first
    fast = spectra.weight_spectrum(a, 4, 1e-6)
    exact = spectra.exact_weight_spectrum(a)
    assert not fast.exact  # the certificate held: no SVD of the whole weight
    assert fast.count == exact.count == min(h, m)
    assert fast.fro2 == pytest.approx(float((exact.s**2).sum()), rel=1e-12)
    assert fast.s == pytest.approx(exact.s[:5], rel=1e-12)
    assert _principal_cosines(fast.u[:, :4], exact.u[:, :4]) == pytest.approx(np.ones(4), abs=spectra.CERTIFIED_TOL)


def test_uncertifiable_weight_falls_back_to_the_exact_svd():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    s = np.linspace(1.0, 0.1, 300)
    s[4] = s[3] * (1 - 1e-7)  # σ_4 ≈ σ_5: the eigengap verdict is decided by rounding
    tied = (q * s) @ np.linalg.qr(rng.standard_normal((300, 300)))[0]
    assert spectra.weight_spectrum(tied, 4, 1e-6).exact
    s[4] = s[3] * (1 - 2e-6)  # a gap the rule accepts but too small to prove 1e-9 on the subspace
    close = (q * s) @ np.linalg.qr(rng.standard_normal((300, 300)))[0]
    assert spectra.weight_spectrum(close, 4, 1e-6).exact


def test_layer_metrics_at_width_match_the_dense_path(monkeypatch):
    st = _relu_stats(1500, 260, 4, seed=7, dead=30)
    w = _top_weight(260, 260, seed=8)
    got = layer_metrics(st, w, 4, 0.01, 1e-3, Thresholds())
    monkeypatch.setattr(spectra, "FAST_MIN_WIDTH", 10**9)
    want = layer_metrics(st, w, 4, 0.01, 1e-3, Thresholds())
    for name in METRIC_FIELDS:
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-9, rel=1e-9), name
    assert dataclasses.replace(got, **{f: None for f in METRIC_FIELDS}, bound={}) == dataclasses.replace(
        want, **{f: None for f in METRIC_FIELDS}, bound={})
