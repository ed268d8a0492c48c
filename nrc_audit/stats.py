"""Streaming float64 sufficient statistics with an exact merge law (SPEC §3).

The state of one layer is the triple (n, μ, S) of the joint sample Z = [H | Y] ∈ R^{n×(h+t)}:
the count, the mean and the *centred* scatter S = Σ_i (z_i − μ)(z_i − μ)ᵀ. Each field has a merge rule:

    n  = n_a + n_b                                            (sum)
    μ  = μ_a + δ · n_b / n,                δ = μ_b − μ_a     (weighted mean)
    S  = S_a + S_b + δ δᵀ · n_a n_b / n                       (Chan, Golub & LeVeque 1979)

so batches, shards and saved partial states all combine with the one function :func:`merge`.
A batch is reduced by centring on its *own* mean before the Gram product, in float64; a raw uncentred
ZᵀZ − nμμᵀ would lose most digits under the large means of ReLU features.

Two backends run the same algorithm. On the CPU the accumulators keep numpy float64 state and form the
feature block as H_cᵀH_c on one buffer, which numpy hands to BLAS ``syrk`` (half the flops of the GEMM
torch would call); the small H–Y and Y–Y blocks are separate products, so [H | Y] is never concatenated.
The batch's Chan correction δδᵀ·n_a n_b/n rides along as one extra row √(n_a n_b/n)·δ appended to the
centred batch, so each block is updated by a single in-place add. On a GPU the state stays on the device
(torch float64, ``addmm_``/``addr_`` in place, no host synchronisation per batch) until :meth:`Moments.to_numpy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _host64(z: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array numpy can promote exactly to float64 (float32/float64 views, else a cast)."""
    z = z.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.to(torch.float64)
    return z.numpy()


def batch_moments(z: torch.Tensor) -> Moments:
    """Moments of one batch, centred on the batch's own mean, products in float64.

    Args:
        z: (B, p) tensor of any float dtype, B ≥ 1.

    Example:
        >>> m = batch_moments(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> m.n, m.mean.tolist(), m.scatter.tolist()
        (2, [2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])
    """
    if z.shape[0] == 0:
        p = int(z.shape[1])
        zeros = torch.zeros(p, dtype=torch.float64, device=z.device)
        return Moments(0, zeros, zeros.new_zeros((p, p)))
    if z.device.type != "cpu":
        z64 = z.to(torch.float64)  # (B, p)
        mean = z64.mean(dim=0)  # (p,)
        zc = z64 - mean  # (B, p), centred on the batch mean
        return Moments(int(z.shape[0]), mean, zc.T @ zc)  # scatter (p, p)
    z64 = np.array(_host64(z), dtype=np.float64)  # (B, p), a private copy
    mean = z64.mean(axis=0)  # (p,)
    z64 -= mean  # centred on the batch mean
    return Moments(int(z.shape[0]), torch.from_numpy(mean), torch.from_numpy(z64.T @ z64))  # syrk


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


# ----------------------------------------------------------------------------- the in-place kernels
#
# State (_State): n folded rows, per-part means [(p_i,)] and scatter blocks {(i, j): (p_i, p_j)}, i ≤ j, over
# the parts of Z = [Z_0 | Z_1 | …] (one part for Accumulator; H and Y for JointAccumulator). Folding a block
# of B rows with block means m_i: δ_i = m_i − μ_i, w = n·B/(n + B); each part is centred on m_i into a
# (B + 1, p_i) float64 buffer whose last row is √w·δ_i, so S_ij += C_iᵀ C_j adds S_block,ij + w δ_i δ_jᵀ
# (Chan's formula) in one product; then μ_i += δ_i · B/(n + B), n += B.

BLOCK_BYTES = 32 << 20  # CPU: float64 rows staged per layer before one syrk (≤ 4096 rows; see below)
MAX_BLOCK_ROWS = 4096  # syrk of a 512-wide block reaches ~60 GFLOP/s on 2 cores from 4096 rows, ~35 at 1024


@dataclass
class _State:
    n: int = 0
    means: list = field(default_factory=list)
    scatter: dict = field(default_factory=dict)
    bad: int = 0  # rows with a NaN/Inf (a 0-d device tensor on accelerators, to avoid a host sync)


def _empty_blocks(sizes: list[int], zeros) -> dict:
    return {(i, j): zeros((sizes[i], sizes[j])) for i in range(len(sizes)) for j in range(i, len(sizes))}


