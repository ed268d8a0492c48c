"""SPEC §4 metrics of ``nrc_audit.core.conditions`` against the independent dense reference in tests/reference.py.

The package sees only streamed statistics (built here through ``JointAccumulator`` from the same H and Y);
the reference sees the full matrices and takes another route (SVDs, N×N Grams and projectors, explicit
least squares). Tolerances: 1e-6 absolute on nrc1/nrc2/cka_signal/bound lhs and rhs; 1e-6 relative on
nrc4/nrc4_ratio (plus a float64 floor, see ``_assert_nrc4_close``) and on stable ranks; 1e-6 absolute on
nrc3/noise_alignment, compared only where the eigengap rule of tests/reference.py holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from nrc_audit.core.conditions import layer_metrics, target_summary
from nrc_audit.core.verdicts import collapse_onset, gate
from nrc_audit.config import NEAR_MARGIN, NOISE_ONLY_FAILURE_MAX, Thresholds
from nrc_audit.core.stats import JointAccumulator, LayerStatistics

from reference import (  # tests/ is on sys.path (pytest's rootdir-relative import), as for conftest
    CUT_MARGIN_MIN,
    FIELDS,
    cut_margins,
    eigengaps,
    reference_metrics,
    reference_target_rank,
    subspaces_comparable,
)

TH = Thresholds()
RTOL = 1e-3  # SPEC default pinv_rtol


pytestmark = pytest.mark.usefixtures("one_torch_thread")
ABS_FIELDS = ("nrc1", "nrc2", "bound_lhs", "bound_rhs")
SUBSPACE_FIELDS = ("nrc3", "noise_alignment", "cka_signal")
STABLE_FIELDS = ("stable_rank", "stable_rank_cov", "stable_rank_w")
METRIC_FIELDS = FIELDS  # every per-layer field, as the reference computes them


def stats_of(feats: np.ndarray, targets: np.ndarray, batch: int = 37) -> LayerStatistics:
    """Stream (N, h) features and (N, t) targets through JointAccumulator in fixed-size batches."""
    if targets.ndim == 1:
        targets = targets[:, None]
    acc = JointAccumulator(feats.shape[1])
    for i in range(0, len(feats), batch):
        acc.update_pair(torch.from_numpy(feats[i : i + batch]), torch.from_numpy(targets[i : i + batch]))
    return acc.finalize()


def white_columns(rng: np.random.Generator, n: int, p: int) -> np.ndarray:
    """(n, p) centred columns, mutually orthogonal, each with sample variance exactly 1 (up to rounding)."""
    a = rng.standard_normal((n, p))
    q, _ = np.linalg.qr(a - a.mean(axis=0))  # columns ⟂ 1 because a is centred
    return q * math.sqrt(n)


# ----------------------------------------------------------------------------- synthetic cases


@dataclass
class Case:
    name: str
    feats: np.ndarray  # (N, h)
    targets: np.ndarray  # (N, t)
    weight: np.ndarray  # (out, h) or (c_out, h, kh, kw)
    k: int
    model_mse: float = 0.05
    pinv_rtol: float = RTOL
    subspace_defined: bool = True  # expected outcome of the eigengap rule


def _signal_case(name, seed, n, h, t, k, weight_shape, mean=5.0, noise=0.3, y_noise=0.1, dtype=np.float64) -> Case:
    """Low-rank signal (rank t) plus isotropic noise; targets linear in the signal; W partly aligned."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, t)) * np.linspace(3.0, 1.0, t)  # (N, t) latent signal, distinct scales
    a = rng.standard_normal((t, h))  # signal directions in feature space
    feats = z @ a + noise * rng.standard_normal((n, h)) + mean  # (N, h)
    feats = feats.astype(dtype).astype(np.float64)  # what the reference sees = what the accumulator sees
    targets = z @ rng.standard_normal((t, t)) + y_noise * rng.standard_normal((n, t))  # (N, t)
    if len(weight_shape) == 2:
        out = weight_shape[0]
        mix = rng.standard_normal((out, t))
        weight = rng.standard_normal((out, h)) * 0.5 + mix @ a  # rows lean towards the signal span
    else:
        c_out, _, kh, kw = weight_shape
        weight = rng.standard_normal(weight_shape) * 0.5
        weight += np.einsum("ot,th,ab->ohab", rng.standard_normal((c_out, t)), a, np.ones((kh, kw)) / (kh * kw))
    return Case(name, feats, targets, weight, k)


