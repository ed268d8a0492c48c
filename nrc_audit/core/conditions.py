"""Pure functions from finalised statistics to the Deep NRC metrics and verdicts (SPEC §4).

Notation (per layer): N samples, h feature dims, t target dims, k subspace rank.
Σ_H = S_HH/N (h×h) with eigenpairs (λ_j, u_j) sorted descending, U_k = [u_1 … u_k], U_⊥ the rest,
C = S_HY/N (h×t), Σ_Y = S_YY/N (t×t). V_k: the top-k *input* singular vectors of the layer's weight.
Nothing here touches files, tensors or devices: numpy float64 in, Python floats out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from nrc_audit.config import Thresholds
from nrc_audit.core.spectra import FeatureSpectrum, feature_spectrum, fix_signs, weight_spectrum
from nrc_audit.core.verdicts import RULES, condition_passed, is_collapsed, verdict_warnings

if TYPE_CHECKING:  # an annotation only: the report records (outputs) load without torch
    from nrc_audit.core.stats import LayerStatistics

# `holds` tolerates this much rounding in lhs ≤ rhs. SPEC §4 says 1e-9, but lhs and rhs are square roots:
# for an exactly collapsed layer both are √(rounding) ≈ 1e-8, and 1e-9 would report a spurious failure.
BOUND_SLACK = 1e-6
GAP_RTOL = 1e-6  # a relative eigengap below this makes the top-k subspace ill-defined (null + warning)


@dataclass
class LayerMetrics:
    """The one per-layer record: the layer's identity, every SPEC §4 field, its verdicts and warnings.

    The report's ``layers[i]`` JSON object is ``asdict`` of this record, in this field order (SPEC §5).
    The identity fields are filled by the pass (:func:`with_identity`); the pure metric functions below
    leave them at their defaults. A metric is ``None`` where the layer is degenerate (see ``warnings``).
    """

    index: int = 0
    name: str = ""
    kind: str = "linear"  # "linear" | "conv2d"
    in_dim: int = 0  # h
    out_dim: int = 0
    pooled: bool = False
    shares_input_with: int | None = None  # the first layer reading the same input tensor (its statistics serve)
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
    bound: dict[str, Any] = field(default_factory=lambda: {"lhs": None, "rhs": None, "holds": None})
    passed: dict[str, bool] = field(default_factory=dict)
    collapsed: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def bound_lhs(self) -> float | None:
        return self.bound.get("lhs")

    @property
    def bound_rhs(self) -> float | None:
        return self.bound.get("rhs")

    @property
    def bound_holds(self) -> bool | None:
        return self.bound.get("holds")


IDENTITY_FIELDS = ("index", "name", "kind", "in_dim", "out_dim", "pooled", "shares_input_with")
# the float metrics of a layer, in report order: every field between the identity and the bound
METRIC_FIELDS = tuple(f.name for f in fields(LayerMetrics))[len(IDENTITY_FIELDS) : -4]


def with_identity(m: LayerMetrics, index: int, name: str, kind: str, in_dim: int, out_dim: int,
                  pooled: bool, shares_input_with: int | None = None) -> LayerMetrics:  # fmt: skip
    """The same record with the layer's identity filled in."""
    return replace(m, index=index, name=name, kind=kind, in_dim=in_dim, out_dim=out_dim, pooled=pooled,
                   shares_input_with=shares_input_with)


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
    return vals, fix_signs(vecs)


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
    device: str | None = None,
) -> LayerMetrics:
    """All SPEC §4 fields of one layer from its statistics and weight, with the per-condition verdicts.

    Args:
        stats: the layer's finalised statistics (N, μ, centred scatter blocks).
        weight: (out, h) Linear or (c_out, c_in, kh, kw) Conv2d weight.
        k: subspace rank (chosen by :func:`nrc_audit.core.verdicts.choose_rank`).
        model_mse: (1/(N t)) ‖f(X) − Y‖_F² of the whole model.
        pinv_rtol: Σ_H⁺ keeps λ_j > pinv_rtol² · λ_1 (Σ_Y⁺ in the bound likewise).
        thresholds: the verdict thresholds.
        device: where the audit ran; on a CUDA device the decompositions run there in float64.
    One decomposition of Σ_H and one of W serve every metric (:mod:`nrc_audit.core.spectra`).
    """
    out = LayerMetrics()
    h = stats.s_hh.shape[0]
    if h == 0:  # a zero-width layer (e.g. Linear(d, 0) before it): nothing to measure
        out.warnings.append("the layer has no input features (h = 0)")
        return _verdicts(out, thresholds)
    u_w, s_w, count = _weight_part(out, weight, h, k, device)
    sigma_y, c = stats.s_yy / stats.n, stats.s_hy / stats.n  # (t, t), (h, t)
    spectrum = _feature_spectrum(out, stats, c, k, device)
    if spectrum is not None:
        lam = spectrum.lam
        _spectral_part(out, lam, c, sigma_y)
        _probe_part(out, spectrum, sigma_y, model_mse, pinv_rtol)
        _subspace_part(out, spectrum, sigma_y, u_w, s_w, count, k)
        _bound_part(out, lam, c, sigma_y, pinv_rtol)
    return _verdicts(out, thresholds)


