"""Streaming float64 sufficient statistics with an exact merge law (SPEC §3).

The state of one layer is the triple (n, μ, S) of the joint sample Z = [H | Y] ∈ R^{n×(h+t)}:
the count, the mean and the *centred* scatter S = Σ_i (z_i − μ)(z_i − μ)ᵀ. Each field has a merge rule:

    n  = n_a + n_b                                            (sum)
    μ  = μ_a + δ · n_b / n,                δ = μ_b − μ_a     (weighted mean)
    S  = S_a + S_b + δ δᵀ · n_a n_b / n                       (Chan, Golub & LeVeque 1979)

so batches, shards and saved partial states all combine with the one function :func:`merge`.
A batch is reduced by centring on its *own* mean before the Gram product, in float64; a raw uncentred
ZᵀZ − nμμᵀ would lose most digits under the large means of ReLU features.

Tensors stay on the device they arrive on (GPU accumulation) until :meth:`Moments.to_numpy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    """Count, mean and centred scatter of a sample of p-dimensional rows.

    Attributes:
        n: number of rows.
        mean: (p,) float64.
        scatter: (p, p) float64, Σ_i (z_i − mean)(z_i − mean)ᵀ.
    """

    n: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_numpy(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Return ``(n, mean (p,), scatter (p, p))`` as float64 numpy arrays."""
        return self.n, self.mean.detach().cpu().numpy(), self.scatter.detach().cpu().numpy()

    def to(self, device: torch.device | str) -> "Moments":
        return Moments(self.n, self.mean.to(device), self.scatter.to(device))


def batch_moments(z: torch.Tensor) -> Moments:
    """Moments of one batch, centred on the batch's own mean, products in float64.

    Args:
        z: (B, p) tensor of any float dtype, B ≥ 1.

    Example:
        >>> m = batch_moments(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> m.n, m.mean.tolist(), m.scatter.tolist()
        (2, [2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])
    """
    z64 = z.to(torch.float64)  # (B, p)
    mean = z64.mean(dim=0)  # (p,)
    zc = z64 - mean  # (B, p), centred on the batch mean
    return Moments(int(z.shape[0]), mean, zc.T @ zc)  # scatter (p, p)


def merge(a: Moments | None, b: Moments | None) -> Moments | None:
    """Combine the moments of two disjoint samples exactly (Chan, Golub & LeVeque's parallel formula).

    ``merge(batch_moments(A), batch_moments(B))`` equals ``batch_moments(A ∪ B)`` up to rounding.
    ``None`` is the identity (an empty sample).
    """
    if a is None or a.n == 0:
        return b
    if b is None or b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean.to(a.mean.device) - a.mean  # (p,)
    mean = a.mean + delta * (b.n / n)
    scatter = a.scatter + b.scatter.to(a.scatter.device) + torch.outer(delta, delta) * (a.n * b.n / n)
    return Moments(n, mean, scatter)


class Accumulator:
    """Running :class:`Moments` of the rows fed to :meth:`update`; counts rows with NaN/Inf apart.

    Rows that contain a non-finite value are still accumulated (the statistics then turn non-finite and
    the conditions report ``null`` with a warning) but counted in :attr:`nonfinite_rows`, so that the
    warning can say how many rows were affected.
    """

    def __init__(self) -> None:
        self.moments: Moments | None = None
        self.nonfinite_rows = 0

    def update(self, z: torch.Tensor) -> None:
        """Add a (B, p) batch."""
        if z.shape[0] == 0:
            return
        bad = int((~torch.isfinite(z)).any(dim=1).sum())
        self.nonfinite_rows += bad
        self.moments = merge(self.moments, batch_moments(z))

    def merge_from(self, other: "Accumulator") -> None:
        self.moments = merge(self.moments, other.moments)
        self.nonfinite_rows += other.nonfinite_rows


@dataclass(frozen=True)
class LayerStatistics:
    """Finalised statistics of one layer's joint sample [H | Y], split into blocks (numpy float64).

    Attributes:
        n: number of samples N.
        mu_h: (h,) feature mean.   mu_y: (t,) target mean.
        s_hh: (h, h), s_hy: (h, t), s_yy: (t, t): centred scatter blocks (divide by N for Σ).
        nonfinite_rows: rows whose features contained NaN/Inf.
    """

    n: int
    mu_h: np.ndarray
    mu_y: np.ndarray
    s_hh: np.ndarray
    s_hy: np.ndarray
    s_yy: np.ndarray
    nonfinite_rows: int = 0

    @classmethod
    def from_joint(cls, moments: Moments, h: int, nonfinite_rows: int = 0) -> "LayerStatistics":
        """Split the moments of Z = [H | Y] (p = h + t) into the H, Y and cross blocks."""
        n, mean, s = moments.to_numpy()
        return cls(n, mean[:h], mean[h:], s[:h, :h], s[:h, h:], s[h:, h:], nonfinite_rows)


class JointAccumulator(Accumulator):
    """Accumulates a layer's features H (B, h) together with the targets Y (B, t)."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.h = h

    def update_pair(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: feats (B, h), targets (B, t); both are cast to float64 before the product."""
        self.update(torch.cat([feats.to(torch.float64), targets.to(torch.float64)], dim=1))

    def finalize(self) -> LayerStatistics:
        if self.moments is None:
            raise ValueError("no rows were accumulated")
        return LayerStatistics.from_joint(self.moments, self.h, self.nonfinite_rows)
