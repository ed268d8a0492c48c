"""``run_audit(config) -> Report``: the one module that wires io, extract, store, stats and conditions.

One pass over the data: read a batch → forward with hooks → per-layer float64 statistics (on the model's
device) → queue the features to the store writer → next batch. The report is built from the statistics
alone, so a saved store re-analyses to the same report (:func:`reanalyze`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from nrc_audit.version import __version__
from nrc_audit.engine import distributed, overlap, threads
from nrc_audit.engine.context import DataContext, ModelContext, RunContext
from nrc_audit.core.conditions import IDENTITY_FIELDS, LayerMetrics, layer_metrics, target_summary, with_identity
from nrc_audit.core.diagnostics import report_warnings
from nrc_audit.core.verdicts import choose_rank, collapse_onset, gate
from nrc_audit.config import AnalysisOptions, AuditConfig
from nrc_audit.errors import Interrupted, ModelDataMismatchError, NrcAuditError, OptionsError, PlanError
from nrc_audit.io.plan import plan_audit, plan_statistics
from nrc_audit.core.layer import LayerInfo
from nrc_audit.engine.extract import FeatureExtractor
from nrc_audit.engine.layer_kinds import candidate_layers, skipped_layers
from nrc_audit.engine.model_io import assumption_warnings, check_output, lazy_dry_run, model_dtype, prepare_inputs
from nrc_audit.models.architecture import resolve_model, user_forward_error
from nrc_audit.io.hf_layout import load_model_files, sha256_path
from nrc_audit.io.dataset import HDF5Dataset
from nrc_audit.outputs.report import Gate, Report, Summary
from nrc_audit.core.stats import PassStatistics, combine_groups
from nrc_audit.io.store import FeatureStore, FeatureStoreWriter

ProgressHook = Callable[[int, int], None]  # (rows done, rows total)
POOLING_NOTE = "Conv inputs averaged over their spatial dims and Linear inputs over extra dims, in float64 (pooled: true)"


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


def run_audit(config: AuditConfig, progress: ProgressHook | None = None) -> Report:
    """Run the whole audit described by ``config`` and return its report (no output files but the store).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank audits a shard of the rows and the statistics are merged
    exactly; every rank returns the same report (the CLI prints it on rank 0 only).
    """
    config.validate()
    device = resolve_device(config.device)
    ctx = distributed.from_env(device)
    if ctx is None:
        return _audit(config, device, progress)
    try:
        return _audit_sharded(config, distributed.local_device(device), ctx, progress)
    finally:
        distributed.close(ctx)


@dataclass
class _Inputs:
    """The opened model and data of one audit, and what the report will say about them."""

    model: torch.nn.Module
    modules: dict[str, torch.nn.Module]
    ds: HDF5Dataset
    context: RunContext
    groups: tuple[tuple[str, ...], ...] = ((),)  # the memory plan's layer groups, one pass over the data each


@contextlib.contextmanager
def _opened(config: AuditConfig, device: torch.device) -> Iterator[_Inputs]:
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
            print(f"nrc-audit: {line}", file=sys.stderr, flush=True)  # fmt: skip
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
        yield _Inputs(model, modules, ds, context, plan.groups)


def _pass_rows(config: AuditConfig, inputs: _Inputs, device: torch.device, rows: tuple[int, int],
               store_path: Path | None, progress: ProgressHook | None, group: int = 0
               ) -> tuple[PassStatistics, RunContext, FeatureStoreWriter | None]:  # fmt: skip
    """The one pass over rows [start, stop) of the data, writing them (renumbered from 0) to ``store_path``.

    Returns the statistics, the context with what the first batch taught (output container, token
    pooling) added to the model's assumptions (the store records that same context), and the store's
    writer, still open and writing what is queued: the caller completes it (``close``) or drops it."""
    (start, stop), info = rows, inputs.ds.info
    notes = list(inputs.context.model.assumptions)
    made: list[FeatureStoreWriter] = []

    def noted() -> RunContext:
        return replace(inputs.context, model=replace(inputs.context.model, assumptions=tuple(notes)))

    def writer_factory(layers: list[LayerInfo]) -> FeatureStoreWriter:  # called after the first batch's notes
        context = noted()
        attrs = {"model_sha256": context.model.sha256, "data_sha256": context.data.sha256,
                 "context": context.to_dict()}  # fmt: skip
        assert store_path is not None
        made.append(FeatureStoreWriter(store_path, stop - start, layers, attrs=attrs,
                                       compression=config.features_compression))  # fmt: skip
        return made[-1]

    batches = ((a - start, x, y) for a, x, y in inputs.ds.batches(config.batch_size, start, stop))  # local rows
    extras = functools.partial(_shard_extras, inputs.ds, start) if inputs.ds.opts.input_keys else None
    stats = extraction_pass(inputs.model, inputs.modules, batches, device=device, target_dim=info.target_dim,
                            input_shape=info.input_shape, num_rows=stop - start,
                            writer_factory=writer_factory if store_path is not None else None, progress=progress,
                            extras=extras, token_pooling=config.model.token_pooling,
                            output_key=config.model.output_key, notes=notes,
                            active=frozenset(inputs.groups[group]) if len(inputs.groups) > 1 else None)  # fmt: skip
    return stats, noted(), (made[0] if made else None)


def _shard_extras(ds: HDF5Dataset, offset: int, start: int, size: int) -> dict[str, torch.Tensor]:
    return ds.extras(offset + start, offset + start + size)  # shard-local rows → file rows


def _audit(config: AuditConfig, device: torch.device, progress: ProgressHook | None) -> Report:
    """The single-process audit: one pass over every row, then the report."""
    writer = None
    try:
        with _opened(config, device) as inputs:
            rows = (0, inputs.ds.info.num_samples)
            stats, context, writer = _pass_rows(config, inputs, device, rows, config.features_path, progress)
            later = [_pass_rows(config, inputs, device, rows, None, progress, g)[0] for g in range(1, len(inputs.groups))]
            stats = combine_groups([stats, *later])  # the first pass wrote the store; each pass folded its group
    except BaseException:  # closing the inputs failed or was interrupted: the open store goes too
        if writer is not None:
            writer.discard()
        raise
    return _report(stats, config, context, writer)


def _audit_sharded(config: AuditConfig, device: torch.device, ctx: distributed.DistContext,
                   progress: ProgressHook | None) -> Report:  # fmt: skip
    """The single-process pass on this rank's shard of whole batches, wrapped in the exact merge over ranks."""
    error: NrcAuditError | None = None
    with _opened(config, device) as inputs:
        num_samples = inputs.ds.info.num_samples
        distributed.agree(ctx, "checkpoints (sha256)", inputs.context.model.sha256)
        distributed.agree(ctx, "data files (sha256)", inputs.context.data.sha256)
        context = replace(inputs.context, world_size=ctx.world_size)
        if len(inputs.groups) > 1:
            raise PlanError("the memory plan needs several passes, which the sharded (torchrun) audit does not run; "
                            "raise NRC_AUDIT_MAX_MEMORY, audit fewer layers, or audit in one process.")
        start, stop = distributed.shard(num_samples, config.batch_size, ctx)
        if start >= stop:  # reported to every rank by sync_errors, so that none waits for this one
            distributed.sync_errors(ctx, OptionsError(
                f"{num_samples} rows in batches of {config.batch_size} leave rank {ctx.rank} of "
                f"{ctx.world_size} without data; lower --batch-size or use fewer processes."
            ))  # fmt: skip
        store = None if config.features_path is None else Path(distributed.shard_path(config.features_path, ctx))
        try:
            stats, context, writer = _pass_rows(config, replace(inputs, context=context), device, (start, stop),
                                                store, progress if ctx.is_main else None)  # fmt: skip
            if writer is not None:  # every shard complete before rank 0 links them into the master store
                writer.close(complete=True, now=True)
        except NrcAuditError as exc:
            error = exc
    try:
        distributed.sync_errors(ctx, error)
    except BaseException:  # another rank failed: no complete-looking shard of this one stays behind
        if store is not None:
            Path(store).unlink(missing_ok=True)
        raise
    distributed.merge_pass(ctx, stats, device)
    if config.features_path is not None:
        distributed.barrier(ctx)
        if ctx.is_main:
            shards = [distributed.shard_path(config.features_path, distributed.DistContext(r, ctx.world_size, "", False))
                      for r in range(ctx.world_size)]  # fmt: skip
            distributed.write_master_store(config.features_path, shards, num_samples)
        distributed.barrier(ctx)
    try:
        return _report(stats, config, context, None)
    except NrcAuditError:  # unusable after all (e.g. constant targets): leave no output behind
        if ctx.is_main and config.features_path is not None:
            Path(config.features_path).unlink(missing_ok=True)
        raise