def _weight_part(out: LayerMetrics, weight: np.ndarray, h: int, k: int,
                 device: str | None) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """W's top input singular vectors (h, ≥ k), its largest singular values (≥ k + 1 where W has them) and its
    number of input singular vectors; ``stable_rank_w`` = ‖W‖_F² / σ_1². Empty (h, 0) when undefined."""
    if not np.isfinite(weight).all():  # LAPACK's SVD does not converge on NaN/Inf
        out.warnings.append("the weight contains NaN/Inf: its input subspace is undefined")
        return np.zeros((h, 0)), np.zeros(0), 0
    ws = weight_spectrum(weight_input_matrix(np.asarray(weight, dtype=np.float64)), k, GAP_RTOL, device)
    if ws.s.size and ws.s[0] > 0:
        out.stable_rank_w = float(ws.fro2 / ws.s[0] ** 2)
    else:
        out.warnings.append("the weight is all zeros: its input subspace is undefined")
    return ws.u, ws.s, ws.count


def _feature_spectrum(out: LayerMetrics, stats: LayerStatistics, c: np.ndarray, k: int,
                      device: str | None) -> FeatureSpectrum | None:  # fmt: skip
    """Σ_H's spectrum (all λ, the top-k eigenvectors, C in the eigenbasis), or None (with a warning) when the
    features are unusable."""
    if stats.nonfinite_rows:
        out.warnings.append(
            f"{stats.nonfinite_rows} of {stats.n} samples produced NaN/Inf features in this layer; "
            "its statistics are undefined"
        )
        return None
    if not all(np.isfinite(a).all() for a in (stats.mu_h, stats.s_hh, stats.s_hy, stats.s_yy)):
        out.warnings.append("the features are so large that their float64 scatter overflows; "
                            "its statistics are undefined")  # fmt: skip
        return None
    spectrum = feature_spectrum(stats.s_hh / stats.n, c, k, device)
    lam = spectrum.lam
    if lam[0] <= (1e-12 * float(np.abs(stats.mu_h).max(initial=0.0))) ** 2 or float(lam.sum()) <= 0:
        out.warnings.append("the features are constant over the data (zero variance)")
        return None
    return spectrum


def _spectral_part(out: LayerMetrics, lam: np.ndarray, c: np.ndarray, sigma_y: np.ndarray) -> None:
    """Stable ranks and NRC2 = linear CKA = ‖C‖_F² / (‖Σ_H‖_F ‖Σ_Y‖_F)."""
    tr_h = float(lam.sum())
    out.stable_rank = tr_h / float(lam[0])
    out.stable_rank_cov = float((lam**2).sum() / lam[0] ** 2)
    out.nrc2 = _ratio(float((c**2).sum()), float(np.sqrt((lam**2).sum())) * float(np.linalg.norm(sigma_y)))


def _probe_part(out: LayerMetrics, spectrum: FeatureSpectrum, sigma_y: np.ndarray, model_mse: float,
                pinv_rtol: float) -> None:  # fmt: skip
    """NRC4 = (tr Σ_Y − tr(Cᵀ Σ_H⁺ C)) / t, the linear probe's MSE, and its ratio to the model's MSE."""
    lam = spectrum.lam
    keep = lam > pinv_rtol**2 * lam[0]
    proj = spectrum.coords[keep]  # (r, t) coordinates of C in the kept eigenbasis
    explained = float(((proj**2) / lam[keep, None]).sum())  # tr(Cᵀ Σ_H⁺ C)
    out.nrc4 = max(0.0, (float(np.trace(sigma_y)) - explained) / sigma_y.shape[0])
    if not np.isfinite(model_mse):
        out.warnings.append("the model's outputs contain NaN/Inf, so model_mse and nrc4_ratio are undefined")
    elif model_mse > 0:
        out.nrc4_ratio = out.nrc4 / model_mse
    else:
        out.warnings.append("the model's MSE is 0, so nrc4_ratio is undefined")


