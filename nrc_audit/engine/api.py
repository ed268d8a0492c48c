"""The Python API: audit an ``nn.Module`` in memory on any iterable of ``(x, y)`` batches.

Same pass, statistics and report code as the CLI (``pipeline.extraction_pass`` / ``build_report``);
raises the package's exceptions (never exits), and leaves the model's mode and device as it found them.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from nrc_audit.config import AnalysisOptions, AuditConfig, ModelOptions, Thresholds
from nrc_audit.errors import DatasetError
from nrc_audit.engine import distributed
from nrc_audit.engine.layer_kinds import candidate_layers, skipped_layers
from nrc_audit.engine.pipeline import build_report, extraction_pass, resolve_device
from nrc_audit.engine.context import DataContext, ModelContext, RunContext
from nrc_audit.core.stats import PassStatistics
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
    output_key: str | None = ModelOptions.output_key,
    token_pooling: str = ModelOptions.token_pooling,
    across_ranks: bool = False,
) -> Report:
    """Audit ``model`` for Deep NRC on ``batches`` and return the typed report.

    Args:
        model: any ``nn.Module`` whose output is (B, t) (or (B,) for t = 1).
        batches: iterable of ``(x, y)`` or ``(x, y, extra)``: x (B, …) model inputs, y (B, t) or (B,)
            targets, ``extra`` a dict of keyword inputs with B rows each, passed as ``model(x, **extra)``
            (an ``attention_mask`` also masks token pooling); a ``DataLoader`` works. Iterated once, in order.
        rank: subspace rank k; None or "auto" → the target's energy rank estimate (≤ t), "t" → t, or an int.
        layers / exclude: glob patterns on module names (``exclude`` defaults to downsample convs).
        device: where to run; None → the model's current device.
        thresholds, require_collapsed, pinv_rtol, rank_energy, output_key, token_pooling: as the CLI options
            of the same names (``output_key``: the entry of a dict / ModelOutput output, None → 'logits';
            ``token_pooling``: mean | cls | last for Linear inputs (B, T, h)); the defaults are the config
            dataclasses' (``nrc_audit.config``), as everywhere else.
        across_ranks: inside an initialised ``torch.distributed`` group of > 1 rank (DDP training), every rank
            calls ``audit`` with its own shard of the rows (≥ 1 batch each); the per-layer (n, μ, S) are
            all-gathered in float64 and merged in rank order with Chan's formula (as under ``torchrun``), so
            every rank returns the report of all the rows. The data SHA-256 is then the hash of the ranks'
            shard hashes. Without a group it changes nothing.

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
    pending: dict[int, dict[str, torch.Tensor]] = {}  # first row → that batch's extra inputs
    notes = skipped_layers(model, tuple(layers or ()), tuple(exclude))  # + how the output was read, tokens pooled
    stream = _numbered(batches, hasher, pending)
    try:
        peek = next(stream, None)
        if peek is None:
            raise DatasetError("audit() got no batches; pass an iterable of (x, y) tensors.")
        _, x0, y0 = peek
        model.eval()
        model.to(target)
        stats = extraction_pass(model, modules, _chain(peek, stream), device=target, target_dim=y0.shape[1],
                                input_shape=tuple(x0.shape[1:]), extras=lambda row, _: pending.pop(row),
                                token_pooling=token_pooling, output_key=output_key, notes=notes)  # fmt: skip
    finally:
        model.to(home)
        model.train(was_training)
    data_sha = _merge_ranks(stats, target, hasher.hexdigest()) if across_ranks else hasher.hexdigest()
    context = RunContext(
        ModelContext(IN_MEMORY, _state_sha256(model), "safetensors", type(model).__name__,
                     sum(p.numel() for p in model.parameters()),
                     ("audited in memory through nrc_audit.audit()", *notes)),
        DataContext(IN_MEMORY, data_sha, "x", "y", stats.n, tuple(x0.shape[1:]), int(y0.shape[1])),
        str(target), int(x0.shape[0]),
    )  # fmt: skip
    return build_report(stats, analysis, context)


def _merge_ranks(stats: PassStatistics, device: torch.device, data_sha: str) -> str:
    """Inside a process group: every rank's statistics become those of all ranks' rows; returns the data hash
    over the ranks' shard hashes (unchanged outside a group)."""
    group = distributed.joined_group()
    if group is None:
        return data_sha
    distributed.merge_pass(group, stats, device)
    return distributed.combined_digest(group, data_sha)


def _numbered(batches: Iterable, hasher: "hashlib._Hash",
              pending: dict[int, dict[str, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(x, y[, extra]) batches → (first_row, x, y (B, t)), each batch's extra inputs put in ``pending`` under
    its first row; validates shapes and finiteness and hashes the data as it streams."""
    row = 0
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise DatasetError(f"each batch must be an (x, y) or (x, y, extra) tuple; got {type(item).__name__}"
                               f"{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}.")  # fmt: skip
        x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
        y = y.reshape(len(y), -1)
        if len(x) != len(y):
            raise DatasetError(f"batch at row {row}: x has {len(x)} rows but y has {len(y)}.")
        pending[row] = _extra_inputs(item[2] if len(item) == 3 else {}, len(x), row)
        for name, t in (("x", x), ("y", y)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t.reshape(len(t), -1))).any(dim=1).nonzero()[0, 0])
                raise DatasetError(f"{name} has NaN or Inf at row {row + bad} (first bad row).")
        for t in (x, y, *(v for _, v in sorted(pending[row].items()))):  # extra inputs are data too
            hasher.update(t.detach().cpu().contiguous().numpy().tobytes())
        yield row, x, y
        row += len(x)


def _extra_inputs(extra: object, rows: int, row: int) -> dict[str, torch.Tensor]:
    """A batch's keyword inputs as tensors of ``rows`` rows each (DatasetError naming the entry otherwise)."""
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise DatasetError(f"batch at row {row}: the third element must be a dict of keyword inputs "
                           f"(e.g. {{'attention_mask': mask}}); got {type(extra).__name__}.")  # fmt: skip
    tensors = {k: torch.as_tensor(v) for k, v in extra.items()}
    for k, v in tensors.items():
        if v.ndim == 0 or len(v) != rows:
            raise DatasetError(f"batch at row {row}: extra input {k!r} has shape {tuple(v.shape)}; "
                               f"it needs {rows} rows like x.")  # fmt: skip
    return tensors


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
