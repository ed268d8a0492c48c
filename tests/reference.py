"""Independent dense float64 reference for every SPEC §4 per-layer field (test-only).

This module never imports ``nrc_audit``. It works on the *full* data — the feature matrix
H (N, h), the targets Y (N, t) and the layer weight W — and computes each metric straight from its
definition, by a different route from the package's streamed-statistics code wherever one exists:

=====================  ==============================================================================
field                  route taken here
=====================  ==============================================================================
centring               two-pass: H_c = H − mean(H), Y_c = Y − mean(Y), explicitly (no Chan merge)
λ_j                    s_j(H_c)² / N from the SVD of H_c (not ``eigh`` of a covariance), zero-padded to h
U_k                    top-k right singular vectors of H_c
``nrc1``               Σ_{j>k} λ_j / Σ_j λ_j
``nrc2``               linear CKA as HSIC of N×N double-centred Gram matrices K = J H_c H_cᵀ J,
                       L = J Y_c Y_cᵀ J: tr(KL)/√(tr(KK) tr(LL)) (small N); for large N the
                       feature-space form ‖Y_cᵀH_c‖_F² / (‖H_cᵀH_c‖_F ‖Y_cᵀY_c‖_F)
``cka_signal``         the same CKA of H_c U_k with Y
V_k                    Linear (out, h): top-k right singular vectors of W; Conv2d (c_out, c_in, kh, kw):
                       top-k left singular vectors of M (c_in, c_out·kh·kw) built column by column
``nrc3``               (1/k) Σ_i cos θ_i with cos² θ_i the eigenvalues of V_kᵀ P_U V_k (P_U = U_k U_kᵀ)
``noise_alignment``    (1/k) Σ_i σ_i((I − P_U) V_k) — basis-free form of σ(U_⊥ᵀ V_k); always divided by
                       k, also when h − k < k and only h − k singular values exist (missing ones count 0)
``nrc4``               explicit least squares with intercept: B = H_c⁺ Y_c (truncated pseudo-inverse from
                       the SVD of H_c keeping s_j > pinv_rtol·s_1), b = ȳ − Bᵀh̄, residual
                       R = Y − H B − 1bᵀ, nrc4 = ‖R‖_F² / (N t)
``bound_lhs``          ‖(I − P_Y) H_c‖_F / ‖H_c‖_F, P_Y the explicit N×N projector onto col(Y_c) from the
                       SVD of Y_c keeping s_j > pinv_rtol·s_1 (the same truncation as Σ_Y⁺)
``bound_rhs``          √nrc1 + √(1 − nrc2)
stable ranks           Σs²/s_1², Σs⁴/s_1⁴ of H_c; Σσ²/σ_1² of W (or M)
=====================  ==============================================================================

Comparability rules (when a difference between two correct implementations is *not* a bug):

* **Eigengap rule.** U_k is only defined when the k-th eigenvalue is separated from the next one. Compare
  ``nrc3`` and ``noise_alignment`` only when (λ_k − λ_{k+1}) / λ_1 > 1e-6 for Σ_H (no condition when
  k = h: U_k is then the whole space) **and** likewise (σ_k − σ_{k+1}) / σ_1 > 1e-6 for the singular
  values of W (σ_{r+1} := 0 beyond W's r = min(h, m) values; no condition when k = h). ``cka_signal``
  depends on U_k too, so it needs the feature half of the rule. Otherwise the subspace is ill-defined:
  any orthonormal basis of the tied eigenspace is a correct answer, and a test must not compare.
  Rounding moves a subspace by about ε·‖Σ‖/gap, so a relative gap of 1e-6 keeps that far below the
  1e-6 tolerance. :func:`eigengaps` returns both gaps; :func:`subspaces_comparable` applies the rule.
* **Truncation rule.** ``nrc4`` and ``bound_lhs`` depend discontinuously on which singular values pass
  the cut s_j > pinv_rtol·s_1. Compare them only when no singular value of H_c (resp. Y_c) lies within a
  relative 1e-6 of the cut; :func:`cut_margins` returns the smallest relative distance.

Degenerate layers are not modelled here beyond ``None`` for metrics whose rank k exceeds the available
dimensions; tests for degenerate layers assert the package's behaviour directly.
"""