def _cases() -> list[Case]:
    cases = []
    cases.append(_signal_case("linear_k_eq_t", 0, 300, 12, 3, 3, (3, 12)))
    cases.append(_signal_case("linear_square_hidden_weight", 1, 250, 10, 2, 2, (10, 10)))
    cases.append(_signal_case("linear_k_lt_t", 2, 300, 12, 4, 2, (4, 12)))
    cases.append(_signal_case("conv2d_k_lt_t", 3, 200, 8, 4, 2, (6, 8, 3, 3)))
    cases.append(_signal_case("conv2d_k_eq_t", 4, 200, 8, 3, 3, (4, 8, 3, 3)))
    cases.append(_signal_case("conv2d_1x1", 5, 150, 9, 2, 2, (5, 9, 1, 1)))
    cases.append(_signal_case("float32_large_mean", 6, 400, 16, 3, 3, (3, 16), mean=1e3, dtype=np.float32))
    cases.append(_signal_case("wide_layer_few_samples", 7, 40, 60, 2, 2, (2, 60), noise=0.05))
    # h − k < k: U_⊥ᵀV_k has only h − k singular values; noise_alignment still divides by k.
    cases.append(_signal_case("narrow_layer_h_minus_k_lt_k", 12, 200, 4, 3, 3, (3, 4), noise=0.8))

    # ReLU-like features: non-negative, large mean, the realistic hidden-layer shape.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((350, 6))
    feats = np.maximum(x @ rng.standard_normal((6, 14)), 0.0) + 20.0
    targets = np.tanh(x[:, :3]) @ rng.standard_normal((3, 3))
    cases.append(Case("relu_features", feats, targets, rng.standard_normal((14, 14)), 3))

    # Rank-deficient targets: Y = z b (rank 1) with t = 3; nominal k = t and intrinsic k = 1.
    rng = np.random.default_rng(9)
    z = rng.standard_normal((300, 3)) * [2.0, 1.0, 0.5]
    feats = z @ rng.standard_normal((3, 10)) + 0.2 * rng.standard_normal((300, 10))
    targets = np.outer(z[:, 0], [1.0, -2.0, 0.5])  # (N, 3), rank 1
    w = rng.standard_normal((3, 10))
    cases.append(Case("rank_deficient_y_k3", feats, targets, w, 3))
    cases.append(Case("rank_deficient_y_k1", feats, targets, w, 1))

    # The pseudo-inverse cut matters: a feature direction at 3.3e-4 of the top singular value carries unit
    # variance of y₁, and Y has a component at 3.2e-4 of its top singular value. rtol = 1e-3 drops both;
    # rtol = 1e-4 keeps both (and then Y lies exactly in the span of H).
    rng = np.random.default_rng(10)
    base = white_columns(rng, 200, 4) * [3.0, 2.0, 1.0, 1e-3]  # (N, 4) orthogonal, known scales
    feats = base @ np.linalg.qr(rng.standard_normal((6, 6)))[0][:4]  # (N, 6), rank 4
    targets = np.column_stack([base[:, 0] + base[:, 3] * 1e3, base[:, 1], base[:, 3]])
    w = rng.standard_normal((3, 6))
    cases.append(Case("truncation_drops_tiny_direction", feats, targets, w, 2, pinv_rtol=1e-3))
    cases.append(Case("truncation_keeps_tiny_direction", feats, targets, w, 2, pinv_rtol=1e-4))

    # Tied top eigenvalues (isotropic signal), k inside the tie: U_k is ill-defined; skip subspace fields.
    rng = np.random.default_rng(11)
    yw = white_columns(rng, 200, 3)
    targets = yw * [3.0, 1.0, 0.3]
    feats = yw @ np.linalg.qr(rng.standard_normal((8, 3)))[0].T + 4.0  # (N, 8): λ = 1, 1, 1, 0, …
    cases.append(Case("tied_isotropic_k_inside_tie", feats, targets, rng.standard_normal((3, 8)), 1,
                      subspace_defined=False))
    return cases


CASES = _cases()


