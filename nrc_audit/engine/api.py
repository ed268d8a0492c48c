"""The Python API: audit an ``nn.Module`` in memory on any iterable of ``(x, y)`` batches.

Same pass, statistics and report code as the CLI (``pipeline.extraction_pass`` / ``build_report``);
raises the package's exceptions (never exits), and leaves the model's mode and device as it found them.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from nrc_audit.config import AnalysisOptions, AuditConfig, Thresholds
from nrc_audit.errors import DatasetError
from nrc_audit.engine.extract import candidate_layers
from nrc_audit.engine.pipeline import build_report, extraction_pass, resolve_device
from nrc_audit.engine.context import DataContext, ModelContext, RunContext
from nrc_audit.outputs.report import Report

IN_MEMORY = "<in-memory>"


def audit(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    rank: int | str | None = AnalysisOptions.rank,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = AuditConfig.exclude,
    device: str | torch.device | None = None,
    thresholds: Thresholds | None = None,
    require_collapsed: int = AnalysisOptions.require_collapsed,
    pinv_rtol: float = AnalysisOptions.pinv_rtol,
    rank_energy: float = AnalysisOptions.rank_energy,
) -> Report:
    """Audit ``model`` for Deep NRC on ``batches`` and return the typed report.

    Args:
        model: any ``nn.Module`` whose output is (B, t) (or (B,) for t = 1).
        batches: iterable of ``(x, y)``: x (B, …) model inputs, y (B, t) or (B,) targets; a ``DataLoader``
            works. Iterated once, in order.
        rank: subspace rank k; None or "auto" → the target's energy rank estimate (≤ t), "t" → t, or an int.
        layers / exclude: glob patterns on module names (``exclude`` defaults to downsample convs).
        device: where to run; None → the model's current device.
        thresholds, require_collapsed, pinv_rtol, rank_energy: as the CLI options of the same names; the
            defaults are the config dataclasses' (``nrc_audit.config``), as everywhere else.

    Returns:
        :class:`nrc_audit.outputs.report.Report` — ``report.layers[i].nrc3``, ``report.summary.collapse_onset``,
        ``report.to_dict()``, ``report.to_table()``.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> x, y = torch.randn(64, 8), torch.randn(64, 2)
        >>> report = audit(net, [(x[:32], y[:32]), (x[32:], y[32:])], require_collapsed=0)
        >>> [layer.name for layer in report.layers]
        ['0', '2']
    """
    analysis = AnalysisOptions(rank, pinv_rtol, rank_energy, require_collapsed, thresholds or Thresholds()).validate()
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    target = resolve_device(str(device)) if device is not None else home
    was_training = model.training
    modules = candidate_layers(model, tuple(layers or ()), tuple(exclude))
    hasher = hashlib.sha256()
    stream = _numbered(batches, hasher)
    try:
        peek = next(stream, None)
        if peek is None:
            raise DatasetError("audit() got no batches; pass an iterable of (x, y) tensors.")
        _, x0, y0 = peek
        model.eval()
        model.to(target)
        stats = extraction_pass(model, modules, _chain(peek, stream), device=target,
                                target_dim=y0.shape[1], input_shape=tuple(x0.shape[1:]))  # fmt: skip
    finally:
        model.to(home)
        model.train(was_training)
    context = RunContext(
        ModelContext(IN_MEMORY, _state_sha256(model), "safetensors", type(model).__name__,
                     sum(p.numel() for p in model.parameters()), ("audited in memory through nrc_audit.audit()",)),
        DataContext(IN_MEMORY, hasher.hexdigest(), "x", "y", stats.n, tuple(x0.shape[1:]), int(y0.shape[1])),
        str(target), int(x0.shape[0]),
    )  # fmt: skip
    return build_report(stats, analysis, context)


def _numbered(batches: Iterable, hasher: "hashlib._Hash") -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(x, y) batches → (first_row, x, y (B, t)); validates finiteness and hashes the data as it streams."""
    row = 0
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(f"each batch must be an (x, y) pair of tensors; got {type(item).__name__}.")
        x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
        y = y.reshape(len(y), -1)
        if len(x) != len(y):
            raise DatasetError(f"batch at row {row}: x has {len(x)} rows but y has {len(y)}.")
        for name, t in (("x", x), ("y", y)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t.reshape(len(t), -1))).any(dim=1).nonzero()[0, 0])
                raise DatasetError(f"{name} has NaN or Inf at row {row + bad} (first bad row).")
        hasher.update(x.detach().cpu().contiguous().numpy().tobytes())
        hasher.update(y.detach().cpu().contiguous().numpy().tobytes())
        yield row, x, y
        row += len(x)


def _chain(first: tuple, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _state_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict's names and tensor bytes: identifies the weights that were audited."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
