"""Pure functions from finalised statistics to the Deep NRC metrics and verdicts (SPEC §4).

Notation (per layer): N samples, h feature dims, t target dims, k subspace rank.
Σ_H = S_HH/N (h×h) with eigenpairs (λ_j, u_j) sorted descending, U_k = [u_1 … u_k], U_⊥ the rest,
C = S_HY/N (h×t), Σ_Y = S_YY/N (t×t). V_k: the top-k *input* singular vectors of the layer's weight.
Nothing here touches files, tensors or devices: numpy float64 in, Python floats out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nrc_audit.config import Thresholds
from nrc_audit.core.stats import LayerStatistics

# `holds` tolerates this much rounding in lhs ≤ rhs. SPEC §4 says 1e-9, but lhs and rhs are square roots:
# for an exactly collapsed layer both are √(rounding) ≈ 1e-8, and 1e-9 would report a spurious failure.
BOUND_SLACK = 1e-6
GAP_RTOL = 1e-6  # a relative eigengap below this makes the top-k subspace ill-defined (null + warning)


@dataclass
class LayerMetrics:
    """Every SPEC §4 field of one layer; ``None`` where the layer is degenerate (see ``warnings``)."""

    nrc1: float | None = None
    nrc2: float | None = None
    nrc3: float | None = None
    nrc4: float | None = None
    nrc4_ratio: float | None = None
    cka_signal: float | None = None
    noise_alignment: float | None = None
    stable_rank: float | None = None
    stable_rank_cov: float | None = None
    stable_rank_w: float | None = None
    bound_lhs: float | None = None
    bound_rhs: float | None = None
    bound_holds: bool | None = None
    passed: dict[str, bool] = field(default_factory=dict)
    collapsed: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TargetSummary:
    dim: int
    rank_estimate: int
    eigenvalues: list[float]
    stable_rank_cov: float | None


# ----------------------------------------------------------------------------- linear algebra helpers


def eigh_desc(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric PSD matrix, descending, negatives clipped, signs fixed.

    Args:
        sym: (p, p) symmetric float64.
    Returns:
        (eigenvalues (p,), eigenvectors (p, p) as columns). Negative eigenvalues are rounding noise of a
        PSD matrix and are clipped to 0. Each eigenvector's largest-magnitude entry is made positive so
        the output is deterministic (as scikit-learn's ``svd_flip``).
    """
    vals, vecs = np.linalg.eigh((sym + sym.T) / 2.0)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    return vals, _fix_signs(vecs)


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    if vecs.size == 0:
        return vecs
    pivots = vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])]
    return vecs * np.where(pivots < 0, -1.0, 1.0)


def weight_input_matrix(weight: np.ndarray) -> np.ndarray:
    """The weight as an (h, m) matrix whose *left* singular vectors live in the layer's input space.

    Linear (out, h) → Wᵀ (h, out); ConvNd (c_out, c_in, *k) → M = W.moveaxis(1, 0).reshape(c_in, −1).
    A grouped conv's weight arrives as the equivalent dense block-diagonal kernel (engine.extract.dense_weight),
    so its input subspace is that of the dense conv computing the same map.
    """
    if weight.ndim == 2:
        return weight.T
    if weight.ndim in (3, 4, 5):
        return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    raise ValueError(f"weight of shape {weight.shape} is neither Linear (2-D) nor Conv1d/2d/3d (3-, 4- or 5-D)")