def _assert_nrc4_close(got: float, want: float, feats: np.ndarray, targets: np.ndarray, rtol: float) -> None:
    """1e-6 relative, with an absolute floor of max(1e-11, 1e-14·κ) · tr Σ_Y / t.

    The package computes nrc4 = (tr Σ_Y − tr(Cᵀ Σ_H⁺ C))/t from statistics. Rounding of order ε·λ_1 in the
    smallest kept eigenvalue λ_min is relative error ε·κ (κ = λ_1/λ_min of the kept part) in its term,
    and the subtraction leaves an absolute error of order ε·κ·tr Σ_Y: a near-perfect fit, or a fit that
    leans on a direction near the cut, has few correct *relative* digits. The floor is that bound with a
    safety factor of ~50; for every non-exact-fit case here it is far below 1e-6·nrc4.
    """
    yc = targets - targets.mean(axis=0)
    s = np.linalg.svd(feats - feats.mean(axis=0), compute_uv=False)
    kept = s[s > rtol * s[0]]
    kappa = float(kept[0] ** 2 / kept[-1] ** 2)
    floor = max(1e-11, 1e-14 * kappa) * float(np.sum(yc**2)) / yc.size
    assert abs(got - want) <= 1e-6 * abs(want) + floor, (got, want, floor)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_metrics_match_dense_reference(case: Case):
    stats = stats_of(case.feats, case.targets)
    got = layer_metrics(stats, case.weight, case.k, case.model_mse, case.pinv_rtol, TH)
    want = reference_metrics(case.feats, case.targets, case.weight, case.k, case.model_mse, case.pinv_rtol)

    # Preconditions of the comparison (tests/reference.py docstring): not at a truncation cut, and the
    # eigengap rule decides whether subspace-dependent fields are comparable.
    margin_h, margin_y = cut_margins(case.feats, case.targets, case.pinv_rtol)
    assert min(margin_h, margin_y) > CUT_MARGIN_MIN
    comparable = subspaces_comparable(case.feats, case.weight, case.k)
    assert comparable == case.subspace_defined, eigengaps(case.feats, case.weight, case.k)
    # an ill-defined subspace is reported, never silently turned into a number
    ill_defined = [w for w in got.warnings if "ill-defined" in w]
    assert bool(ill_defined) == (not comparable), got.warnings
    got.warnings = [w for w in got.warnings if w not in ill_defined]
    # a value within NEAR_MARGIN of its threshold is warned about, judged on the reference value, when its
    # condition decides the verdict (the layer passes every other condition)
    near = [w for w in got.warnings if w.startswith("near threshold: ")]
    limits = {"nrc1": TH.nrc1_max, "nrc2": TH.nrc2_min, "nrc3": TH.nrc3_min, "nrc4_ratio": TH.nrc4_ratio_max,
              "noise_alignment": TH.noise_alignment_max}  # fmt: skip
    close = {f for f, limit in limits.items() if want[f] is not None and getattr(got, f) is not None
             and abs(want[f] - limit) <= NEAR_MARGIN * (limit if f == "nrc4_ratio" else 1.0)}  # fmt: skip
    failing = {("nrc4_ratio" if k == "nrc4" else k) for k, ok in got.passed.items() if not ok}
    want_near = {f for f in close if failing <= {f}}
    assert {w.split()[2] for w in near} == want_near, near
    got.warnings = [w for w in got.warnings if w not in near]
    # a layer passing NRC1–NRC4 that fails only the noise condition, by at most NOISE_ONLY_FAILURE_MAX, says so
    noise_only = [w for w in got.warnings if w.startswith("not collapsed by the noise condition alone")]
    na = want["noise_alignment"]
    four_pass = all(got.passed[k] for k in ("nrc1", "nrc2", "nrc3", "nrc4"))
    assert bool(noise_only) == (four_pass and na is not None and TH.noise_alignment_max < na <= NOISE_ONLY_FAILURE_MAX)
    got.warnings = [w for w in got.warnings if w not in noise_only]

    assert got.warnings == []
    undefined = set() if comparable else {"nrc3", "noise_alignment"}  # an ill-defined subspace gives null
    if eigengaps(case.feats, case.weight, case.k)[0] <= 1e-6:
        undefined.add("cka_signal")
    for name in undefined:
        assert getattr(got, name) is None, name
    for name in METRIC_FIELDS:
        if name not in undefined:
            assert (getattr(got, name) is None) == (want[name] is None), name
    for name in ABS_FIELDS:
        assert getattr(got, name) == pytest.approx(want[name], abs=1e-6), name
    for name in STABLE_FIELDS:
        assert getattr(got, name) == pytest.approx(want[name], rel=1e-6), name
    _assert_nrc4_close(got.nrc4, want["nrc4"], case.feats, case.targets, case.pinv_rtol)
    assert got.nrc4_ratio == pytest.approx(got.nrc4 / case.model_mse, rel=1e-12)
    _assert_nrc4_close(got.nrc4_ratio * case.model_mse, want["nrc4_ratio"] * case.model_mse, case.feats,
                       case.targets, case.pinv_rtol)
    if comparable:
        for name in SUBSPACE_FIELDS:
            assert getattr(got, name) == pytest.approx(want[name], abs=1e-6), name
    if abs(want["bound_lhs"] - want["bound_rhs"]) > 1e-6:
        assert got.bound_holds == want["bound_holds"]

    # Verdicts follow the reference values and the default thresholds (away from the thresholds).
    expect = {
        "nrc1": want["nrc1"] <= TH.nrc1_max,
        "nrc2": want["nrc2"] >= TH.nrc2_min,
        "nrc3": want["nrc3"] >= TH.nrc3_min,
        "nrc4": want["nrc4_ratio"] <= TH.nrc4_ratio_max,
        "noise_alignment": (want["noise_alignment"] <= TH.noise_alignment_max if want["noise_alignment"] is not None
                            else want["nrc3"] is not None),
    }
    assert set(got.passed) == set(expect)
    if not comparable:
        assert got.passed["nrc3"] is False  # a null metric fails its condition
    for name, value in (("nrc1", TH.nrc1_max), ("nrc2", TH.nrc2_min), ("nrc3", TH.nrc3_min),
                        ("noise_alignment", TH.noise_alignment_max)):
        if want[name] is not None and (comparable or name not in ("nrc3", "noise_alignment")):
            if abs(want[name] - value) > 1e-6:
                assert got.passed[name] == expect[name], name
    assert got.collapsed == all(got.passed.values())


