"""Subcommands: ``reanalyze`` (report from a feature store), ``trend`` (collapse over training) and
``validate`` (check a report against the shipped JSON Schema). Typer wiring only, as in ``cli``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from nrc_audit.cli.common import (
    BaselineOpt, BatchOpt, ConfigOpt, EnergyOpt, ExitZeroOpt, FormatOpt, JsonOpt, MarkdownOpt, ModelIndexOpt,
    Nrc1Opt, Nrc2Opt, Nrc3Opt, Nrc4Opt, OutputFormat, PlotOpt, QuietOpt, RankOpt, RequireOpt, RtolOpt,
    ToleranceOpt, analysis_options, is_main, err_console, guarded, make_app, settings, settings_source, with_progress,
)  # fmt: skip
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.errors import ExitCode, OptionsError
from nrc_audit.io.files import write_with
from nrc_audit.outputs.emit import Outputs, emit

reanalyze_app = make_app("Recompute the audit report from a saved feature store, without the model or the data.")
trend_app = make_app("Collapse over training: audit several checkpoints of one run (or a monitor history).")
validate_app = make_app("Validate JSON reports against the shipped nrc-audit-report/1 JSON Schema.")


@reanalyze_app.command()
def reanalyze(
    store: Annotated[Path, typer.Argument(help="Feature store written by a previous audit (--features).")],
    json_path: JsonOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    markdown: MarkdownOpt = None,
    model_index: ModelIndexOpt = None,
    plot: PlotOpt = None,
    baseline: BaselineOpt = None,
    baseline_tolerance: ToleranceOpt = None,
    batch_size: BatchOpt = None,
    rank: RankOpt = None,
    nrc1_max: Nrc1Opt = None,
    nrc2_min: Nrc2Opt = None,
    nrc3_min: Nrc3Opt = None,
    nrc4_ratio_max: Nrc4Opt = None,
    pinv_rtol: RtolOpt = None,
    rank_energy: EnergyOpt = None,
    require_collapsed: RequireOpt = None,
    config: ConfigOpt = None,
    exit_zero: ExitZeroOpt = False,
    no_progress: QuietOpt = False,
) -> None:
    """Recompute the report from STORE alone (new thresholds or rank allowed)."""
    given = dict(locals())

    def body() -> ExitCode:
        from nrc_audit.engine.pipeline import reanalyze as run_reanalysis

        s = settings(config, given)
        if int(s["batch_size"]) < 1:
            raise OptionsError(f"--batch-size {s['batch_size']} must be ≥ 1.")
        out = Outputs(fmt.value, json_path, markdown, model_index, plot, baseline, float(s["baseline_tolerance"]),
                      exit_zero, is_main=is_main())  # fmt: skip
        out.check_before_run({"the feature store": store, "the settings file": settings_source(config)})
        analysis = analysis_options(s)
        report = with_progress(not no_progress, lambda hook: run_reanalysis(store, analysis, int(s["batch_size"]), hook))
        return emit(report, out)

    guarded(body)


@trend_app.command()
def trend(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(help="Checkpoints of one run, in training order.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="HDF5 dataset to audit every checkpoint on.")] = None,
    history: Annotated[Optional[Path], typer.Option("--history", help="Render a JSON-lines history (from CollapseMonitor) instead.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write all reports as one JSON document.")] = None,
    plot: PlotOpt = None,
    x_key: Annotated[Optional[str], typer.Option("--x-key")] = None,
    y_key: Annotated[Optional[str], typer.Option("--y-key")] = None,
    scale_uint8: Annotated[bool, typer.Option("--scale-uint8")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit")] = None,
    batch_size: BatchOpt = None,
    device: Annotated[Optional[str], typer.Option("--device")] = None,
    rank: RankOpt = None,
    nrc1_max: Nrc1Opt = None,
    nrc2_min: Nrc2Opt = None,
    nrc3_min: Nrc3Opt = None,
    nrc4_ratio_max: Nrc4Opt = None,
    pinv_rtol: RtolOpt = None,
    rank_energy: EnergyOpt = None,
    config: ConfigOpt = None,
    no_progress: QuietOpt = False,
) -> None:
    """Audit each checkpoint (one data pass each) and show every condition per layer against checkpoint."""
    given = dict(locals()) | {"require_collapsed": 0}  # trend reports findings; it has no gate

    def body() -> ExitCode:
        from nrc_audit.engine.pipeline import run_audit
        from nrc_audit.outputs.trend import load_history, trend_tables, write_trend_json

        inputs = {f"the checkpoint {c}": c for c in checkpoints or []} | {"--data": data, "--history": history}
        Outputs(plot_path=plot).check_before_run(inputs | {"the settings file": settings_source(config)},
                                                 {"--json": json_path})  # fmt: skip
        if history is not None:
            if checkpoints:
                raise OptionsError("pass either checkpoints (with --data) or --history, not both.")
            labels, reports = load_history(history)
        else:
            if not checkpoints or data is None:
                raise OptionsError("pass the checkpoints of one run and --data DATA.h5 (or --history FILE).")
            s = settings(config, given)
            analysis = analysis_options(s)
            labels, reports = [], []
            for ckpt in checkpoints:
                cfg = AuditConfig(model_path=ckpt, data_path=data,
                                  data=DataOptions(s["x_key"], s["y_key"], channels_last, scale_uint8, limit),
                                  model=ModelOptions(activation=s["activation"]), analysis=analysis,
                                  layers=tuple(s["layers"]), exclude=tuple(s["exclude"]), device=s["device"],
                                  batch_size=int(s["batch_size"]), features_path=None)  # fmt: skip
                err_console.print(f"auditing {ckpt}", highlight=False)
                reports.append(with_progress(not no_progress, lambda hook, c=cfg: run_audit(c, hook)))
                labels.append(ckpt.stem)
        if len({tuple(layer.name for layer in r.layers) for r in reports}) > 1:
            raise OptionsError("the checkpoints audit different layers; trend needs checkpoints of one architecture.")
        if json_path is not None:
            write_trend_json(json_path, labels, reports)
        if plot is not None:
            from nrc_audit.outputs.plot import plot_trend

            write_with(plot, lambda tmp: plot_trend(labels, reports, tmp), suffix=plot.suffix or ".png")
        console = Console()
        for table in trend_tables(labels, reports):
            console.print(table)
        return ExitCode.OK

    guarded(body)


@validate_app.command()
def validate(reports: Annotated[list[Path], typer.Argument(help="JSON report files to check.")]) -> None:
    """Exit 0 when every report validates, 1 when one does not, 2 when a file cannot be read."""

    def body() -> ExitCode:
        try:
            import jsonschema
        except ImportError:
            raise OptionsError("validate needs jsonschema: pip install 'nrc-audit[schema]'.") from None
        from nrc_audit.outputs.report import load_schema

        validator = jsonschema.Draft202012Validator(load_schema())
        code = ExitCode.OK
        for path in reports:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise OptionsError(f"{path} is not a readable JSON file ({exc}).") from None
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for error in errors:
                where = "/".join(map(str, error.absolute_path)) or "(root)"
                err_console.print(f"{path}: {where}: {error.message}", highlight=False)
            print(f"{path}: {'valid' if not errors else f'INVALID ({len(errors)} error(s))'}")
            if errors:
                code = ExitCode.GATE_FAILED
        return code

    guarded(body)


SUBCOMMANDS: dict[str, typer.Typer] = {"reanalyze": reanalyze_app, "trend": trend_app, "validate": validate_app}
