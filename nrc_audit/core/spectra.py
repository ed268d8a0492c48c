"""The two decompositions of the per-layer analysis, at width: Σ_H's eigenpairs and W's input singular vectors.

Every metric of a layer reads one :class:`FeatureSpectrum` (all eigenvalues of Σ_H, the top-k eigenvectors and
C = S_HY/N in the eigenbasis) and one :class:`WeightSpectrum` (W's top-k input singular vectors, its top k + 1
singular values and ‖W‖_F²). Neither needs the full (h, h) eigenvector or singular-vector matrices, and that
is where the O(h³) goes:

* **Σ_H, exact.** One Householder tridiagonalisation Σ_H = Q T Qᵀ (LAPACK ``sytrd``), the eigenpairs of T by
  MRRR (``stemr``, O(h²)), and Q applied only to C and to the k eigenvectors the subspace metrics read
  (``ormqr``). This is LAPACK's own ``syevr`` with the back-transformation of the other h − k vectors left
  out: the same backward-stable algorithm, so nothing here is approximate.
* **W, certified.** The top q = k + 8 eigenvectors of the Gram matrix on W's smaller side (``syevr`` on a
  subset), one step of subspace iteration on W itself and a Rayleigh–Ritz SVD of the (h, q) product. Its
  accuracy is then *proved*, not assumed: by Wedin's sin Θ theorem the input subspace is within
  ‖R‖ / δ of the exact one, with R the Ritz residuals computed on W (plus the rounding of computing them) and
  δ the gap from σ̃_k to an upper bound of σ_(k+1) taken from the Gram eigenvalues. NRC3 and the noise
  alignment then differ from the exact SVD's by at most √2 · sin Θ. When that bound exceeds
  :data:`CERTIFIED_TOL`, or the rounding could flip the eigengap test of :mod:`nrc_audit.core.conditions`, the
  exact SVD runs instead (``WeightSpectrum.exact``).
* **On a GPU** both are torch's float64 ``eigh``/``svd`` on the device (cuSOLVER), exact, whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# torch and scipy are imported where the analysis runs, not at import: the report records (outputs) load this
# module's package without either

CERTIFIED_TOL = 1e-9  # largest proven difference of nrc3/noise_alignment from the exact SVD's that is accepted
OVERSAMPLE = 8  # extra Ritz vectors: the subspace iteration contracts the error by σ_(q+1)/σ_k
FAST_MIN_WIDTH = 128  # below this the whole eigh/SVD costs milliseconds
EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class FeatureSpectrum:
    """Σ_H's eigenvalues λ (h,) descending and clipped at 0, its top eigenvectors (h, q) and C's
    coordinates in the whole eigenbasis, ``coords[j] = u_jᵀ C`` (h, t)."""

    lam: np.ndarray
    top: np.ndarray
    coords: np.ndarray


@dataclass(frozen=True)
class WeightSpectrum:
    """W's top input singular vectors (h, q), its largest singular values (≥ q + 1 where W has them), the
    number of input singular vectors min(h, m), ‖W‖_F², and whether the exact SVD produced them."""

    u: np.ndarray
    s: np.ndarray
    count: int
    fro2: float
    exact: bool


def fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Each column's largest-magnitude entry made positive, so the output is deterministic (``svd_flip``)."""
    if vecs.size == 0:
        return vecs
    pivots = vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])]
    return vecs * np.where(pivots < 0, -1.0, 1.0)


def on_gpu(device: str | None) -> bool:
    if not (device and str(device).startswith("cuda")):
        return False
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- Σ_H


def feature_spectrum(sigma_h: np.ndarray, c: np.ndarray, q: int, device: str | None = None) -> FeatureSpectrum:
    """Eigenvalues, top-q eigenvectors and C's coordinates of the symmetric PSD Σ_H (h, h), C (h, t)."""
    sym = (sigma_h + sigma_h.T) / 2.0
    h, q = sym.shape[0], min(q, sym.shape[0])
    if on_gpu(device):
        import torch

        vals, vecs = torch.linalg.eigh(torch.from_numpy(sym).to(device))
        vals, vecs = vals.flip(0).cpu().numpy(), vecs.flip(1)
        coords = (vecs.T @ torch.from_numpy(c).to(device)).cpu().numpy()
        return FeatureSpectrum(np.clip(vals, 0.0, None), fix_signs(vecs[:, :q].cpu().numpy()), coords)
    if h < FAST_MIN_WIDTH:
        return dense_feature_spectrum(sym, c, q)
    import scipy.linalg.lapack as lapack
    lwork = int(lapack.dsytrd_lwork(h, lower=1)[0])
    refl, d, e, tau, info = lapack.dsytrd(sym, lower=1, lwork=lwork)  # Σ_H = Q T Qᵀ, T = tridiag(d, e)
    _check(info, "sytrd")
    _, w, z, info = lapack.dstemr(d, np.append(e, 0.0), 0, 0.0, 0.0, 0, 0, compute_v=1)  # T = Z diag(w) Zᵀ
    _check(info, "stemr")
    order = np.argsort(w)[::-1]
    w, z = w[order], z[:, order]
    coords = z.T @ _apply_q(refl, tau, c, "T")  # (QZ)ᵀ C = Zᵀ (Qᵀ C)
    top = _apply_q(refl, tau, z[:, :q], "N")  # (h, q): Q Z for the top q only
    return FeatureSpectrum(np.clip(w, 0.0, None), fix_signs(top), coords)