from __future__ import annotations

import numpy as np

GAP_MIN = 1e-6  # eigengap / singular-gap rule (see module docstring)
CUT_MARGIN_MIN = 1e-6  # truncation rule (see module docstring)
GRAM_MAX_N = 600  # above this N the CKA uses the feature-space form instead of N×N Grams

FIELDS = (
    "nrc1",
    "nrc2",
    "nrc3",
    "nrc4",
    "nrc4_ratio",
    "cka_signal",
    "noise_alignment",
    "stable_rank",
    "stable_rank_cov",
    "stable_rank_w",
    "bound_lhs",
    "bound_rhs",
    "bound_holds",
)


# ----------------------------------------------------------------------------- building blocks


def centre(a: np.ndarray) -> np.ndarray:
    """Two-pass centring of the rows of a (N, p) float64 array."""
    a = np.asarray(a, dtype=np.float64)
    return a - a.mean(axis=0, keepdims=True)


def weight_matrix_input_first(weight: np.ndarray) -> np.ndarray:
    """(h, m) matrix whose column space (left singular vectors) lives in the layer's input space.

    Linear (out, h): Wᵀ. Conv2d (c_out, c_in, kh, kw): row i is the flattened slice W[:, i, :, :]
    (c_out·kh·kw entries, c_out-major, as torch's ``W.permute(1, 0, 2, 3).reshape(c_in, -1)``),
    built row by row rather than by a permute/reshape.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 2:
        return w.T.copy()
    if w.ndim == 4:
        c_out, c_in, kh, kw = w.shape
        m = np.empty((c_in, c_out * kh * kw))
        for i in range(c_in):
            col = 0
            for o in range(c_out):
                for a in range(kh):
                    for b in range(kw):
                        m[i, col] = w[o, i, a, b]
                        col += 1
        return m
    if w.ndim in (3, 5):  # Conv1d / Conv3d: row i is W[:, i, …] flattened, c_out-major
        return np.stack([w[:, i].reshape(-1) for i in range(w.shape[1])])
    raise ValueError(f"weight must be 2-D or 4-D, got shape {w.shape}")


def weight_input_subspace(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input singular vectors (h, r) and singular values (r,), descending.

    Linear: right singular vectors of W itself (rows of Vᵀ from ``svd(W)``); Conv2d: left singular
    vectors of M. Signs are irrelevant: only subspaces are used.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 2:
        _, s, vt = np.linalg.svd(w, full_matrices=False)  # W = U S Vᵀ, Vᵀ (r, h)
        return vt.T, s
    u, s, _ = np.linalg.svd(weight_matrix_input_first(w), full_matrices=False)
    return u, s


def _double_centre(gram: np.ndarray) -> np.ndarray:
    """J G J with J = I − 11ᵀ/N, written as G − row means − column means + grand mean (O(N²))."""
    return gram - gram.mean(axis=0, keepdims=True) - gram.mean(axis=1, keepdims=True) + gram.mean()


def linear_cka(a: np.ndarray, b: np.ndarray) -> float | None:
    """Linear CKA of the rows of a (N, p) and b (N, q); the N×N Gram/HSIC form when N is small.

    HSIC form: K = J a aᵀ J, L = J b bᵀ J with J = I − 11ᵀ/N; CKA = tr(KL)/√(tr(KK)·tr(LL)).
    Feature form (N > GRAM_MAX_N): ‖b_cᵀa_c‖_F² / (‖a_cᵀa_c‖_F ‖b_cᵀb_c‖_F). ``None`` if either is 0.
    """
    a_c, b_c = centre(a), centre(b)  # centring first keeps the Gram accurate under large means
    n = a_c.shape[0]
    if n <= GRAM_MAX_N:
        k = _double_centre(a_c @ a_c.T)  # (N, N)
        l_ = _double_centre(b_c @ b_c.T)  # (N, N)
        num = float(np.sum(k * l_))  # tr(K L), both symmetric
        den = float(np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))
    else:
        num = float(np.linalg.norm(b_c.T @ a_c) ** 2)
        den = float(np.linalg.norm(a_c.T @ a_c) * np.linalg.norm(b_c.T @ b_c))
    return num / den if den > 0 else None


def truncated_pinv(a: np.ndarray, rtol: float) -> np.ndarray:
    """Moore–Penrose pseudo-inverse (q, N) of a (N, q) keeping singular values s_j > rtol·s_1."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros(a.T.shape)
    keep = s > rtol * s[0]
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def column_space_projector(a: np.ndarray, rtol: float) -> np.ndarray:
    """Explicit (N, N) orthogonal projector onto col(a) (singular values s_j > rtol·s_1 kept)."""
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((a.shape[0], a.shape[0]))
    uk = u[:, s > rtol * s[0]]
    return uk @ uk.T