class _HostFolder:
    """CPU kernel: numpy float64; rows are staged into per-part buffers and folded in blocks.

    Staging decouples the Gram block from the caller's batch size: a forward batch of 1024 rows would run
    syrk at about half the rate of a 4096-row block. Staging costs one cast-copy, which the centring needs
    anyway. The block is at most ``MAX_BLOCK_ROWS`` rows and ``BLOCK_BYTES`` of float64 per accumulator.
    """

    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []  # (rows + 1, p_i) float64; the extra row carries Chan's term
        self.rows = 0  # staged rows not yet folded
        self.cap = 0

    @staticmethod
    def own(x: np.ndarray | torch.Tensor, device: torch.device) -> np.ndarray:
        return _to_host(x)

    def add(self, state: _State, parts: list[torch.Tensor]) -> None:
        arrays = [_host64(z) for z in parts]  # (B, p_i) float32/float64 views, no copy
        if not self.cap:
            width = sum(a.shape[1] for a in arrays)
            self.cap = max(1, min(MAX_BLOCK_ROWS, 1 << (max(1, BLOCK_BYTES // (8 * width)).bit_length() - 1)))
        b, done = arrays[0].shape[0], 0
        while done < b:
            take = min(self.cap - self.rows, b - done)
            self._reserve(self.rows + take, arrays)
            for buf, a in zip(self.buffers, arrays):
                buf[self.rows : self.rows + take] = a[done : done + take]  # cast to float64
            self.rows += take
            done += take
            if self.rows == self.cap:
                self.flush(state)

    def _reserve(self, rows: int, arrays: list[np.ndarray]) -> None:
        """Grow the staging buffers (doubling, up to the block size) so that tiny inputs stay tiny."""
        have = self.buffers[0].shape[0] - 1 if self.buffers else 0
        if rows <= have:
            return
        grown = [np.empty((min(self.cap, max(rows, 2 * have)) + 1, a.shape[1])) for a in arrays]
        for new, old in zip(grown, self.buffers):
            new[: self.rows] = old[: self.rows]
        self.buffers = grown

    def flush(self, state: _State) -> None:
        """Fold the staged rows into ``state`` (centre, Chan row, syrk/GEMM into the scatter blocks)."""
        b = self.rows
        if b == 0:
            return
        blocks = [buf[:b] for buf in self.buffers]  # (B, p_i)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf rows are counted, not warned about
            batch_means = [blk.mean(axis=0) for blk in blocks]  # (p_i,)
            if not all(np.isfinite(m).all() for m in batch_means):  # a NaN/Inf anywhere reaches its column mean
                state.bad += int(np.logical_or.reduce([~np.isfinite(blk).all(axis=1) for blk in blocks]).sum())
            if not state.means:
                state.means = [np.zeros_like(m) for m in batch_means]
                state.scatter = _empty_blocks([m.shape[0] for m in batch_means], np.zeros)
            w = state.n * b / (state.n + b)
            for buf, blk, m, mu in zip(self.buffers, blocks, batch_means, state.means):
                delta = m - mu
                blk -= m  # centred on the block mean
                np.multiply(delta, np.sqrt(w), out=buf[b])  # the Chan correction row
                mu += delta * (b / (state.n + b))
            _add_products(state.scatter, [buf[: b + 1] for buf in self.buffers])
        state.n += b
        self.rows = 0


def _add_products(scatter: dict, centred: list[np.ndarray]) -> None:
    """S_ij += C_iᵀ C_j for every block; i == j is one buffer times its own transpose, which numpy runs as syrk."""
    for (i, j), s in scatter.items():
        s += centred[i].T @ centred[j]


class _DeviceFolder:
    """Accelerator kernel: torch float64 on the data's device, in-place ``addmm_``/``addr_``, no host sync."""

    rows = 0  # nothing is staged: every batch is folded at once

    @staticmethod
    def own(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float64).to(device, copy=True)

    def add(self, state: _State, parts: list[torch.Tensor]) -> None:
        b = int(parts[0].shape[0])
        z64 = [z.detach().to(torch.float64) for z in parts]  # (B, p_i)
        batch_means = [z.mean(dim=0) for z in z64]
        finite = torch.stack([torch.isfinite(m).all() for m in batch_means]).all()  # stays on the device
        state.bad = state.bad + torch.where(finite, 0, _nonfinite_rows(parts))  # counted lazily
        if not state.means:
            state.means = [torch.zeros_like(m) for m in batch_means]
            state.scatter = _empty_blocks([m.shape[0] for m in batch_means],
                                          lambda shape: batch_means[0].new_zeros(shape))  # fmt: skip
        w = state.n * b / (state.n + b)
        centred = [z - m for z, m in zip(z64, batch_means)]  # (B, p_i)
        deltas = [m - mu for m, mu in zip(batch_means, state.means)]
        for (i, j), s in state.scatter.items():
            s.addmm_(centred[i].T, centred[j]).addr_(deltas[i], deltas[j], alpha=w)
        for mu, d in zip(state.means, deltas):
            mu.add_(d, alpha=b / (state.n + b))
        state.n += b

    def flush(self, state: _State) -> None:
        pass


def _nonfinite_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Number of rows with a NaN/Inf in any part, as a 0-d tensor on the parts' device."""
    bad = torch.zeros(parts[0].shape[0], dtype=torch.bool, device=parts[0].device)
    for z in parts:
        bad |= ~torch.isfinite(z).all(dim=1)
    return bad.sum()


class _Folding:
    """Shared state and bookkeeping of the accumulators: the folded :class:`_State` plus staged rows."""

    def __init__(self) -> None:
        self._state = _State()
        self._folder: _HostFolder | _DeviceFolder | None = None

    @property
    def _n(self) -> int:
        return self._state.n + (self._folder.rows if self._folder is not None else 0)

    def _fold(self, parts: list[torch.Tensor]) -> None:
        if int(parts[0].shape[0]) == 0:
            return
        if self._folder is None:
            self._folder = _HostFolder() if parts[0].device.type == "cpu" else _DeviceFolder()
            self._adopt(parts[0].device)
        self._folder.add(self._state, parts)

    def _settled(self) -> _State:
        """The state with every staged row folded in."""
        if self._folder is not None:
            self._folder.flush(self._state)
        return self._state

    @property
    def nonfinite_rows(self) -> int:
        """Rows seen so far that contained a NaN or Inf (in any part)."""
        return int(self._settled().bad)

    @nonfinite_rows.setter
    def nonfinite_rows(self, value: int) -> None:
        self._settled().bad = int(value)

    def _adopt(self, device: torch.device) -> None:
        """Put existing state (set through :attr:`moments`) where the chosen kernel keeps it."""
        own, st = self._folder.own, self._state
        st.means = [own(m, device) for m in st.means]
        st.scatter = {key: own(block, device) for key, block in st.scatter.items()}

    def _joint(self) -> Moments | None:
        """The state as joint :class:`Moments` (fresh torch float64 tensors, on the state's device)."""
        st = self._settled()
        if st.n == 0:
            return None
        k = len(st.means)
        blocks = {key: torch.as_tensor(s) for key, s in st.scatter.items()}
        rows = [torch.cat([blocks[(i, j)] if i <= j else blocks[(j, i)].T for j in range(k)], dim=1) for i in range(k)]
        mean = torch.cat([torch.as_tensor(m) for m in st.means])
        return Moments(st.n, mean.clone(), torch.cat(rows, dim=0).clone())

    def _set_joint(self, m: Moments | None, sizes: list[int]) -> None:
        """Replace the state by (a private copy of) ``m``, split into parts of the given sizes."""
        bad = self._settled().bad
        self._folder, self._state = None, _State(bad=bad)
        if m is None or m.n == 0:
            return
        edges = np.cumsum([0, *sizes])
        own = lambda x: x.detach().to(torch.float64).clone()  # noqa: E731 — the next _fold adopts it
        self._state.n = int(m.n)
        self._state.means = [own(m.mean[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        self._state.scatter = {(i, j): own(m.scatter[edges[i]:edges[i + 1], edges[j]:edges[j + 1]])
                               for i in range(len(sizes)) for j in range(i, len(sizes))}  # fmt: skip


class Accumulator(_Folding):
    """Running :class:`Moments` of the rows fed to :meth:`update`; counts rows with NaN/Inf apart.

    Rows that contain a non-finite value are still accumulated (the statistics then turn non-finite and
    the conditions report ``null`` with a warning) but counted in :attr:`nonfinite_rows`, so that the
    warning can say how many rows were affected.
    """

    @property
    def moments(self) -> Moments | None:
        """The running moments (a snapshot: later updates do not change it), or None before any row."""
        return self._joint()

    @moments.setter
    def moments(self, m: Moments | None) -> None:
        self._set_joint(m, [] if m is None else [m.dim])

    def update(self, z: torch.Tensor) -> None:
        """Add a (B, p) batch."""
        self._fold([_rows(z)])

    def merge_from(self, other: "Accumulator") -> None:
        """Fold another accumulator's rows into this one (Chan's formula); ``other`` is not changed."""
        bad = self.nonfinite_rows + other.nonfinite_rows
        self.moments = merge(self.moments, other.moments)
        self.nonfinite_rows = bad


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
    """Accumulates a layer's features H (B, h) together with the targets Y (B, t).

    The state is kept as the blocks (μ_H, μ_Y, S_HH, S_HY, S_YY); :attr:`moments` assembles the joint
    (h + t)-dimensional moments on demand.
    """

    def __init__(self, h: int) -> None:
        super().__init__()
        self.h = h

    @property
    def moments(self) -> Moments | None:
        return self._joint()

    @moments.setter
    def moments(self, m: Moments | None) -> None:
        self._set_joint(m, [] if m is None else [self.h, m.dim - self.h])

    def update_pair(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: feats (B, h), targets (B, t) on one device; products in float64."""
        targets = targets.to(feats.device)
        self._fold([feats, _rows(targets)])

    def finalize(self) -> LayerStatistics:
        """The statistics of every row added so far, as numpy float64 blocks (copies)."""
        st = self._settled()
        if st.n == 0:
            raise ValueError("no rows were accumulated")
        mu_h, mu_y = (_to_host(m) for m in st.means)
        s = {key: _to_host(block) for key, block in st.scatter.items()}
        return LayerStatistics(st.n, mu_h, mu_y, s[(0, 0)], s[(0, 1)], s[(1, 1)], int(st.bad))


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1); (B, p) unchanged; (B, …) flattened to (B, p), also for B = 0."""
    if z.ndim == 2:
        return z
    return z.unsqueeze(1) if z.ndim == 1 else z.flatten(1)


def _to_host(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A private float64 numpy copy of one piece of state."""
    return np.array(x if isinstance(x, np.ndarray) else x.detach().cpu().numpy(), dtype=np.float64)
