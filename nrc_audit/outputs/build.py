"""The report from what the analysis found: summary, gate, the JSON ``settings`` block and the warnings.

The engine measures (per-layer metrics, the target block, the chosen k); this module only assembles what
the report says about them, so the CLI, the Python API and re-analysis build reports the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nrc_audit.version import __version__
from nrc_audit.config import AnalysisOptions
from nrc_audit.core.conditions import LayerMetrics, TargetSummary
from nrc_audit.core.diagnostics import report_warnings, unused_mask_warning
from nrc_audit.core.facts import DataFacts
from nrc_audit.core.verdicts import collapse_onset, gate
from nrc_audit.models.architecture import inferred_architecture_warning
from nrc_audit.outputs.context import RunContext
from nrc_audit.outputs.report import Gate, Report, Summary

POOLING_NOTE = "Conv inputs averaged over their spatial dims and Linear inputs over extra dims, in float64 (pooled: true)"


@dataclass(frozen=True)
class Findings:
    """What the analysis of one pass found: the per-layer rows in layer order, the target block, the
    subspace rank k with where it came from ('auto', 't' or 'user'), the model's MSE and the streamed facts."""

    layers: list[LayerMetrics]
    target: TargetSummary
    rank: int
    rank_source: str
    model_mse: float
    facts: DataFacts


def build_report(found: Findings, analysis: AnalysisOptions, context: RunContext) -> Report:
    """Findings + options + run context → the typed report (SPEC §5)."""
    rows = found.layers
    collapsed = [r.collapsed for r in rows]
    passed, failing = gate(collapsed, analysis.require_collapsed)
    summary = Summary(
        num_layers=len(rows),
        collapsed_layers=[r.index for r in rows if r.collapsed],
        not_collapsed_layers=[r.index for r in rows if not r.collapsed],
        collapse_onset=collapse_onset(collapsed),
        gate=Gate(analysis.require_collapsed, passed, failing),
    )
    model_info = context.model.to_dict()
    if any(r.pooled for r in rows) and POOLING_NOTE not in model_info["assumptions"]:
        model_info["assumptions"].append(POOLING_NOTE)
    warnings = report_warnings(found.facts, found.target, found.model_mse, found.rank, found.rank_source,
                               context.uint8_unscaled)  # fmt: skip
    noted = [inferred_architecture_warning(model_info["assumptions"]), unused_mask_warning(model_info["assumptions"])]
    return Report(
        tool={"name": "nrc-audit", "version": __version__},
        model=model_info, data=context.data.to_dict(), settings=_settings(found, analysis, context),
        target=found.target, model_mse=found.model_mse, layers=rows, summary=summary,
        warnings=warnings + [w for w in noted if w],
    )  # fmt: skip


def _settings(found: Findings, analysis: AnalysisOptions, context: RunContext) -> dict[str, Any]:
    """The report's ``settings`` block, key order as SPEC §5 lists it (``world_size`` first when sharded)."""
    return {
        **({"world_size": context.world_size} if context.world_size is not None else {}),
        "rank": found.rank, "rank_source": found.rank_source, "device": context.device,
        "batch_size": context.batch_size, "pinv_rtol": analysis.pinv_rtol,
        "rank_energy": analysis.rank_energy, "require_collapsed": analysis.require_collapsed,
        "thresholds": analysis.thresholds.to_dict(),
    }  # fmt: skip
