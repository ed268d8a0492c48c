"""The one pass: read a batch → forward with hooks → per-layer float64 statistics → next batch.

Per batch (on the model's device): the forward runs with hooks on the audited layers, the features are
queued to the store writer (if any), and the float64 folds run one batch behind on a worker thread.
:func:`audit_rows` runs the pass over rows of an HDF5 file for the CLI; :func:`extraction_pass` is the
pass itself, shared with the Python API. What the pass found out about the model on its first batch (how
the output was read, how tokens were pooled) comes back in its result, as do the statistics and the
store's writer, still open: the caller completes it once the report exists.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from nrc_audit.engine import overlap, threads
from nrc_audit.config import AuditConfig
from nrc_audit.errors import Interrupted, ModelDataMismatchError, NrcAuditError, OptionsError
from nrc_audit.io.plan import plan_audit
from nrc_audit.core.layer import LayerInfo
from nrc_audit.engine.extract import FeatureExtractor
from nrc_audit.engine.layer_kinds import candidate_layers, skipped_layers
from nrc_audit.engine.model_io import check_output, lazy_dry_run, model_dtype, prepare_inputs
from nrc_audit.models.architecture import resolve_model, user_forward_error
from nrc_audit.io.hf_layout import load_model_files, sha256_path
from nrc_audit.io.dataset import HDF5Dataset
from nrc_audit.core.stats import PassStatistics, combine_groups
from nrc_audit.io.store import FeatureStoreWriter
from nrc_audit.outputs.context import DataContext, ModelContext, RunContext

ProgressHook = Callable[[int, int], None]  # (rows done, rows total)
Batch = tuple[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]  # (first row, x (B, …), y (B, t), extra)


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cpu'; 'cuda' / 'cuda:i' (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionsError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:INDEX.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionsError(f"--device {name}: CUDA is not available here; use --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionsError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present.")
    elif device.type != "cpu":
        raise OptionsError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:INDEX.")
    return device


@dataclass(frozen=True)
class StoreRequest:
    """Where the pass writes its features: ``path`` for ``num_rows`` rows (numbered from 0), the run
    ``context`` the store records (the first batch's notes are added to it) and the HDF5 compression."""

    path: Path
    num_rows: int
    context: RunContext
    compression: str | None = None


@dataclass
class Extracted:
    """What one pass returns: the statistics, the notes the first batch taught (the output container read,
    the token pooling; for the report's assumptions) and the store's writer, open and still writing what
    is queued, for the caller to ``close(complete=True)`` once the report exists, or to ``discard``."""

    stats: PassStatistics
    notes: tuple[str, ...]
    writer: FeatureStoreWriter | None = None


@dataclass
class Pass:
    """A pass over rows of a data file: statistics, the run context with the pass's notes, the open writer."""

    stats: PassStatistics
    context: RunContext
    writer: FeatureStoreWriter | None = None


@dataclass
class Inputs:
    """The opened model and data of one audit, and what the report will say about them."""

    model: torch.nn.Module
    modules: dict[str, torch.nn.Module]
    ds: HDF5Dataset
    context: RunContext
    groups: tuple[tuple[str, ...], ...] = ((),)  # the memory plan's layer groups, one pass over the data each


def audit_rows(config: AuditConfig, device: torch.device, progress: ProgressHook | None = None) -> Pass:
    """The single-process pass over every row of the data file, the store written to ``config.features_path``.
    When the memory plan splits the layers into groups, one pass per group: the first writes the store, each
    folds its group's statistics, and the parts are joined (exact: every layer is folded by exactly one pass)."""
    done = None
    try:
        with opened(config, device) as inputs:
            rows = (0, inputs.ds.info.num_samples)
            done = pass_rows(config, inputs, device, rows, config.features_path, progress)
            later = [pass_rows(config, inputs, device, rows, None, progress, g).stats for g in range(1, len(inputs.groups))]
            if later:
                done = Pass(combine_groups([done.stats, *later]), done.context, done.writer)
    except BaseException:  # closing the inputs failed or was interrupted: the open store goes too
        if done is not None and done.writer is not None:
            done.writer.discard()
        raise
    return done


@contextlib.contextmanager
def opened(config: AuditConfig, device: torch.device) -> Iterator[Inputs]:
    """The checkpoint rebuilt on ``device`` and the data file open, both checked before any batch is read."""
    ckpt = load_model_files(config.model_path)
    resolved = resolve_model(ckpt, config.model, lazy_dry_run(config.data_path, config.data))
    model = resolved.module.to(device)
    with HDF5Dataset(config.data_path, config.data) as ds:
        info = ds.info
        ds.compute_dtype = model_dtype(model)  # X beyond float32 is refused for a float32 model (io/dataset.py)
        modules = candidate_layers(model, config.layers, config.exclude)
        plan = plan_audit(modules, info.num_samples, info.input_shape, config.batch_size, config.features_path,
                          8 if ds.compute_dtype == torch.float64 else 4, info.target_dim)  # before any batch is read
        for line in plan.notices() if config.progress or len(plan.groups) > 1 else []:
            print(f"nrc-audit: {line}", file=sys.stderr, flush=True)
        data_notes = prepare_inputs(model, ds, device, ds.compute_dtype)  # may pass a mask, keep uint8 ids
        context = RunContext(
            ModelContext(str(config.model_path), sha256_path(config.model_path), ckpt.format, resolved.architecture,
                         resolved.num_parameters, tuple(resolved.assumptions) + tuple(data_notes)
                         + tuple(skipped_layers(model, config.layers, config.exclude))),
            DataContext(str(config.data_path), sha256_path(config.data_path), info.x_key, info.y_key,
                        info.num_samples, tuple(info.input_shape), info.target_dim),
            str(device), config.batch_size,
            uint8_unscaled=ds.info.x_kind == "uint8" and not config.data.scale_uint8,  # not if kept as ids
        )  # fmt: skip
        yield Inputs(model, modules, ds, context, plan.groups)


def pass_rows(config: AuditConfig, inputs: Inputs, device: torch.device, rows: tuple[int, int],
              store_path: Path | None, progress: ProgressHook | None, group: int = 0) -> Pass:  # fmt: skip
    """The one pass over rows [start, stop) of the data, writing them (renumbered from 0) to ``store_path``.

    The returned context adds what the first batch taught to the model's assumptions; the store records
    that same context."""
    (start, stop), info, ds = rows, inputs.ds.info, inputs.ds
    keyed = bool(ds.opts.input_keys)  # the data file may add a padding mask (model_io.prepare_inputs)
    batches = ((a - start, x, y, ds.extras(a, a + len(y)) if keyed else {})  # shard-local rows, file rows read
               for a, x, y in ds.batches(config.batch_size, start, stop))  # fmt: skip
    store = None if store_path is None else StoreRequest(store_path, stop - start, inputs.context,
                                                         config.features_compression)  # fmt: skip
    found = extraction_pass(inputs.model, inputs.modules, batches, device=device, target_dim=info.target_dim,
                            input_shape=info.input_shape, num_rows=stop - start, store=store, progress=progress,
                            token_pooling=config.model.token_pooling, output_key=config.model.output_key,
                            active=frozenset(inputs.groups[group]) if len(inputs.groups) > 1 else None)  # fmt: skip
    return Pass(found.stats, inputs.context.with_assumptions(found.notes), found.writer)


def _open_writer(store: StoreRequest, layers: list[LayerInfo], notes: tuple[str, ...]) -> FeatureStoreWriter:
    context = store.context.with_assumptions(notes)
    attrs = {"model_sha256": context.model.sha256, "data_sha256": context.data.sha256, "context": context.to_dict()}
    return FeatureStoreWriter(store.path, store.num_rows, layers, attrs=attrs, compression=store.compression)


def extraction_pass(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    batches: Iterable[Batch],
    *,
    device: torch.device,
    target_dim: int,
    input_shape: tuple[int, ...],
    num_rows: int | None = None,
    store: StoreRequest | None = None,
    progress: ProgressHook | None = None,
    token_pooling: str = "mean",
    output_key: str | None = None,
    active: frozenset[str] | None = None,
) -> Extracted:
    """The one pass: forward each ``(first_row, x (B, …), y (B, t), extra)`` batch with hooks (``extra``:
    keyword inputs, ``model(x, **extra)``), accumulate the float64 statistics of every layer, and hand the
    features to the store's writer (opened on the first batch when ``store`` is given). On success the
    writer is returned open, still writing what is queued; on any error it is discarded here."""
    stats, writer, notes = PassStatistics(active=active), None, tuple[str, ...]()  # active: the modules folded (None: all)
    dtype = model_dtype(model)
    plan = threads.plan() if device.type == "cpu" else threads.ThreadPlan(None, None, False)
    first = True
    reader = overlap.Prefetcher(batches, pin=device.type == "cuda")  # reads batch k+1 while batch k is computed
    folder = overlap.FoldWorker(stats.update) if plan.pipelined else None  # folds batch k during forward k+1
    fold = folder.put if folder is not None else stats.update
    try:
        with threads.applied(plan), FeatureExtractor(model, modules, token_pooling, output_key) as extractor:
            for start, x, y, extra in reader:
                x = x.to(device, dtype=dtype if x.is_floating_point() else None, non_blocking=True)
                y = y.to(device, dtype=torch.float64, non_blocking=True).reshape(len(y), -1)  # (B, t)
                extra = {k: v.to(device) for k, v in extra.items()}
                out, feats = _forward(extractor, x, start, input_shape, extra)
                out = check_output(out, target_dim)
                layers = extractor.layers or []
                if first:
                    if plan.adaptive:  # light folds (conv nets): the forward gets every core
                        widths = [layer.in_dim + target_dim for layer in layers]  # fold columns
                        plan = threads.rebalanced(plan, extractor.flops_per_row(x, extra), widths)
                    notes = tuple(n for n in (extractor.output_note, extractor.pooling_note(), *extractor.coverage_notes()) if n)
                    writer = _open_writer(store, layers, notes) if store is not None else None
                    first = False
                if writer is not None:  # queued first: the writer thread works while this batch's Grams run
                    writer.write(start, out, y, feats)
                fold(layers, out, y, feats)
                if progress is not None:
                    progress(start + len(y), num_rows or 0)
            if folder is not None:
                folder.finish()
        stats.flush()
    except BaseException:  # unusable input, interruption, a bug: no partial store; an earlier one is kept
        _stop(reader, folder)
        if writer is not None:
            writer.discard()
        raise
    reader.close()
    return Extracted(stats, notes, writer)


def _stop(reader: overlap.Prefetcher, folder: overlap.FoldWorker | None) -> None:
    reader.close()
    if folder is not None:
        folder.cancel()


def _forward(extractor: FeatureExtractor, x: torch.Tensor, start: int, shape: tuple[int, ...],
             extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    try:
        return extractor.run(x, extra)
    except (NrcAuditError, Interrupted, KeyboardInterrupt, MemoryError):
        raise
    except (Exception, SystemExit) as exc:  # the model's forward is user code: a failure there is not a bug here
        if not isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)):
            raise user_forward_error(getattr(extractor, "model", None), exc, start) from None
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDataMismatchError(
            f"the model failed on the batch starting at row {start} (per-sample input shape {shape}): "
            f"{first_line}. Check that the data are in the model's input space and the checkpoint matches."
        ) from None
