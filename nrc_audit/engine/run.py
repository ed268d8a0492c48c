"""``run_audit(config) -> Report`` and ``reanalyze(store) -> Report``: a pass, its analysis, the report.

The pass is :mod:`nrc_audit.engine.pipeline` (one process) or its sharded wrapper
:func:`nrc_audit.engine.distributed.audit_sharded` (torchrun); :func:`analyse` turns the pass's statistics
into the per-layer metrics, and :func:`nrc_audit.outputs.build.build_report` assembles the report. The report
is built from the statistics alone, so a saved store re-analyses to the same report.
"""

from __future__ import annotations

from pathlib import Path

from nrc_audit.config import AnalysisOptions, AuditConfig
from nrc_audit.core.conditions import IDENTITY_FIELDS, LayerMetrics, layer_metrics, target_summary, with_identity
from nrc_audit.core.stats import PassStatistics, combine_groups
from nrc_audit.core.verdicts import choose_rank
from nrc_audit.errors import NrcAuditError, OptionsError
from nrc_audit.engine import distributed, threads
from nrc_audit.engine.pipeline import ProgressHook, audit_rows, resolve_device
from nrc_audit.io.plan import plan_statistics
from nrc_audit.io.store import FeatureStore, FeatureStoreWriter
from nrc_audit.outputs.build import Findings, build_report
from nrc_audit.outputs.context import RunContext
from nrc_audit.outputs.report import Report


def run_audit(config: AuditConfig, progress: ProgressHook | None = None) -> Report:
    """Run the whole audit described by ``config`` and return its report (no output files but the store).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank audits a shard of the rows and the statistics are merged
    exactly; every rank returns the same report (the CLI prints it on rank 0 only).
    """
    config.validate()
    device = resolve_device(config.device)
    ctx = distributed.from_env(device)
    if ctx is None:
        done = audit_rows(config, device, progress)
        return _reported(done.stats, config.analysis, done.context, done.writer)
    try:
        stats, context = distributed.audit_sharded(config, distributed.local_device(device), ctx, progress)
        try:
            return report_of(stats, config.analysis, context)
        except NrcAuditError:  # unusable after all (e.g. constant targets): leave no output behind
            if ctx.is_main and config.features_path is not None:
                Path(config.features_path).unlink(missing_ok=True)
            raise
    finally:
        distributed.close(ctx)


def _reported(stats: PassStatistics, analysis: AnalysisOptions, context: RunContext,
              writer: FeatureStoreWriter | None) -> Report:  # fmt: skip
    """The report, built while the store's writer still drains its queue (the analysis uses the core the
    writer leaves idle); the store is completed only once the report exists. If the report cannot be built
    (e.g. constant targets) or the run is interrupted meanwhile, the partial store is deleted."""
    try:
        report = report_of(stats, analysis, context)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if writer is not None:
        writer.close(complete=True)
    return report


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
    return report_of(combine_groups(parts), analysis, context)


def report_of(stats: PassStatistics, analysis: AnalysisOptions, context: RunContext) -> Report:
    """Statistics + options + run context → the typed report."""
    return build_report(analyse(stats, analysis, context.device), analysis, context)


def analyse(stats: PassStatistics, analysis: AnalysisOptions, device: str = "cpu") -> Findings:
    """The conditions of every layer from the pass's statistics (layers in parallel: O(h³) each, the
    decompositions on ``device``), the target block and the chosen k. Raises for constant targets and for a
    gate asking more layers than were audited."""
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

    # each distinct input's statistics once, before the threads: layers sharing an input share one accumulator
    finals = [acc.finalize() if layer.shares_input_with is None else None for layer, acc in zip(stats.layers, stats.joint)]

    def one(i: int) -> LayerMetrics:
        layer = stats.layers[i]
        st = finals[i if layer.shares_input_with is None else layer.shares_input_with]
        assert st is not None  # a sharing layer names an earlier layer that holds the statistics
        m = layer_metrics(st, layer.weight.numpy(), k, model_mse, analysis.pinv_rtol, analysis.thresholds, device)
        return with_identity(m, *(getattr(layer, f) for f in IDENTITY_FIELDS))

    rows = threads.parallel_map(one, range(len(stats.layers)))
    return Findings(rows, target, k, source, model_mse, stats.facts)