def test_truncation_cut_changes_nrc4_as_the_reference_does():
    """The two truncation cases must differ (so the cut is really exercised) in nrc4 and bound lhs."""
    drop, keep = (c for c in CASES if c.name.startswith("truncation_"))
    m_drop = layer_metrics(stats_of(drop.feats, drop.targets), drop.weight, 2, 0.05, drop.pinv_rtol, TH)
    m_keep = layer_metrics(stats_of(keep.feats, keep.targets), keep.weight, 2, 0.05, keep.pinv_rtol, TH)
    assert m_drop.nrc4 > 0.1  # the tiny direction carried unit-variance target signal, now lost
    assert m_keep.nrc4 < 1e-6
    assert m_drop.bound_lhs != pytest.approx(m_keep.bound_lhs, abs=1e-3)


def test_linear_weight_uses_right_singular_vectors():
    """A square hidden-layer W whose *left* and *right* input subspaces differ: only the right one aligns."""
    rng = np.random.default_rng(12)
    yw = white_columns(rng, 150, 2)
    basis = np.linalg.qr(rng.standard_normal((6, 6)))[0]  # orthonormal (6, 6)
    feats = yw * [2.0, 1.0] @ basis[:, :2].T  # features live in span(basis[:, :2])
    # W = P Qᵀ: right singular vectors = basis[:, :2] (feature space), left ones = basis[:, 2:4].
    weight = basis[:, 2:4] @ np.diag([3.0, 2.0]) @ basis[:, :2].T  # (6, 6)
    got = layer_metrics(stats_of(feats, yw), weight, 2, 0.05, RTOL, TH)
    assert got.nrc3 == pytest.approx(1.0, abs=1e-9)
    assert got.noise_alignment == pytest.approx(0.0, abs=1e-7)
    wrong = layer_metrics(stats_of(feats, yw), weight.T, 2, 0.05, RTOL, TH)
    assert wrong.nrc3 == pytest.approx(0.0, abs=1e-7)
    assert wrong.noise_alignment == pytest.approx(1.0, abs=1e-9)


def test_conv2d_weight_uses_input_channel_subspace():
    """Conv2d (c_out, c_in, kh, kw): the input-channel subspace is what NRC3 compares with the features."""
    rng = np.random.default_rng(13)
    c_in, c_out = 5, 7
    yw = white_columns(rng, 120, 2)
    basis = np.linalg.qr(rng.standard_normal((c_in, c_in)))[0]
    feats = yw * [2.0, 1.0] @ basis[:, :2].T  # (N, c_in)
    weight = np.einsum("oi,ab->oiab", rng.standard_normal((c_out, 2)) @ basis[:, :2].T, rng.standard_normal((3, 3)))
    got = layer_metrics(stats_of(feats, yw), weight, 2, 0.05, RTOL, TH)
    assert got.nrc3 == pytest.approx(1.0, abs=1e-9)
    assert got.noise_alignment == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- known answers