def dense_feature_spectrum(sym: np.ndarray, c: np.ndarray, q: int) -> FeatureSpectrum:
    """The same from the full eigendecomposition (numpy ``eigh``): the reference the fast path is tested on."""
    vals, vecs = np.linalg.eigh((sym + sym.T) / 2.0)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), fix_signs(vecs[:, order])
    return FeatureSpectrum(vals, vecs[:, :q], vecs.T @ c)


def _apply_q(refl: np.ndarray, tau: np.ndarray, x: np.ndarray, trans: str) -> np.ndarray:
    """Q x or Qᵀ x for sytrd's lower-storage Q = diag(1, Q'), Q' the QR-layout reflectors in refl[1:, :h−1]."""
    import scipy.linalg.lapack as lapack

    out = np.array(x, dtype=np.float64, order="F")
    if out.shape[0] < 2 or out.shape[1] == 0:
        return out
    a = np.asfortranarray(refl[1:, :-1])
    lwork = int(lapack.dormqr("L", trans, a, tau, out[1:], -1)[1][0])
    part, _, info = lapack.dormqr("L", trans, a, tau, out[1:], max(1, lwork))
    _check(info, "ormqr")
    out[1:] = part
    return out


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info = {info})")


# ----------------------------------------------------------------------------- W


def weight_spectrum(a: np.ndarray, k: int, gap_rtol: float, device: str | None = None) -> WeightSpectrum:
    """Top-k input singular vectors of a = W as (h, m) (see ``conditions.weight_input_matrix``), certified.

    ``gap_rtol`` is the eigengap rule the caller applies (σ_k − σ_(k+1) ≤ gap_rtol · σ_1 means "tied"): the
    fast path is accepted only where its rounding cannot change that verdict.
    """
    h, m = a.shape
    count, fro2 = min(h, m), float(np.einsum("ij,ij->", a, a))
    if on_gpu(device):
        import torch

        u, s, _ = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(a)).to(device), full_matrices=False)
        return WeightSpectrum(fix_signs(u.cpu().numpy()), s.cpu().numpy(), count, fro2, True)
    if count < FAST_MIN_WIDTH or k + OVERSAMPLE >= count:
        return exact_weight_spectrum(a)
    fast = _ritz(a, k, gap_rtol, fro2)
    return fast if fast is not None else exact_weight_spectrum(a)


def exact_weight_spectrum(a: np.ndarray) -> WeightSpectrum:
    """Every input singular vector and value of a (h, m) by LAPACK's SVD."""
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    return WeightSpectrum(fix_signs(u), s, min(a.shape), float((s**2).sum()), True)


def _ritz(a: np.ndarray, k: int, gap_rtol: float, fro2: float) -> WeightSpectrum | None:
    """The Rayleigh–Ritz triplets of a on a subspace from its Gram matrix, or None where not certified."""
    import scipy.linalg

    h, m = a.shape
    q = k + OVERSAMPLE
    small = a @ a.T if h <= m else a.T @ a  # (p, p) Gram on the smaller side, p = min(h, m)
    p = small.shape[0]
    theta, basis = scipy.linalg.eigh(small, subset_by_index=[p - q, p - 1], driver="evr")
    theta, basis = theta[::-1], basis[:, ::-1]
    v0 = np.linalg.qr(a.T @ basis)[0] if h <= m else basis  # (m, q): one subspace-iteration step from the left
    uc, s, wt = np.linalg.svd(a @ v0, full_matrices=False)  # (h, q) Ritz vectors, σ̃ ≤ σ (interlacing)
    v = v0 @ wt.T
    r1 = a @ v[:, :k] - uc[:, :k] * s[:k]
    r2 = a.T @ uc[:, :k] - v[:, :k] * s[:k]
    # the residuals' own rounding (probabilistic bound, Higham & Mary 2019) joins the computed residual
    resid = max(np.linalg.norm(r1), np.linalg.norm(r2)) + EPS * np.sqrt(max(h, m)) * np.sqrt(fro2 * k)
    # σ_i² ≤ θ̃_i + Δ: Δ bounds the Gram's rounding (|Ĝ − aaᵀ| ≤ γ_m |a||a|ᵀ) and the eigensolver's
    delta = EPS * (h + m) * fro2
    hi = np.sqrt(np.clip(theta[: k + 1], 0.0, None) + delta)  # upper bounds of σ_1 … σ_(k+1)
    lo = s[: k + 1]  # lower bounds
    gap_lo = lo[k - 1] - hi[k]  # the smallest σ_k − σ_(k+1) can be
    if gap_lo <= gap_rtol * hi[0]:  # possibly tied: only the exact singular values can decide
        return None
    if np.sqrt(2.0) * resid / gap_lo > CERTIFIED_TOL:  # Wedin: sin Θ ≤ ‖R‖ / δ, δ = σ̃_k − σ_(k+1)
        return None
    return WeightSpectrum(fix_signs(uc[:, :k]), s[: k + 1], min(h, m), fro2, False)
