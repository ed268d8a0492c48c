"""The identity of an audited layer, shared by the pass, the feature store and the report, and the rule that
ties a layer's captured input to the rows of the batch (:func:`find_rows`, :func:`rows_first`).

A layer input is a tensor whose *row axis* carries the batch: (B, h) for an MLP, (B, T, h) for a batch-first
sequence, (T, B, h) for a seq-first one (``nn.TransformerEncoder`` with ``batch_first=False``), (B·T, h) for
tokens flattened before a Linear. The row axis is the one dim whose size follows the batch size: the pass
compares the input's shape for the B rows of a batch with its shape for a probe of B' ≠ B rows of the same
batch. A flattened dim (B·c) is ordered batch-major (row b's c entries together) or token-major (c blocks of
B); the probe's values decide which. Nothing else is guessed: when no single dim follows the batch, the
layer is refused by name (never a feature row paired with the wrong target row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerInfo:
    """An audited layer: position in execution order, module path, kind, dims and its weight W."""

    index: int
    name: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    in_dim: int  # h (Linear in_features, Conv2d in_channels)
    out_dim: int
    pooled: bool
    weight: torch.Tensor  # Linear (out, h); Conv2d (c_out, c_in, kh, kw); on the CPU, detached
    # the index of the first layer that reads the very same input tensor (q/k/v, gate/up): its statistics
    # and stored features serve this layer too; None when the input is this layer's own
    shares_input_with: int | None = None


@dataclass(frozen=True)
class RowLayout:
    """Where a layer input keeps the batch rows.

    Attributes:
        axis: the dim that carries the rows (0: batch-first, 1: seq-first (T, B, h)).
        per_row: entries of that dim per batch row (c > 1: a flattened (B·c) dim).
        major: ``"batch"`` (row b's c entries are adjacent) or ``"token"`` (c blocks of B rows); only
            meaningful when ``per_row > 1``.
    """

    axis: int = 0
    per_row: int = 1
    major: str = "batch"

    def describe(self, ndim: int) -> str | None:
        """How the input was read, for the report (None for the plain batch-first layout)."""
        if self.per_row > 1:
            order = "(B, c)" if self.major == "batch" else "(c, B)"
            return f"flattened {order} rows (B·{self.per_row}) on dim {self.axis}, reshaped to B rows and pooled"
        if self.axis != 0:
            return f"rows on dim {self.axis} of {ndim} (seq-first), moved to the front and pooled over the rest"
        return None


def find_rows(shape: tuple[int, ...], batch: int, probe: tuple[int, ...] | None, probe_batch: int,
              axes: tuple[int, ...], hint: int | None = None) -> RowLayout | str:  # fmt: skip
    """The row axis of an input of ``shape`` for ``batch`` rows, or the reason it cannot be told.

    Args:
        shape: the input's shape for the batch; ``probe``: its shape for ``probe_batch`` ≠ ``batch`` rows
            of the same batch (None: no probe ran).
        axes: the dims that may carry the rows (a conv: only 0; a Linear: all but the feature dim).
        hint: the row axis the module declares (``batch_first``), used only to break a tie without a probe.
    Returns:
        the layout (``major`` is decided later, from values, for ``per_row > 1``) or an explanation.
    """
    if probe is not None and len(probe) == len(shape):
        follow = [d for d in axes if shape[d] != probe[d] and shape[d] % batch == 0 and probe[d] % probe_batch == 0
                  and shape[d] // batch == probe[d] // probe_batch]  # fmt: skip
        if len(follow) == 1:
            return RowLayout(follow[0], shape[follow[0]] // batch)
        if not follow:
            return (f"no dim of its input follows the batch size (shape {shape} for {batch} rows, {probe} for "
                    f"{probe_batch}), so its rows cannot be tied to the samples")  # fmt: skip
        return f"dims {follow} of its input (shape {shape}) all follow the batch size; which one holds the rows is ambiguous"
    exact = [d for d in axes if shape[d] == batch]
    if len(exact) == 1 or (exact and batch == 1):
        return RowLayout(exact[0] if hint not in exact else hint)
    if hint in exact:
        return RowLayout(hint)
    if exact:
        return (f"dims {exact} of its input (shape {shape}) both equal the batch size {batch} and no probe "
                "could tell them apart")  # fmt: skip
    return f"no dim of its input (shape {shape}) equals the batch size {batch} and no probe could tell how it is flattened"


def row_signature(h: torch.Tensor, axis: int) -> torch.Tensor:
    """(n,) float64: each entry along ``axis`` projected on one fixed pseudo-random direction of the other dims.

    Two inputs that hold the same rows in the same order have the same signature (up to rounding); a fixed
    random direction rather than a plain sum keeps rows apart whose features share a sum (softmax outputs).
    """
    flat = h.detach().movedim(axis, 0).reshape(h.shape[axis], -1).to(torch.float64)  # (n, m)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(flat.shape[1], generator=gen, dtype=torch.float64).to(flat.device)  # (m,)
    return flat @ w


def flattened_order(full: torch.Tensor, probe_signature: torch.Tensor, layout: RowLayout, rows: list[int]) -> str | None:
    """Which order of a flattened row dim reproduces the probe: ``"batch"`` ((B, c)), ``"token"`` ((c, B)) or
    None when neither (or both) does.

    Args:
        full: the input for the whole batch, B·c entries on ``layout.axis``.
        probe_signature: :func:`row_signature` of the input for the batch rows ``rows`` (len(rows)·c entries).
    """
    c = layout.per_row
    sig = row_signature(full, layout.axis)  # (B·c,)
    b = sig.shape[0] // c
    idx = torch.as_tensor(rows, device=sig.device)
    candidates = {"batch": sig.reshape(b, c)[idx].reshape(-1), "token": sig.reshape(c, b)[:, idx].reshape(-1)}
    probe = probe_signature.to(sig.device)
    scale = float(sig.abs().max()) if sig.numel() else 0.0
    gaps = sorted((float((v - probe).abs().max()), k) for k, v in candidates.items() if v.shape == probe.shape)
    if len(gaps) < 2:
        return None
    (best, order), (other, _) = gaps
    # a forward of fewer rows rounds differently (bfloat16: ~1e-2), the wrong order is off by the rows' spread
    return order if best <= 1e-2 * scale and other > 10 * best else None


def rows_first(h: torch.Tensor, layout: RowLayout, batch: int) -> torch.Tensor:
    """The input with the rows in front: (B, …); a flattened (B·c) dim becomes (B, c) right after them."""
    h = h.movedim(layout.axis, 0) if layout.axis else h
    if layout.per_row == 1:
        return h
    c = layout.per_row
    if layout.major == "batch":
        return h.reshape(batch, c, *h.shape[1:])  # (B, c, …)
    return h.reshape(c, batch, *h.shape[1:]).transpose(0, 1)  # (c, B, …) → (B, c, …)