def test_paper_notes_whitened_targets_bound_lhs_zero_cka_below_one():
    """PAPER_NOTES §1 numeric check: N=2000, t=3, target std devs 3/1/0.3, H = whitened Y × orthonormal map.

    Then col(H_c) = col(Y_c), so ‖(I − P_Y)H_c‖ = 0 and H predicts Y exactly, while Σ_H is isotropic on its
    span and Σ_Y is not, so by hand CKA = tr Σ_Y / (√t ‖Σ_Y‖_F) = 10.09/(√3·9.0554) ≈ 0.643 < 1.
    """
    rng = np.random.default_rng(14)
    n, t, h = 2000, 3, 8
    targets = rng.standard_normal((n, t)) * [3.0, 1.0, 0.3] + [1.0, -2.0, 0.5]  # (N, t), anisotropic
    yc = targets - targets.mean(axis=0)
    sigma_y = yc.T @ yc / n
    whitened = yc @ np.linalg.inv(np.linalg.cholesky(sigma_y)).T  # sample covariance = I_t
    q = np.linalg.qr(rng.standard_normal((h, t)))[0]  # (h, t) orthonormal columns
    feats = whitened @ q.T + 7.0  # (N, h)
    weight = rng.standard_normal((t, t)) @ q.T  # W's input space = span(q)

    got = layer_metrics(stats_of(feats, targets), weight, t, 0.01, RTOL, TH)
    by_hand = np.trace(sigma_y) / (math.sqrt(t) * np.linalg.norm(sigma_y))
    assert by_hand == pytest.approx(10.09 / (math.sqrt(3) * math.sqrt(81 + 1 + 0.0081)), abs=0.02)
    assert got.nrc2 == pytest.approx(by_hand, abs=1e-9)
    assert got.cka_signal == pytest.approx(by_hand, abs=1e-9)
    assert got.nrc1 == pytest.approx(0.0, abs=1e-12)
    assert got.bound_lhs == pytest.approx(0.0, abs=1e-6)
    assert got.bound_rhs == pytest.approx(math.sqrt(1 - by_hand), abs=1e-6)
    assert got.bound_holds is True
    assert got.nrc4 == pytest.approx(0.0, abs=1e-10)
    assert got.nrc3 == pytest.approx(1.0, abs=1e-9)
    assert got.noise_alignment == pytest.approx(0.0, abs=1e-7)
    assert got.stable_rank == pytest.approx(3.0, rel=1e-9)  # λ = 1, 1, 1, 0, …
    assert got.stable_rank_cov == pytest.approx(3.0, rel=1e-9)
    assert got.passed == {"nrc1": True, "nrc2": True, "nrc3": True, "nrc4": True, "noise_alignment": True}
    assert got.collapsed is True


def test_orthonormal_map_of_targets_has_cka_one():
    """CKA is invariant under orthonormal maps: H = Y Qᵀ gives nrc2 = 1 and bound lhs = 0 (no whitening)."""
    rng = np.random.default_rng(15)
    targets = rng.standard_normal((300, 3)) * [3.0, 1.0, 0.3]
    q = np.linalg.qr(rng.standard_normal((6, 3)))[0]
    got = layer_metrics(stats_of(targets @ q.T, targets), q.T, 3, 0.01, RTOL, TH)
    assert got.nrc2 == pytest.approx(1.0, abs=1e-12)
    assert got.bound_lhs == pytest.approx(0.0, abs=1e-6)


def test_bound_can_fail_and_is_reported_not_raised():
    """h = t = k = 2, Σ_H = I, Y = [h₁, s·w] with w ⟂ H: Proposition 1 is violated (SPEC: a finding).

    By hand: C = [[1, 0], [0, 0]], Σ_Y = diag(1, s²) ⇒ lhs² = 1 − tr(CΣ_Y⁻¹Cᵀ)/tr Σ_H = 1/2,
    nrc1 = 0 (k = h), nrc2 = 1/(√2·√(1 + s⁴)), rhs = √(1 − nrc2) < lhs for small s.
    """
    rng = np.random.default_rng(16)
    s = 0.1
    cols = white_columns(rng, 500, 3)  # h1, h2, w: orthogonal, unit variance
    feats = cols[:, :2] + [3.0, -1.0]
    targets = np.column_stack([cols[:, 0], s * cols[:, 2]])
    got = layer_metrics(stats_of(feats, targets), np.eye(2), 2, 0.01, RTOL, TH)
    nrc2 = 1.0 / (math.sqrt(2.0) * math.sqrt(1.0 + s**4))
    assert got.nrc1 == pytest.approx(0.0, abs=1e-12)
    assert got.nrc2 == pytest.approx(nrc2, abs=1e-9)
    assert got.bound_lhs == pytest.approx(math.sqrt(0.5), abs=1e-9)
    assert got.bound_rhs == pytest.approx(math.sqrt(1.0 - nrc2), abs=1e-9)
    assert got.bound_holds is False
    assert got.warnings == []
    assert got.nrc4 == pytest.approx(s**2 / 2, rel=1e-9)  # y₂ ⟂ H: its whole variance is residual
    assert got.nrc3 == pytest.approx(1.0, abs=1e-12)
    assert got.noise_alignment == 0.0


