"""Streaming float64 sufficient statistics with an exact merge law (SPEC §3).

The state of one layer is the triple (n, μ, S) of the joint sample Z = [H | Y] ∈ R^{n×(h+t)}:
the count, the mean and the *centred* scatter S = Σ_i (z_i − μ)(z_i − μ)ᵀ. Each field has a merge rule:

    n  = n_a + n_b                                            (sum)
    μ  = μ_a + δ · n_b / n,                δ = μ_b − μ_a     (weighted mean)
    S  = S_a + S_b + δ δᵀ · n_a n_b / n                       (Chan, Golub & LeVeque 1979)

so batches, shards and saved partial states all combine by one law, written once in
:func:`nrc_audit.core.kernels.fold_block`: the CPU kernel's staged blocks, the device kernel's batches,
:func:`merge`, :meth:`Accumulator.merge_from`, :meth:`PassStatistics.merge_from` and the ranks' merge all
call it. Each piece of state declares its rule (``state_field(SUM | CHAN | SAME)``, after torchmetrics'
``add_state(..., dist_reduce_fx=...)``), and the merges read the declarations.
A batch is reduced by centring on its *own* mean before the Gram product, in float64; a raw uncentred
ZᵀZ − nμμᵀ would lose most digits under the large means of ReLU features.

Two backends run the same algorithm. On the CPU the accumulators keep numpy float64 state, stage rows into
blocks of up to 4096 rows (so that the Gram block does not depend on the caller's batch size), with H and Y
staged side by side in one buffer: one ``Z_cᵀZ_c`` on it, which numpy hands to BLAS ``syrk`` (half the flops
of the GEMM torch would call), gives S_HH, S_HY and S_YY together. Staged rows are folded in before
anything reads the state.
The block's Chan correction rides along as one extra row √(n_a n_b/n)·δ appended to the centred block,
so each scatter block is updated by a single in-place product. On a GPU the state stays on the device
(torch float64, ``addmm_``/``addr_`` in place, no host synchronisation per batch) until :meth:`Moments.to_numpy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nrc_audit.core.facts import DataFacts
from nrc_audit.core.kernels import (CHAN, SUM, _DeviceFolder, _HostFolder, _State, _host64, _to_host, merge_rule,
                                    merge_states, state_field)
from nrc_audit.core.layer import LayerInfo
from nrc_audit.errors import ModelDataMismatchError

SAME = "same"  # a field both sides must hold equal (the audited layers)


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
    host = np.array(_host64(z), dtype=np.float64)  # (B, p), a private copy
    centre = host.mean(axis=0)  # (p,)
    host -= centre  # centred on the batch mean
    return Moments(int(z.shape[0]), torch.from_numpy(centre), torch.from_numpy(host.T @ host))  # syrk


def merge(a: Moments | None, b: Moments | None) -> Moments | None:
    """Combine the moments of two disjoint samples exactly (Chan, Golub & LeVeque's parallel formula).

    ``merge(batch_moments(A), batch_moments(B))`` equals ``batch_moments(A ∪ B)`` up to rounding.
    ``None`` is the identity (an empty sample).
    """
    if a is None or a.n == 0:
        return b
    if b is None or b.n == 0:
        return a
    device = a.mean.device
    total = _State(a.n, [a.mean.clone()], {(0, 0): a.scatter.clone()})
    merge_states(total, _State(b.n, [b.mean.to(device)], {(0, 0): b.scatter.to(device)}))
    return Moments(total.n, total.means[0], total.scatter[(0, 0)])


def kernel_for(device: torch.device, block_rows: int | None = None) -> _HostFolder | _DeviceFolder:
    """The batch kernel for data on ``device`` (tests swap in the device kernel to run it on CPU tensors)."""
    return _HostFolder(block_rows) if device.type == "cpu" else _DeviceFolder()


class _Folding:
    """Shared state and bookkeeping of the accumulators: the folded :class:`_State` plus staged rows."""

    def __init__(self, block_rows: int | None = None) -> None:
        self._state = _State()
        self._block_rows = block_rows  # CPU rows folded at once (None: kernels.MAX_BLOCK_ROWS)
        self._folder: _HostFolder | _DeviceFolder | None = None

    def _fold(self, parts: list[torch.Tensor]) -> None:
        if len({int(p.shape[0]) for p in parts}) > 1:  # the parts are one sample's columns: same rows, same order
            raise ValueError(f"parts of one batch have different row counts {[int(p.shape[0]) for p in parts]}")
        if int(parts[0].shape[0]) == 0:
            return
        if self._folder is None:
            self._folder = kernel_for(parts[0].device, self._block_rows)
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
        assert self._folder is not None  # chosen by _fold just before
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


class JointAccumulator(Accumulator):
    """Accumulates a layer's features H (B, h) together with the targets Y (B, t).

    The state is kept as the blocks (μ_H, μ_Y, S_HH, S_HY, S_YY); :attr:`moments` assembles the joint
    (h + t)-dimensional moments on demand.
    """

    def __init__(self, h: int, block_rows: int | None = None) -> None:
        super().__init__(block_rows)
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


@dataclass
class PassStatistics:
    """Everything one pass accumulates: per-layer joint moments, target moments and the model's SSE.

    Each field declares how two passes over disjoint rows combine (:meth:`merge_from`, by batches of ranks
    as by shards): ``joint``/``targets`` by Chan's formula, ``sse``/``n`` by sums, ``layers`` must agree.
    """

    layers: list[LayerInfo] = state_field(SAME, default_factory=list)
    joint: list[JointAccumulator] = state_field(CHAN, default_factory=list)
    targets: Accumulator = state_field(CHAN, default_factory=Accumulator)
    sse: float = state_field(SUM, default=0.0)
    n: int = state_field(SUM, default=0)
    # rank-local (not merged over ranks): the label heuristics of the warnings read rank 0's rows under torchrun
    facts: DataFacts = field(default_factory=DataFacts, metadata={"merge": None})
    _sse_pending: torch.Tensor | None = field(default=None, repr=False, metadata={"merge": None})
    # the modules whose layers this pass folds (a group of a memory plan); None: all. An accumulator left
    # unfolded holds no memory.
    active: frozenset[str] | None = field(default=None, metadata={"merge": None})

    def folds(self, layer: LayerInfo) -> bool:
        mine = self.active is None or layer.name in self.active or module_of(layer.name) in self.active
        return layer.shares_input_with is None and mine

    def update(self, layers: list[LayerInfo], outputs: torch.Tensor, y: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Add one batch: outputs (B, t), y (B, t), feats [(B, h_ℓ)] — all on the same device.

        On an accelerator nothing here waits for the device: the squared error is summed on the device and
        folded into :attr:`sse` by :meth:`flush` (``extraction_pass`` calls it after the last batch).
        """
        if not self.joint:
            self.layers, self.joint = layers, shared_accumulators(layers)
        y64 = y.to(device=outputs.device, dtype=torch.float64)
        wrong = [(layer.name, int(f.shape[0])) for layer, f in zip(self.layers, feats) if f.shape[0] != y.shape[0]]
        if wrong or outputs.shape[0] != y.shape[0]:  # rows are paired by position: never fold a misaligned batch
            raise ModelDataMismatchError(
                f"a batch of {int(y.shape[0])} target rows came with {int(outputs.shape[0])} output rows and "
                f"feature rows {wrong or 'as many'}; every layer's features need one row per sample."
            )
        for layer, acc, f in zip(self.layers, self.joint, feats):
            if self.folds(layer):  # a shared input is folded once, into its first layer's accumulator
                acc.update_pair(f, y64)
        self.targets.update(y64)
        self.facts.observe_targets(y64)
        sq = ((outputs.to(torch.float64) - y64) ** 2).sum()  # 0-d, on the batch's device
        if sq.device.type == "cpu":
            self.sse += float(sq)
        else:
            self._sse_pending = sq if self._sse_pending is None else self._sse_pending + sq
        self.n += int(y.shape[0])

    def flush(self) -> None:
        """Bring the device-side squared-error sum into :attr:`sse` (one host synchronisation)."""
        if self._sse_pending is not None:
            self.sse += float(self._sse_pending)
            self._sse_pending = None

    def merge_from(self, other: "PassStatistics") -> None:
        """Fold the statistics of a pass over other, disjoint rows into this one, field by declared rule."""
        self.flush()
        other.flush()
        if not self.joint:
            self.layers, self.joint = other.layers, shared_accumulators(other.layers)
        for name in self.__dataclass_fields__:
            rule, mine, theirs = merge_rule(self, name), getattr(self, name), getattr(other, name)
            if rule == SUM:
                setattr(self, name, mine + theirs)
            elif rule == CHAN:
                for a, b in distinct(self.layers, mine, theirs) if isinstance(mine, list) else [(mine, theirs)]:
                    a.merge_from(b)
            elif rule == SAME and [x.name for x in mine] != [x.name for x in theirs]:
                raise ValueError(f"cannot merge passes over different layers ({len(mine)} vs {len(theirs)})")


def shared_accumulators(layers: list[LayerInfo]) -> list[JointAccumulator]:
    """One accumulator per layer; a layer that shares its input holds its first layer's (the same object)."""
    accs: list[JointAccumulator] = []
    for layer in layers:
        src = layer.shares_input_with
        accs.append(JointAccumulator(layer.in_dim) if src is None else accs[src])
    return accs


def distinct(layers: list[LayerInfo], *per_layer: list) -> list[tuple]:
    """The entries of per-layer lists for the layers with an input of their own (each shared state once)."""
    return [tuple(items) for layer, *items in zip(layers, *per_layer) if layer.shares_input_with is None]


def module_of(layer_name: str) -> str:
    """The module a layer name refers to (``NAME#k``, the k-th call of a shared module, is ``NAME``)."""
    return layer_name.split("#", 1)[0]


def combine_groups(parts: list[PassStatistics]) -> PassStatistics:
    """The statistics of passes over the same rows that each folded one group of layers, as one pass's."""
    total = parts[0]
    for part in parts[1:]:
        for i, layer in enumerate(total.layers):
            if part.folds(layer):
                total.joint[i] = part.joint[i]
    total.active = None
    total.joint = [acc if layer.shares_input_with is None else total.joint[layer.shares_input_with]
                   for layer, acc in zip(total.layers, total.joint)]  # fmt: skip
    return total