def _report(stats: PassStatistics, config: AuditConfig, context: RunContext,
            writer: FeatureStoreWriter | None) -> Report:  # fmt: skip
    """The report, built while the store's writer still drains its queue (the analysis uses the core the
    writer leaves idle); the store is completed only once the report exists. If the report cannot be built
    (e.g. constant targets) or the run is interrupted meanwhile, the partial store is deleted."""
    try:
        report = build_report(stats, config.analysis, context)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if writer is not None:
        writer.close(complete=True)
    return report


def extraction_pass(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    batches: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    target_dim: int,
    input_shape: tuple[int, ...],
    num_rows: int | None = None,
    writer_factory: Callable[[list[LayerInfo]], FeatureStoreWriter] | None = None,
    progress: ProgressHook | None = None,
    extras: Callable[[int, int], dict[str, torch.Tensor]] | None = None,
    token_pooling: str = "mean",
    output_key: str | None = None,
    notes: list[str] | None = None,
    active: frozenset[str] | None = None,
) -> PassStatistics:
    """The one pass: forward each ``(first_row, x (B, …), y (B, t))`` batch with hooks, accumulate the
    float64 statistics of every layer, and hand the features to the store writer (if any). On success the
    writer ``writer_factory`` made is left open, still writing what is queued, for the factory's owner to
    complete once the report exists (``_report``); on any error it is discarded here.

    ``extras(first_row, B)`` gives the batch's extra keyword inputs (``--input-key``); how the output
    container was read and how tokens were pooled are appended to ``notes`` (the report's assumptions)."""
    stats, writer = PassStatistics(active=active), None  # active: the modules this pass folds (None: all)
    dtype = model_dtype(model)
    plan = threads.plan() if device.type == "cpu" else threads.ThreadPlan(None, None, False)
    first = True
    reader = overlap.Prefetcher(batches, pin=device.type == "cuda")  # reads batch k+1 while batch k is computed
    folder = overlap.FoldWorker(stats.update) if plan.pipelined else None  # folds batch k during forward k+1
    fold = folder.put if folder is not None else stats.update
    try:
        with threads.applied(plan), FeatureExtractor(model, modules, token_pooling, output_key) as extractor:
            for start, x, y in reader:
                x = x.to(device, dtype=dtype if x.is_floating_point() else None, non_blocking=True)
                y = y.to(device, dtype=torch.float64, non_blocking=True).reshape(len(y), -1)  # (B, t)
                extra = {k: v.to(device) for k, v in extras(start, len(y)).items()} if extras else {}
                out, feats = _forward(extractor, x, start, input_shape, extra)
                out = check_output(out, target_dim)
                if first and plan.adaptive:  # light folds (conv nets): the forward gets every core
                    widths = [layer.in_dim + target_dim for layer in extractor.layers or []]  # fold columns
                    plan = threads.rebalanced(plan, extractor.flops_per_row(x, extra), widths)
                if notes is not None and first:  # the first batch: before the store writer copies the context
                    notes.extend(n for n in (extractor.output_note, extractor.pooling_note(), *extractor.coverage_notes())
                                 if n and n not in notes)
                first = False
                layers = extractor.layers or []
                if writer is None and writer_factory is not None:
                    writer = writer_factory(layers)
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
    reader.close()  # the writer stays open, still writing what is queued: its factory's caller completes it
    return stats