def test_exactly_collapsed_layer_satisfies_the_bound():
    """Isotropic Y, H = Y Qᵀ: lhs = 0, nrc1 = 0, nrc2 = 1, so rhs = 0 and the bound holds with equality.

    lhs = √max(0, 1 − x) and rhs = √nrc1 + √(1 − nrc2) turn relative rounding of ε ≈ 1e-16 into absolute
    errors of √ε ≈ 1e-8 in both, so ``lhs ≤ rhs + 1e-9`` fails for a good fraction of seeds.
    """
    failures = []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        yw = white_columns(rng, 200, 3)
        q = np.linalg.qr(rng.standard_normal((8, 3)))[0]
        got = layer_metrics(stats_of(yw @ q.T, yw), q.T, 3, 0.1, RTOL, TH)
        if not got.bound_holds:
            failures.append((seed, got.bound_lhs, got.bound_rhs))
    assert failures == []


# ----------------------------------------------------------------------------- degenerate layers


def _data(seed=17, n=120, h=6, t=2):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, h)) @ rng.standard_normal((h, h)) + 1.0
    targets = feats[:, :t] @ rng.standard_normal((t, t)) + 0.5 * rng.standard_normal((n, t))
    return feats, targets, rng.standard_normal((t, h))


FEATURE_METRICS = tuple(f for f in METRIC_FIELDS if f != "stable_rank_w")


@pytest.mark.parametrize("value", [0.0, 0.1, 1e4, np.float32(0.3)])
def test_constant_features_give_none_and_a_warning(value):
    _, targets, weight = _data()
    feats = np.full((120, 6), value, dtype=np.float64)
    got = layer_metrics(stats_of(feats, targets, batch=7), weight, 2, 0.05, RTOL, TH)
    for name in FEATURE_METRICS:
        assert getattr(got, name) is None, name
    assert got.stable_rank_w is not None  # the weight is fine
    assert any("constant" in w for w in got.warnings)
    assert got.passed == {"nrc1": False, "nrc2": False, "nrc3": False, "nrc4": False, "noise_alignment": False}
    assert got.collapsed is False


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_features_give_none_and_a_warning(bad):
    feats, targets, weight = _data()
    feats[[4, 50, 51], 2] = bad
    stats = stats_of(feats, targets)
    assert stats.nonfinite_rows == 3
    got = layer_metrics(stats, weight, 2, 0.05, RTOL, TH)
    for name in FEATURE_METRICS:
        assert getattr(got, name) is None, name
    assert any("3 of 120 samples" in w and "NaN/Inf" in w for w in got.warnings)
    assert got.collapsed is False and not any(got.passed.values())


def test_fewer_feature_dims_than_k():
    rng = np.random.default_rng(18)
    feats = rng.standard_normal((100, 2)) * [2.0, 1.0]
    targets = feats @ rng.standard_normal((2, 3)) + 0.1 * rng.standard_normal((100, 3))
    weight = rng.standard_normal((4, 2))
    got = layer_metrics(stats_of(feats, targets), weight, 3, 0.05, RTOL, TH)
    want = reference_metrics(feats, targets, weight, 3, 0.05, RTOL)
    for name in ("nrc1", "nrc3", "cka_signal", "noise_alignment", "bound_lhs", "bound_rhs", "bound_holds"):
        assert getattr(got, name) is None and want[name] is None, name
    assert any("2 feature dims, fewer than the rank k=3" in w for w in got.warnings)
    assert got.nrc2 == pytest.approx(want["nrc2"], abs=1e-6)
    _assert_nrc4_close(got.nrc4, want["nrc4"], feats, targets, RTOL)
    assert got.stable_rank == pytest.approx(want["stable_rank"], rel=1e-6)
    assert got.passed["nrc1"] is False and got.passed["nrc3"] is False
    assert got.collapsed is False


def test_k_equal_to_h_has_zero_noise_and_empty_noise_subspace():
    feats, targets, _ = _data(h=3, t=3)
    weight = np.random.default_rng(19).standard_normal((3, 3))
    got = layer_metrics(stats_of(feats, targets), weight, 3, 0.05, RTOL, TH)
    want = reference_metrics(feats, targets, weight, 3, 0.05, RTOL)
    assert got.nrc1 == pytest.approx(0.0, abs=1e-15)
    assert got.nrc3 == pytest.approx(1.0, abs=1e-9)  # both subspaces are the whole space
    assert got.noise_alignment == 0.0 and want["noise_alignment"] == pytest.approx(0.0, abs=1e-12)


