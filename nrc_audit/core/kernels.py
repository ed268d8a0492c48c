"""The in-place batch kernels behind ``stats`` (one CPU and one CUDA implementation of the same fold).

Private to the package: ``stats`` holds the public API and the merge law; this module only knows how to
fold one batch into the float64 state fast on each kind of device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

def _host64(z: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array numpy can promote exactly to float64 (float32/float64 views, else a cast)."""
    z = z.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.to(torch.float64)
    return z.numpy()


def _to_host(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A private float64 numpy copy of one piece of state."""
    return np.array(x if isinstance(x, np.ndarray) else x.detach().cpu().numpy(), dtype=np.float64)


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