def weight_input_basis(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input singular vectors (h, r) and singular values (r,) of a layer weight, descending, signs fixed."""
    a = weight_input_matrix(np.asarray(weight, dtype=np.float64))  # (h, m)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    return _fix_signs(u), s


def mean_principal_cosine(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """(1/k) Σ_i σ_i(aᵀ b) for orthonormal columns a (h, p), b (h, k): mean cosine over k principal angles.

    When p < k the missing angles count as 90° (cosine 0), so the mean is always over k angles.
    """
    if a.shape[1] == 0 or b.shape[1] == 0:
        return 0.0
    return float(np.linalg.svd(a.T @ b, compute_uv=False).sum() / k)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 and np.isfinite(den) else None


# ----------------------------------------------------------------------------- metrics


def target_summary(s_yy: np.ndarray, n: int, rank_energy: float) -> TargetSummary:
    """The target block: eigenvalues of Σ_Y, the energy rank estimate and the covariance stable rank.

    ``rank_estimate`` is the smallest r with Σ_{j≤r} μ_j ≥ rank_energy · tr Σ_Y.
    """
    mu, _ = eigh_desc(s_yy / n)
    total = float(mu.sum())
    if total <= 0:
        return TargetSummary(len(mu), 0, mu.tolist(), None)
    cum = np.cumsum(mu)
    rank = int(np.searchsorted(cum, rank_energy * total * (1 - 1e-12)) + 1)
    return TargetSummary(len(mu), min(rank, len(mu)), mu.tolist(), float((mu**2).sum() / mu[0] ** 2))


def layer_metrics(
    stats: LayerStatistics,
    weight: np.ndarray,
    k: int,
    model_mse: float,
    pinv_rtol: float,
    thresholds: Thresholds,
) -> LayerMetrics:
    """All SPEC §4 fields of one layer from its statistics and weight.

    Args:
        stats: the layer's finalised statistics (N, μ, centred scatter blocks).
        weight: (out, h) Linear or (c_out, c_in, kh, kw) Conv2d weight.
        k: subspace rank (t, the estimated rank, or the user's).
        model_mse: (1/(N t)) ‖f(X) − Y‖_F² of the whole model.
        pinv_rtol: Σ_H⁺ keeps λ_j > pinv_rtol² · λ_1 (Σ_Y⁺ in the bound likewise).
        thresholds: the verdict thresholds.
    """
    out = LayerMetrics()
    n, h, t = stats.n, stats.s_hh.shape[0], stats.s_yy.shape[0]
    if h == 0:  # a zero-width layer (e.g. Linear(d, 0) before it): nothing to measure
        out.warnings.append("the layer has no input features (h = 0)")
        return _verdicts(out, thresholds)
    finite_w = bool(np.isfinite(weight).all())  # LAPACK's SVD does not converge on NaN/Inf
    u_w, s_w = weight_input_basis(weight) if finite_w else (np.zeros((h, 0)), np.zeros(0))  # (h, r), (r,)
    if not finite_w:
        out.warnings.append("the weight contains NaN/Inf: its input subspace is undefined")
    elif s_w.size and s_w[0] > 0:
        out.stable_rank_w = float((s_w**2).sum() / s_w[0] ** 2)
    else:
        out.warnings.append("the weight is all zeros: its input subspace is undefined")

    if stats.nonfinite_rows:
        out.warnings.append(
            f"{stats.nonfinite_rows} of {n} samples produced NaN/Inf features in this layer; "
            "its statistics are undefined"
        )
        return _verdicts(out, thresholds)
    if not all(np.isfinite(a).all() for a in (stats.mu_h, stats.s_hh, stats.s_hy, stats.s_yy)):
        out.warnings.append("the features are so large that their float64 scatter overflows; "
                            "its statistics are undefined")  # fmt: skip
        return _verdicts(out, thresholds)

    lam, u = eigh_desc(stats.s_hh / n)  # λ (h,), eigenvectors (h, h)
    sigma_y = stats.s_yy / n  # (t, t)
    c = stats.s_hy / n  # (h, t)
    tr_h, tr_y = float(lam.sum()), float(np.trace(sigma_y))
    if lam[0] <= (1e-12 * float(np.abs(stats.mu_h).max(initial=0.0))) ** 2 or tr_h <= 0:
        out.warnings.append("the features are constant over the data (zero variance)")
        return _verdicts(out, thresholds)

    fro_h, fro_y = float(np.sqrt((lam**2).sum())), float(np.linalg.norm(sigma_y))
    out.stable_rank = tr_h / float(lam[0])
    out.stable_rank_cov = float((lam**2).sum() / lam[0] ** 2)
    out.nrc2 = _ratio(float((c**2).sum()), fro_h * fro_y)

    keep = lam > pinv_rtol**2 * lam[0]
    proj = u[:, keep].T @ c  # (r, t) coordinates of C in the kept eigenbasis
    explained = float(((proj**2) / lam[keep, None]).sum())  # tr(Cᵀ Σ_H⁺ C)
    out.nrc4 = max(0.0, (tr_y - explained) / t)
    if not np.isfinite(model_mse):
        out.warnings.append("the model's outputs contain NaN/Inf, so model_mse and nrc4_ratio are undefined")
    elif model_mse > 0:
        out.nrc4_ratio = out.nrc4 / model_mse
    else:
        out.warnings.append("the model's MSE is 0, so nrc4_ratio is undefined")

    if h < k:
        out.warnings.append(f"the layer has {h} feature dims, fewer than the rank k={k}")
    else:
        u_k, u_perp = u[:, :k], u[:, k:]
        out.nrc1 = float(lam[k:].sum() / tr_h)
        # Subspace metrics are undefined (null, warned) when the subspace is: a tie λ_k ≈ λ_(k+1) (or σ_k ≈
        # σ_(k+1) of W) leaves U_k (V_k) an arbitrary basis, and rounding alone would pick the reported number.
        features_tied = k < h and lam[k - 1] - lam[k] <= GAP_RTOL * lam[0]
        if features_tied:
            out.warnings.append(
                f"λ_k ≈ λ_(k+1) for k={k}: the top-k feature subspace is ill-defined, so nrc3, noise_alignment and "
                "cka_signal are undefined (the features may have collapsed to a lower rank: try --rank auto)"
            )
        else:
            sig_k = float(np.sqrt((lam[:k] ** 2).sum()))
            out.cka_signal = _ratio(float(((u_k.T @ c) ** 2).sum()), sig_k * fro_y)
        if out.stable_rank_w is None:
            pass
        elif u_w.shape[1] < k:
            out.warnings.append(f"the weight has {u_w.shape[1]} input singular vectors, fewer than k={k}")
        elif k < h and s_w[k - 1] - (s_w[k] if k < len(s_w) else 0.0) <= GAP_RTOL * s_w[0]:
            out.warnings.append(f"σ_k ≈ σ_(k+1) of the weight for k={k}: its top-k input subspace is ill-defined, "
                                "so nrc3 and noise_alignment are undefined")  # fmt: skip
        elif not features_tied:
            v_k = u_w[:, :k]  # (h, k)
            out.nrc3 = mean_principal_cosine(u_k, v_k, k)
            out.noise_alignment = mean_principal_cosine(u_perp, v_k, k)

    if out.nrc1 is not None and out.nrc2 is not None:
        mu_y, v_y = eigh_desc(sigma_y)
        keep_y = mu_y > pinv_rtol**2 * mu_y[0]
        cv = c @ v_y[:, keep_y]  # (h, r_y)
        in_target_span = float(((cv**2) / mu_y[keep_y]).sum())  # tr(C Σ_Y⁺ Cᵀ)
        out.bound_lhs = float(np.sqrt(max(0.0, 1.0 - in_target_span / tr_h)))
        out.bound_rhs = float(np.sqrt(out.nrc1) + np.sqrt(max(0.0, 1.0 - out.nrc2)))
        out.bound_holds = bool(out.bound_lhs <= out.bound_rhs + BOUND_SLACK)
    return _verdicts(out, thresholds)


def _verdicts(out: LayerMetrics, th: Thresholds) -> LayerMetrics:
    """Fill ``passed`` and ``collapsed``; a null metric fails its condition."""
    out.passed = {
        "nrc1": out.nrc1 is not None and out.nrc1 <= th.nrc1_max,
        "nrc2": out.nrc2 is not None and out.nrc2 >= th.nrc2_min,
        "nrc3": out.nrc3 is not None and out.nrc3 >= th.nrc3_min,
        "nrc4": out.nrc4_ratio is not None and out.nrc4_ratio <= th.nrc4_ratio_max,
    }
    out.collapsed = all(out.passed.values())
    return out