def _subspace_part(out: LayerMetrics, spectrum: FeatureSpectrum, sigma_y: np.ndarray, u_w: np.ndarray,
                   s_w: np.ndarray, count: int, k: int) -> None:  # fmt: skip
    """NRC1, cka_signal, NRC3 and noise_alignment at rank k (null, with a warning, where U_k or V_k is ill-defined)."""
    lam, u = spectrum.lam, spectrum.top  # u: (h, k), the top-k eigenvectors
    h = len(lam)
    if h < k:
        out.warnings.append(f"the layer has {h} feature dims, fewer than the rank k={k}")
        return
    out.nrc1 = float(lam[k:].sum() / lam.sum())
    # Subspace metrics are undefined (null, warned) when the subspace is: a tie λ_k ≈ λ_(k+1) (or σ_k ≈
    # σ_(k+1) of W) leaves U_k (V_k) an arbitrary basis, and rounding alone would pick the reported number.
    # One tie is no ambiguity: λ_k ≈ λ_(k+1) ≈ 0, features that collapsed *below* k. Their subspace, of
    # dimension r < k, is well defined, and NRC3 asks whether W's top-k input subspace holds it.
    features_tied = k < h and lam[k - 1] - lam[k] <= GAP_RTOL * lam[0]
    r = _collapsed_rank(lam, k) if features_tied else k
    if features_tied and r is None:
        out.warnings.append(
            f"λ_k ≈ λ_(k+1) for k={k}: the top-k feature subspace is ill-defined, so nrc3, noise_alignment and "
            "cka_signal are undefined (audit at the targets' intrinsic rank, --rank auto, the default)"
        )
        r = 0
    elif r is not None and r < k:
        out.warnings.append(
            f"the features have rank {r} < k={k} (λ_k ≈ 0: they collapsed below k), so nrc3 is the mean cosine of "
            f"the {r} principal angles between their {r}-dim subspace and W's top-k input subspace, cka_signal "
            "uses that subspace, and noise_alignment is undefined"
        )
    if r:
        sig = float(np.sqrt((lam[:r] ** 2).sum()))  # u_r = U_k, or the whole feature subspace when it has rank r < k
        out.cka_signal = _ratio(float((spectrum.coords[:r] ** 2).sum()), sig * float(np.linalg.norm(sigma_y)))
    if out.stable_rank_w is None:
        return
    if count < k:
        out.warnings.append(f"the weight has {count} input singular vectors, fewer than k={k}")
    elif k < h and s_w[k - 1] - (s_w[k] if k < len(s_w) else 0.0) <= GAP_RTOL * s_w[0]:
        out.warnings.append(f"σ_k ≈ σ_(k+1) of the weight for k={k}: its top-k input subspace is ill-defined, "
                            "so nrc3 and noise_alignment are undefined")  # fmt: skip
    elif r:
        v_k = u_w[:, :k]  # (h, k)
        out.nrc3 = mean_principal_cosine(u[:, :r], v_k, r)
        if r == k:  # σ_i(U_⊥ᵀ V_k) = σ_i((I − U_k U_kᵀ) V_k): U_⊥ itself is never formed; empty when k = h
            noise = np.linalg.svd(v_k - u @ (u.T @ v_k), compute_uv=False).sum() / k if k < h else 0.0
            out.noise_alignment = float(noise)


def _collapsed_rank(lam: np.ndarray, k: int) -> int | None:
    """The features' rank r < k when λ_k ≈ λ_(k+1) ≈ 0 and λ_r is clearly apart from λ_(r+1); else None."""
    tol = GAP_RTOL * lam[0]
    if lam[k - 1] > tol:
        return None  # a tie among non-zero eigenvalues: a real ambiguity
    r = int((lam > tol).sum())
    if r == 0 or lam[r - 1] - lam[r] <= tol:
        return None
    return r


def _bound_part(out: LayerMetrics, lam: np.ndarray, c: np.ndarray, sigma_y: np.ndarray, pinv_rtol: float) -> None:
    """Proposition 1: lhs = ‖(I − P_Y) H_c‖_F / ‖H_c‖_F = √(1 − tr(C Σ_Y⁺ Cᵀ)/tr Σ_H) ≤ √NRC1 + √(1 − NRC2)."""
    if out.nrc1 is None or out.nrc2 is None:
        return
    mu_y, v_y = eigh_desc(sigma_y)
    keep_y = mu_y > pinv_rtol**2 * mu_y[0]
    cv = c @ v_y[:, keep_y]  # (h, r_y)
    in_target_span = float(((cv**2) / mu_y[keep_y]).sum())  # tr(C Σ_Y⁺ Cᵀ)
    lhs = float(np.sqrt(max(0.0, 1.0 - in_target_span / float(lam.sum()))))
    rhs = float(np.sqrt(out.nrc1) + np.sqrt(max(0.0, 1.0 - out.nrc2)))
    out.bound = {"lhs": lhs, "rhs": rhs, "holds": bool(lhs <= rhs + BOUND_SLACK)}


def _verdicts(out: LayerMetrics, th: Thresholds) -> LayerMetrics:
    """Fill ``passed`` and ``collapsed`` (the policy: :mod:`nrc_audit.core.verdicts`) and the warnings that
    qualify the verdict (near a threshold; inside the no-weight-decay region)."""
    values = {f: getattr(out, f) for f, _, _ in RULES.values()}
    out.passed = condition_passed(values, th)
    out.collapsed = is_collapsed(out.passed)
    out.warnings.extend(verdict_warnings(values, th))
    return out