def test_zero_model_mse_leaves_nrc4_ratio_undefined():
    feats, targets, weight = _data()
    got = layer_metrics(stats_of(feats, targets), weight, 2, 0.0, RTOL, TH)
    assert got.nrc4 is not None and got.nrc4 > 0
    assert got.nrc4_ratio is None
    assert any("MSE is 0" in w for w in got.warnings)
    assert got.passed["nrc4"] is False
    assert got.collapsed is False


@pytest.mark.parametrize("shape", [(2, 6), (4, 6, 3, 3)], ids=["linear", "conv2d"])
def test_all_zero_weight(shape):
    feats, targets, _ = _data()
    weight = np.zeros(shape)
    got = layer_metrics(stats_of(feats, targets), weight, 2, 0.05, RTOL, TH)
    want = reference_metrics(feats, targets, weight, 2, 0.05, RTOL)
    assert got.stable_rank_w is None and want["stable_rank_w"] is None
    assert got.nrc3 is None and got.noise_alignment is None
    assert any("all zeros" in w for w in got.warnings)
    for name in ("nrc1", "nrc2", "bound_lhs", "bound_rhs"):
        assert getattr(got, name) == pytest.approx(want[name], abs=1e-6), name
    assert got.passed["nrc3"] is False and got.collapsed is False


def test_nonfinite_weight_gives_none_and_a_warning():
    feats, targets, weight = _data()
    weight[0, 1] = np.nan
    got = layer_metrics(stats_of(feats, targets), weight, 2, 0.05, RTOL, TH)
    assert got.stable_rank_w is None and got.nrc3 is None and got.noise_alignment is None
    assert any("weight contains NaN/Inf" in w for w in got.warnings)
    assert got.nrc1 is not None and got.nrc2 is not None  # the features are fine
    assert got.collapsed is False


def test_nonfinite_model_mse_leaves_nrc4_ratio_undefined():
    feats, targets, weight = _data()
    got = layer_metrics(stats_of(feats, targets), weight, 2, float("nan"), RTOL, TH)
    assert got.nrc4 is not None and got.nrc4_ratio is None
    assert any("NaN/Inf" in w and "nrc4_ratio" in w for w in got.warnings)
    assert got.passed["nrc4"] is False


def test_overflowing_scatter_gives_none_and_a_warning():
    """Finite features whose float64 scatter overflows (|h| ~ 1e160): no crash, no silent number."""
    feats, targets, weight = _data()
    got = layer_metrics(stats_of(feats * 1e160, targets), weight, 2, 0.05, RTOL, TH)
    for name in FEATURE_METRICS:
        assert getattr(got, name) is None, name
    assert any("overflow" in w for w in got.warnings)
    assert got.collapsed is False


def test_weight_with_fewer_input_directions_than_k():
    feats, targets, _ = _data()
    weight = np.random.default_rng(20).standard_normal((1, 6))  # Linear(6 → 1): one input direction
    got = layer_metrics(stats_of(feats, targets), weight, 2, 0.05, RTOL, TH)
    assert got.nrc3 is None and got.noise_alignment is None
    assert any("fewer than k=2" in w for w in got.warnings)
    assert got.nrc1 is not None and got.stable_rank_w == pytest.approx(1.0)


def test_unsupported_weight_rank_raises():
    feats, targets, _ = _data()
    with pytest.raises(ValueError, match="neither Linear"):
        layer_metrics(stats_of(feats, targets), np.zeros((2, 6, 3, 1, 1, 1)), 2, 0.05, RTOL, TH)  # 3-D is Conv1d now


# ----------------------------------------------------------------------------- target summary


@pytest.mark.parametrize("r,t", [(1, 1), (1, 4), (2, 2), (2, 10), (3, 5), (3, 10)])
def test_target_rank_estimate_of_known_rank(r, t):
    """Y = Z A + tiny noise, Z (N, r), A (r, t) with well-separated, non-negligible singular values."""
    rng = np.random.default_rng(100 * r + t)
    n = 400
    z = rng.standard_normal((n, r))
    a = np.diag(np.linspace(1.0, 0.6, r)) @ np.linalg.qr(rng.standard_normal((t, r)))[0].T  # (r, t)
    targets = z @ a + 1e-4 * rng.standard_normal((n, t)) + 3.0
    stats = stats_of(np.ones((n, 1)) + rng.standard_normal((n, 1)), targets)
    summary = target_summary(stats.s_yy, stats.n, 0.99)
    assert summary.dim == t
    assert summary.rank_estimate == r
    assert reference_target_rank(targets, 0.99) == r
    yc = targets - targets.mean(axis=0)
    want = np.sort(np.linalg.svd(yc, compute_uv=False) ** 2 / n)[::-1]
    np.testing.assert_allclose(summary.eigenvalues, want, rtol=1e-9, atol=1e-12 * want[0])
    assert list(summary.eigenvalues) == sorted(summary.eigenvalues, reverse=True)
    assert summary.stable_rank_cov == pytest.approx(float((want**2).sum() / want[0] ** 2), rel=1e-9)


