"""The in-place batch kernels behind ``stats`` (one CPU and one CUDA implementation of the same fold).

Private to the package: ``stats`` holds the public API and the merge law; this module only knows how to
fold one batch into the float64 state fast on each kind of device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

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


# ----------------------------------------------------------------------------- the state and its merge law
#
# State (_State): n folded rows, per-part means [(p_i,)] and scatter blocks {(i, j): (p_i, p_j)}, i ≤ j, over
# the parts of Z = [Z_0 | Z_1 | …] (one part for Accumulator; H and Y for JointAccumulator). Every way of
# adding rows (a CPU block, a device batch, another accumulator, another rank) goes through fold_block: with
# δ_i = m_i − μ_i and w = n·B/(n + B) it adds the block's centred scatter plus Chan's correction
# r_i r_jᵀ, r_i = √w·δ_i, to S_ij, then μ_i += δ_i · B/(n + B), n += B.

BLOCK_BYTES = 32 << 20  # CPU: float64 rows staged per layer before one syrk (≤ 4096 rows; see below)
MAX_BLOCK_ROWS = 4096  # syrk of a 512-wide block reaches ~60 GFLOP/s on 2 cores from 4096 rows, ~35 at 1024

SUM, CHAN = "sum", "chan"  # merge rules a state field declares (torchmetrics' dist_reduce_fx)


def state_field(merge: str, **kwargs: Any) -> Any:
    """A dataclass field that declares how two states combine: ``sum`` adds; ``chan`` goes through fold_block."""
    return field(metadata={"merge": merge}, **kwargs)


def merge_rule(obj: Any, name: str) -> str:
    """The merge rule a dataclass field declared with :func:`state_field`."""
    return obj.__dataclass_fields__[name].metadata["merge"]


@dataclass
class _State:
    n: int = state_field(SUM, default=0)
    means: list = state_field(CHAN, default_factory=list)  # [(p_i,)] numpy or torch float64
    scatter: dict = state_field(CHAN, default_factory=dict)  # {(i, j): (p_i, p_j)}, i ≤ j
    bad: Any = state_field(SUM, default=0)  # rows with a NaN/Inf (a 0-d device tensor on accelerators: no host sync)


def _empty_blocks(sizes: list[int], zeros: Callable[[tuple], Any]) -> dict:
    return {(i, j): zeros((sizes[i], sizes[j])) for i in range(len(sizes)) for j in range(i, len(sizes))}


def _zeros(like: Any, shape: tuple) -> Any:
    """float64 zeros of ``shape`` of the same kind (numpy, or torch on the same device) as ``like``."""
    return like.new_zeros(shape) if isinstance(like, torch.Tensor) else np.zeros(shape)


def fold_block(state: _State, b: int, block_means: list, add_scatter: Callable[[list], None]) -> None:
    """The merge law, written once: fold a disjoint block of ``b`` rows into ``state`` in place.

    Args:
        state: the running state (numpy or torch float64 parts; means and blocks are updated in place).
        b: rows in the block (≥ 1).
        block_means: [(p_i,)] the block's own means.
        add_scatter: called with the correction rows r = [√w·δ_i (p_i,)]; it must add, for every (i, j),
            the block's centred scatter S_b,ij plus r_i r_jᵀ to ``state.scatter[(i, j)]`` (each backend in
            its fastest way: one syrk over rows that end in r, addmm_ + addr_, or a sum of matrices).
    """
    if not state.means:
        state.means = [_zeros(m, m.shape) for m in block_means]
        state.scatter = _empty_blocks([m.shape[0] for m in block_means], lambda shape: _zeros(block_means[0], shape))
    total = state.n + b
    root_w = math.sqrt(state.n * b / total)
    corrections = []
    for mu, m in zip(state.means, block_means):
        delta = m - mu  # (p_i,)
        corrections.append(delta * root_w)  # Chan's correction, as a row
        mu += delta * (b / total)
    add_scatter(corrections)
    state.n = total


def merge_states(a: _State, b: _State) -> None:
    """Fold state ``b`` into state ``a`` (in place; ``b`` unchanged), by the rules the fields declare."""
    if b.n == 0:
        return

    def add(r: list) -> None:
        for (i, j), s in a.scatter.items():
            s += b.scatter[(i, j)] + r[i][:, None] * r[j][None, :]  # S_a + S_b + r_i r_jᵀ

    fold_block(a, b.n, b.means, add)
    for name in a.__dataclass_fields__:
        if merge_rule(a, name) == SUM and name != "n":  # n is summed by fold_block
            setattr(a, name, getattr(a, name) + getattr(b, name))


# ----------------------------------------------------------------------------- the in-place kernels


class _HostFolder:
    """CPU kernel: numpy float64; the parts' rows are staged side by side into one buffer and folded in blocks.

    Staging decouples the Gram block from the caller's batch size: a forward batch of 1024 rows would run
    syrk at about half the rate of a 4096-row block. Staging costs one cast-copy, which the centring needs
    anyway. The parts share one buffer, [Z_0 | Z_1 | …] = [H | Y], so one syrk over p = Σ p_i columns gives
    every block S_ij at once: a separate H×Y product would read the whole block from memory a second time
    (measured 12 % of the fold at h = 512, t = 4), and the centring and Chan row are one pass each. The block
    is at most ``block_rows`` (default ``MAX_BLOCK_ROWS``) rows and ``BLOCK_BYTES`` of float64.
    """

    def __init__(self, block_rows: int | None = None) -> None:
        self.block_rows = block_rows  # None: MAX_BLOCK_ROWS; tests pass a few rows to fold many blocks
        self.buffer = np.empty((1, 0))  # (rows + 1, p) float64; the extra row carries Chan's term
        self.edges: list[int] = []  # part i is buffer[:, edges[i]:edges[i + 1]]
        self.rows = 0  # staged rows not yet folded
        self.cap = 0

    @staticmethod
    def own(x: np.ndarray | torch.Tensor, device: torch.device) -> np.ndarray:
        return _to_host(x)

    def add(self, state: _State, parts: list[torch.Tensor]) -> None:
        arrays = [_host64(z) for z in parts]  # (B, p_i) float32/float64 views, no copy
        if not self.cap:
            self.edges = [0, *np.cumsum([a.shape[1] for a in arrays]).tolist()]
            most = self.block_rows or MAX_BLOCK_ROWS
            self.cap = max(1, min(most, 1 << (max(1, BLOCK_BYTES // (8 * self.edges[-1])).bit_length() - 1)))
        b, done = arrays[0].shape[0], 0
        while done < b:
            take = min(self.cap - self.rows, b - done)
            self._reserve(self.rows + take)
            rows = self.buffer[self.rows : self.rows + take]
            for (lo, hi), a in zip(zip(self.edges, self.edges[1:]), arrays):
                rows[:, lo:hi] = a[done : done + take]  # cast to float64
            self.rows += take
            done += take
            if self.rows == self.cap:
                self.flush(state)

    def _reserve(self, rows: int) -> None:
        """Grow the staging buffer (doubling, up to the block size) so that tiny inputs stay tiny."""
        have = self.buffer.shape[0] - 1
        if rows <= have:
            return
        grown = np.empty((min(self.cap, max(rows, 2 * have)) + 1, self.edges[-1]))
        if self.rows:
            grown[: self.rows] = self.buffer[: self.rows]
        self.buffer = grown

    def flush(self, state: _State) -> None:
        """Fold the staged rows into ``state`` (centre, Chan row, one syrk, then the scatter blocks)."""
        b = self.rows
        if b == 0:
            return
        block, spans = self.buffer[:b], list(zip(self.edges, self.edges[1:]))  # (B, p)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf rows are counted, not warned about
            mean = block.mean(axis=0)  # (p,)
            if not np.isfinite(mean).all():  # a NaN/Inf anywhere reaches its column mean
                state.bad += int((~np.isfinite(block).all(axis=1)).sum())
            block -= mean  # centred on the block mean, in the staging buffer

            def add(corrections: list[np.ndarray]) -> None:
                for (lo, hi), r in zip(spans, corrections):
                    self.buffer[b, lo:hi] = r  # the Chan row: CᵀC over b + 1 rows adds S_block + r rᵀ
                c = self.buffer[: b + 1]
                full = c.T @ c  # (p, p): one buffer times its own transpose, which numpy runs as syrk
                for (i, j), s in state.scatter.items():
                    s += full[spans[i][0] : spans[i][1], spans[j][0] : spans[j][1]]

            fold_block(state, b, [mean[lo:hi] for lo, hi in spans], add)
        self.rows = 0


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
        centred = [z - m for z, m in zip(z64, batch_means)]  # (B, p_i)

        def add(corrections: list[torch.Tensor]) -> None:
            for (i, j), s in state.scatter.items():
                s.addmm_(centred[i].T, centred[j]).addr_(corrections[i], corrections[j])

        fold_block(state, b, batch_means, add)

    def flush(self, state: _State) -> None:
        pass


def _nonfinite_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Number of rows with a NaN/Inf in any part, as a 0-d tensor on the parts' device."""
    bad = torch.zeros(parts[0].shape[0], dtype=torch.bool, device=parts[0].device)
    for z in parts:
        bad |= ~torch.isfinite(z).all(dim=1)
    return bad.sum()