def _stop(reader: overlap.Prefetcher, folder: overlap.FoldWorker | None) -> None:
    reader.close()
    if folder is not None:
        folder.cancel()


def _forward(extractor: FeatureExtractor, x: torch.Tensor, start: int, shape: tuple[int, ...],
             extra: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    try:
        return extractor.run(x, extra)
    except (NrcAuditError, Interrupted, KeyboardInterrupt, MemoryError):
        raise
    except (Exception, SystemExit) as exc:  # the model's forward is user code: fence it (issue 17 item 6)
        if not isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)):
            raise user_forward_error(getattr(extractor, "model", None), exc, start) from None
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDataMismatchError(
            f"the model failed on the batch starting at row {start} (per-sample input shape {shape}): "
            f"{first_line}. Check that the data are in the model's input space and the checkpoint matches."
        ) from None


def reanalyze(store_path: Path, analysis: AnalysisOptions, batch_size: int = 4096,
              progress: ProgressHook | None = None) -> Report:  # fmt: skip
    """Recompute the report from a complete feature store alone, without the model or the data file."""
    analysis.validate()
    parts = []
    with FeatureStore(store_path) as store:
        groups = plan_statistics({layer.name: layer.in_dim for layer in store.layers}, store.n, None, 4, store.t).groups
        context = RunContext.from_dict(store.context)
        for group in groups:  # one read of the store per group of the memory plan
            parts.append(PassStatistics(active=frozenset(group) if len(groups) > 1 else None))
            for start, out, y, feats in store.batches(batch_size):
                parts[-1].update(store.layers, out, y, feats)
                if progress is not None:
                    progress(start + len(y), store.n)
    return build_report(combine_groups(parts), analysis, context)