def test_target_rank_estimate_follows_rank_energy():
    """Eigenvalues 4, 1, 0.04 of Σ_Y (cumulative energy 0.7937, 0.9921, 1): the estimate moves with rank_energy."""
    rng = np.random.default_rng(21)
    targets = white_columns(rng, 300, 3) * [2.0, 1.0, 0.2]
    stats = stats_of(rng.standard_normal((300, 2)), targets)
    energies = (0.5, 0.79, 0.8, 0.99, 0.992, 0.9925, 1.0)
    assert [target_summary(stats.s_yy, stats.n, e).rank_estimate for e in energies] == [1, 1, 2, 2, 2, 3, 3]
    assert [reference_target_rank(targets, e) for e in energies] == [1, 1, 2, 2, 2, 3, 3]


def test_target_summary_of_constant_targets():
    stats = stats_of(np.random.default_rng(22).standard_normal((50, 2)), np.full((50, 3), 2.5))
    summary = target_summary(stats.s_yy, stats.n, 0.99)
    assert summary.rank_estimate == 0
    assert summary.stable_rank_cov is None
    assert summary.eigenvalues == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- onset and gate


@pytest.mark.parametrize(
    "collapsed,onset",
    [
        ([], None),
        ([True], 0),
        ([False], None),
        ([True, True, True], 0),
        ([False, False, False], None),
        ([True, True, False], None),
        ([False, True, True], 1),
        ([True, False, True], 2),
        ([True, True, False, True, True, True], 3),
    ],
)
def test_collapse_onset(collapsed, onset):
    assert collapse_onset(collapsed) == onset


@pytest.mark.parametrize(
    "collapsed,require,result",
    [
        ([], 0, (True, [])),
        ([], 1, (True, [])),  # nothing to check: vacuously passes
        ([False, False], 0, (True, [])),  # 0 disables the gate
        ([True, True, True], 3, (True, [])),
        ([False, False, False], 1, (False, [2])),
        ([False, False, False], 2, (False, [1, 2])),
        ([True, True, False], 1, (False, [2])),
        ([False, True, True], 2, (True, [])),
        ([False, True, True], 3, (False, [0])),
        ([False, True, False, True], 10, (False, [0, 2])),  # more than there are: every layer counts
    ],
)
def test_gate(collapsed, require, result):
    assert gate(collapsed, require) == result


@pytest.mark.parametrize("aligned", [True, False])
def test_features_collapsed_below_k_keep_a_defined_nrc3(aligned):
    """Issue 12: features of rank r = 1 audited at k = 2 (λ_2 ≈ λ_3 ≈ 0) are no ambiguity: NRC3 is the
    cosine between their 1-dim subspace and W's top-2 input subspace, against numpy on the full matrices."""
    rng = np.random.default_rng(5)
    n, h = 400, 6
    z = rng.standard_normal(n)
    a = rng.standard_normal(h)
    feats = np.outer(z, a) + 3.0  # rank 1 after centring, large mean on purpose
    targets = np.stack([z + 0.1 * rng.standard_normal(n), 0.5 * z + 0.1 * rng.standard_normal(n)], axis=1)
    weight = rng.standard_normal((3, h))
    if aligned:  # put the feature direction inside W's row space, so its top-2 input subspace can hold it
        weight[0] = 10 * a
    got = layer_metrics(stats_of(feats, targets), weight, 2, 0.05, 1e-3, TH)
    # reference: U_1 = a/|a| (the only direction of H_c), V_2 = top-2 right singular vectors of W
    _, _, vt = np.linalg.svd(weight)
    want = float(np.linalg.norm(vt[:2] @ (a / np.linalg.norm(a))))
    assert got.nrc3 == pytest.approx(want, abs=1e-9)
    assert got.noise_alignment is None
    assert any("rank 1 < k=2" in w for w in got.warnings)
    assert (got.nrc3 > 0.99) is aligned
    assert got.nrc1 == pytest.approx(0.0, abs=1e-9)