def feature_spectrum(h_mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λ (h,), V (h, h)): λ_j = s_j(H_c)²/N zero-padded to h, V the right singular vectors (columns)."""
    hc = centre(h_mat)
    n, h = hc.shape
    # the full (h, h) basis is only needed when N < h; otherwise (N, N) U would be wasted work
    _, s, vt = np.linalg.svd(hc, full_matrices=n < h)  # vt (h, h) or (min(N, h), h) = (h, h) when N ≥ h
    lam = np.zeros(h)
    lam[: s.size] = s**2 / n
    return lam, vt.T


def eigengaps(h_mat: np.ndarray, weight: np.ndarray, k: int) -> tuple[float, float]:
    """Relative gaps ((λ_k − λ_{k+1})/λ_1 of Σ_H, (σ_k − σ_{k+1})/σ_1 of W); inf when k spans all."""
    lam, _ = feature_spectrum(h_mat)
    _, s_w = weight_input_subspace(weight)
    gap_h = np.inf if k >= lam.size else (lam[k - 1] - lam[k]) / lam[0]
    if k > s_w.size or s_w[0] == 0:
        gap_w = 0.0
    elif k == weight_matrix_input_first(weight).shape[0]:
        gap_w = np.inf
    else:
        nxt = s_w[k] if k < s_w.size else 0.0
        gap_w = (s_w[k - 1] - nxt) / s_w[0]
    return float(gap_h), float(gap_w)


def subspaces_comparable(h_mat: np.ndarray, weight: np.ndarray, k: int) -> bool:
    """The eigengap rule of the module docstring."""
    gap_h, gap_w = eigengaps(h_mat, weight, k)
    return gap_h > GAP_MIN and gap_w > GAP_MIN


def cut_margins(h_mat: np.ndarray, y_mat: np.ndarray, rtol: float) -> tuple[float, float]:
    """Smallest |s_j/(rtol·s_1) − 1| over the singular values of H_c and of Y_c (truncation rule)."""

    def margin(a: np.ndarray) -> float:
        s = np.linalg.svd(centre(a), compute_uv=False)
        if s.size == 0 or s[0] == 0:
            return np.inf
        return float(np.min(np.abs(s / (rtol * s[0]) - 1.0)))

    return margin(h_mat), margin(y_mat)


# ----------------------------------------------------------------------------- the metrics


def reference_metrics(
    h_mat: np.ndarray,
    y_mat: np.ndarray,
    weight: np.ndarray,
    k: int,
    model_mse: float,
    pinv_rtol: float = 1e-3,
) -> dict[str, float | bool | None]:
    """Every SPEC §4 field of one layer from the full data.

    Args:
        h_mat: (N, h) features (any mean; centred here).
        y_mat: (N, t) or (N,) targets.
        weight: (out, h) Linear or (c_out, h, kh, kw) Conv2d weight.
        k: subspace rank.
        model_mse: (1/(N t))‖f(X) − Y‖_F².
        pinv_rtol: relative singular-value cut for H_c⁺ and for P_Y.
    Returns:
        dict keyed by :data:`FIELDS`; ``None`` where the field is undefined (k > h, zero weight, …).
    """
    h_mat = np.asarray(h_mat, dtype=np.float64)
    y_mat = np.asarray(y_mat, dtype=np.float64)
    if y_mat.ndim == 1:
        y_mat = y_mat[:, None]
    n, h = h_mat.shape
    t = y_mat.shape[1]
    hc, yc = centre(h_mat), centre(y_mat)  # (N, h), (N, t)
    out: dict[str, float | bool | None] = dict.fromkeys(FIELDS)

    # --- weight side
    v_all, s_w = weight_input_subspace(weight)  # (h, r), (r,)
    if s_w.size and s_w[0] > 0:
        out["stable_rank_w"] = float(np.sum(s_w**2) / s_w[0] ** 2)

    # --- feature spectrum from the SVD of H_c
    lam, v_h = feature_spectrum(h_mat)  # (h,), (h, h)
    s_h = np.sqrt(lam * n)
    out["stable_rank"] = float(np.sum(s_h**2) / s_h[0] ** 2)
    out["stable_rank_cov"] = float(np.sum(s_h**4) / s_h[0] ** 4)

    out["nrc2"] = linear_cka(h_mat, y_mat)

    # --- nrc4: explicit least squares with intercept, truncated pseudo-inverse of H_c
    coef = truncated_pinv(hc, pinv_rtol) @ yc  # B (h, t)
    intercept = y_mat.mean(axis=0) - h_mat.mean(axis=0) @ coef  # b (t,)
    resid = y_mat - h_mat @ coef - intercept  # (N, t)
    out["nrc4"] = float(np.sum(resid**2) / (n * t))
    if model_mse > 0:
        out["nrc4_ratio"] = out["nrc4"] / model_mse

    if k <= h:
        u_k = v_h[:, :k]  # (h, k)
        out["nrc1"] = float(np.sum(lam[k:]) / np.sum(lam))
        out["cka_signal"] = linear_cka(hc @ u_k, y_mat)
        if out["stable_rank_w"] is not None and v_all.shape[1] >= k:
            v_k = v_all[:, :k]  # (h, k)
            p_u = u_k @ u_k.T  # (h, h)
            cos2 = np.linalg.eigvalsh(v_k.T @ p_u @ v_k)  # cos² of the k principal angles
            out["nrc3"] = float(np.sum(np.sqrt(np.clip(cos2, 0.0, 1.0))) / k)
            resid_v = (np.eye(h) - p_u) @ v_k  # (h, k)
            out["noise_alignment"] = float(np.sum(np.linalg.svd(resid_v, compute_uv=False)) / k)

    if out["nrc1"] is not None and out["nrc2"] is not None:
        p_y = column_space_projector(yc, pinv_rtol)  # (N, N)
        out["bound_lhs"] = float(np.linalg.norm(hc - p_y @ hc) / np.linalg.norm(hc))
        out["bound_rhs"] = float(np.sqrt(out["nrc1"]) + np.sqrt(max(0.0, 1.0 - out["nrc2"])))
        out["bound_holds"] = bool(out["bound_lhs"] <= out["bound_rhs"] + 1e-9)
    return out


def reference_target_rank(y_mat: np.ndarray, rank_energy: float) -> int:
    """Smallest r whose top-r singular values² of Y_c hold ≥ rank_energy of ‖Y_c‖_F² (by a loop)."""
    s2 = np.linalg.svd(centre(np.asarray(y_mat, dtype=np.float64).reshape(len(y_mat), -1)), compute_uv=False) ** 2
    total = float(np.sum(s2))
    if total == 0:
        return 0
    acc = 0.0
    for r, value in enumerate(s2, start=1):
        acc += value
        if acc >= rank_energy * total:
            return r
    return len(s2)