def build_report(stats: PassStatistics, analysis: AnalysisOptions, context: RunContext) -> Report:
    """Statistics + options → the typed report (conditions per layer, target block, summary, gate)."""
    tm = stats.targets.moments
    if tm is None:
        raise OptionsError("no samples were audited")
    n, _, s_yy = tm.to_numpy()
    t = s_yy.shape[0]
    target = target_summary(s_yy, n, analysis.rank_energy)
    if target.rank_estimate == 0:
        raise NrcAuditError(
            f"the targets are constant over the {n} audited samples (zero variance); there is nothing to regress. "
            "Check --y-key and --limit."
        )
    k, source = choose_rank(analysis.rank, t, target.rank_estimate)
    if analysis.require_collapsed > len(stats.layers):
        raise OptionsError(
            f"--require-collapsed {analysis.require_collapsed} exceeds the {len(stats.layers)} audited layers; "
            f"pass a number between 0 and {len(stats.layers)}."
        )
    model_mse = stats.sse / (n * t)
    model_info = context.model.to_dict()
    if any(layer.pooled for layer in stats.layers) and POOLING_NOTE not in model_info["assumptions"]:
        model_info["assumptions"].append(POOLING_NOTE)

    finals = [acc.finalize() if layer.shares_input_with is None else None  # each distinct input once, before
              for layer, acc in zip(stats.layers, stats.joint)]  # the threads (sharing layers share an accumulator)

    def analyse(i: int) -> LayerMetrics:
        layer = stats.layers[i]
        st = finals[i if layer.shares_input_with is None else layer.shares_input_with]
        m = layer_metrics(st, layer.weight.numpy(), k, model_mse, analysis.pinv_rtol, analysis.thresholds, context.device)
        return with_identity(m, *(getattr(layer, f) for f in IDENTITY_FIELDS))

    rows = threads.parallel_map(analyse, range(len(stats.layers)))  # O(h³) per layer: layers in parallel
    collapsed = [r.collapsed for r in rows]
    passed, failing = gate(collapsed, analysis.require_collapsed)
    summary = Summary(
        num_layers=len(rows),
        collapsed_layers=[r.index for r in rows if r.collapsed],
        not_collapsed_layers=[r.index for r in rows if not r.collapsed],
        collapse_onset=collapse_onset(collapsed),
        gate=Gate(analysis.require_collapsed, passed, failing),
    )
    settings = {
        **({"world_size": context.world_size} if context.world_size is not None else {}),
        "rank": k, "rank_source": source, "device": context.device,
        "batch_size": context.batch_size, "pinv_rtol": analysis.pinv_rtol,
        "rank_energy": analysis.rank_energy, "require_collapsed": analysis.require_collapsed,
        "thresholds": analysis.thresholds.to_dict(),
    }  # fmt: skip
    return Report(
        tool={"name": "nrc-audit", "version": __version__},
        model=model_info, data=context.data.to_dict(), settings=settings, target=target,
        model_mse=model_mse, layers=rows, summary=summary,
        warnings=report_warnings(stats.facts, target, model_mse, k, source, context.uint8_unscaled)
        + assumption_warnings(model_info["assumptions"]),
    )  # fmt: skip
