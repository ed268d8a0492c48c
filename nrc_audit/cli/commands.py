"""Subcommands: ``reanalyze`` (report from a feature store), ``trend`` (collapse over training) and
``validate`` (check a report against the shipped JSON Schema). Typer wiring only, as in ``cli``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from nrc_audit.cli.common import (
    INPUTS, OutputFormat, PlotOpt, analysis_options, err_console, flag, guarded, make_app, model_def_file, opt,
    require_inputs, settings_source, takes, with_progress,
)  # fmt: skip
from nrc_audit.cli.options import (
    AnalysisArgs, DataArgs, ModelArgs, PassArgs, ReportArgs, RunArgs, TrendFormatOpt, TrendJsonOpt, TrendJunitOpt,
    audit_config,
    settings,
)  # fmt: skip
from nrc_audit.errors import ExitCode, OptionsError
from nrc_audit.io.files import write_atomic, write_with
from nrc_audit.io.validate import parse_json, read_document

reanalyze_app = make_app("Recompute the audit report from a saved feature store, without the model or the data.")
trend_app = make_app("Collapse over training: audit several checkpoints of one run (or a monitor history).")
validate_app = make_app("Validate JSON reports against the shipped nrc-audit-report/1 JSON Schema.")


@reanalyze_app.command()
@takes
def reanalyze(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Feature store written by a previous audit (--features).", show_default=False)],
    analysis: AnalysisArgs,
    report: ReportArgs,
    run_opts: RunArgs,
) -> None:
    """Recompute the report from STORE alone (new thresholds or rank allowed)."""

    def body() -> ExitCode:
        from nrc_audit.outputs.emit import emit, failure_reports

        out = report.outputs()
        with failure_reports(out):  # until the paths are checked, a failure writes no file: one may be an input
            s = settings(run_opts, analysis, report)
            if int(s["batch_size"]) < 1:
                raise OptionsError(f"--batch-size {s['batch_size']} must be ≥ 1.")
            out = out.with_tolerance(float(s["baseline_tolerance"]))
            safe = out.check_paths({"the feature store": store, "the settings file": settings_source(run_opts.config)})
        with failure_reports(safe):  # from here on a failure leaves the could-not-run markdown and JUnit files
            safe.check_before_run()
            options = analysis_options(s)
            require_inputs(("feature store", store))
            from nrc_audit.engine.run import reanalyze as run_reanalysis  # torch: only after the checks

            done = with_progress(run_opts.progress, lambda hook: run_reanalysis(store, options, int(s["batch_size"]), hook))
        return emit(done, out)

    guarded(body)


@trend_app.command()
@takes
def trend(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(metavar="CHECKPOINTS...", help="Checkpoints of one run, taken in training order: the step or epoch each one stores (safetensors metadata, a Lightning .ckpt, an HF checkpoint-N/trainer_state.json), else the numbers in their names (epoch_2 before epoch_10); --as-given keeps yours.", show_default=False)] = None,
    data: Annotated[Optional[Path], opt("--data", help="HDF5 dataset to audit every checkpoint on.", panel=INPUTS, show=False)] = None,
    history: Annotated[Optional[Path], opt("--history", help="Render a JSON-lines history (from CollapseMonitor or the Lightning / transformers callbacks) instead.", panel=INPUTS, show=False)] = None,
    run: Annotated[Optional[str], opt("--run", help="The run to render when the --history file holds several.", panel=INPUTS, show=False)] = None,
    as_given: Annotated[bool, flag("--as-given", help="Keep the checkpoints in the order given instead of their training order.", panel=INPUTS)] = False,
    data_args: DataArgs = DataArgs(),
    model_args: ModelArgs = ModelArgs(),
    pass_args: PassArgs = PassArgs(),
    analysis: AnalysisArgs = AnalysisArgs(),
    run_opts: RunArgs = RunArgs(),
    json_path: TrendJsonOpt = None,
    fmt: TrendFormatOpt = OutputFormat.table,
    plot: PlotOpt = None,
    junit_xml: TrendJunitOpt = None,
) -> None:
    """Audit each checkpoint (one data pass each) and show every condition per layer against checkpoint;
    or, given a HISTORY.jsonl written during training, show its audits the same way.

    The gate (--require-collapsed N) applies to the last checkpoint and sets the exit code (0/1/2 as for an audit).
    """

    def body() -> ExitCode:
        from nrc_audit.outputs.emit import Outputs
        from nrc_audit.outputs.trend import load_history, write_trend_json

        history_file, paths = history, list(checkpoints or [])
        if history_file is None and len(paths) == 1 and paths[0].suffix == ".jsonl":
            history_file, paths = paths[0], []  # `nrc-audit trend HISTORY.jsonl`
        if run is not None and history_file is None:
            raise OptionsError(f"--run {run} chooses a run of a history file; pass the HISTORY.jsonl file too.")
        inputs = {f"the checkpoint {c}": c for c in paths} | {"--data": data, "--history": history_file}
        Outputs(plot_path=plot).check_paths(inputs | {"the settings file": settings_source(run_opts.config),
                                                      "the --model-def file": model_def_file(model_args.model_def)},
                                            {"--json": json_path, "--junit-xml": junit_xml}).check_before_run()  # fmt: skip
        s = settings(run_opts, data_args, model_args, pass_args, analysis)
        if history_file is not None:
            if paths:
                raise OptionsError("pass either checkpoints (with --data) or --history, not both.")
            labels, reports, order = load_history(history_file, run)
            if not run_opts.quiet:
                err_console.print(f"order (by {order}): " + ", ".join(labels), highlight=False, soft_wrap=True)
        else:
            if not paths or data is None:
                raise OptionsError("pass the checkpoints of one run and --data DATA.h5 (or --history FILE).")
            labels, reports = _audit_each(paths, data, s, data_args, model_args, run_opts, as_given)
        if len({tuple(layer.name for layer in r.layers) for r in reports}) > 1:
            raise OptionsError("the checkpoints audit different layers; trend needs checkpoints of one architecture.")
        if json_path is not None:
            write_trend_json(json_path, labels, reports)
        if plot is not None:
            from nrc_audit.outputs.plot import plot_trend

            write_with(plot, lambda tmp: plot_trend(labels, reports, tmp), suffix=plot.suffix or ".png")
        if junit_xml is not None:
            from nrc_audit.outputs.ci import junit_xml as to_junit

            write_atomic(junit_xml, to_junit(reports[-1], name=labels[-1]))
        return _show_trend(labels, reports, int(s["require_collapsed"]), fmt)

    guarded(body)


def _audit_each(checkpoints: list[Path], data: Path, s: dict[str, Any], data_args: DataArgs, model_args: ModelArgs,
                run_opts: RunArgs, as_given: bool) -> tuple[list[str], list[Any]]:  # fmt: skip
    """Audit every checkpoint on ``data`` (no feature store) in training order: (labels, reports)."""
    audit_config(checkpoints[0], data, s, data_args, model_args)  # every option checked before torch loads
    require_inputs(("data file", data), *(("checkpoint", c) for c in checkpoints))
    from nrc_audit.engine.run import run_audit  # torch: only after the checks

    labels, reports = [], []
    for ckpt in _ordered(checkpoints, as_given, run_opts.quiet):
        cfg = audit_config(ckpt, data, s, data_args, model_args)
        if not run_opts.quiet:
            err_console.print(f"auditing {ckpt}", highlight=False)
        reports.append(with_progress(run_opts.progress, functools.partial(_run_one, run_audit, cfg)))
        labels.append(ckpt.stem)
    return labels, reports


def _run_one(run_audit: Callable[..., Any], cfg: Any, hook: Callable[[int, int], None] | None) -> Any:
    return run_audit(cfg, hook)


def _ordered(checkpoints: list[Path], as_given: bool, quiet: bool) -> list[Path]:
    """The checkpoints in training order (or as given), the order printed on stderr with its reason."""
    from nrc_audit.outputs.trend import training_order

    if as_given:
        ordered, how, shown = list(checkpoints), "as given", [c.stem for c in checkpoints]
    else:
        ordered, how, positions = training_order(checkpoints)
        key = "step" if how.startswith("by step") else "epoch" if how.startswith("by epoch") else None
        shown = [c.stem + ("" if key is None else f" ({key} {getattr(p, key):g})") for c, p in zip(ordered, positions)]
    if not quiet:
        err_console.print(f"order ({how}): " + ", ".join(shown), highlight=False, soft_wrap=True)
    return ordered


def _show_trend(labels: list[str], reports: list, n: int, fmt: OutputFormat) -> ExitCode:
    """Print the trend tables (gate column: the last ``n`` layers of each checkpoint), the trend JSON or the
    last checkpoint's GitHub annotations, and return the exit code of the last checkpoint's gate."""
    import sys

    from nrc_audit.core.verdicts import exit_code
    from nrc_audit.outputs import charset
    from nrc_audit.outputs.trend import gate_of, trend_json, trend_tables

    layers = reports[-1].summary.num_layers
    if n < 0:
        raise OptionsError(f"--require-collapsed {n} is negative; pass 0 to disable the gate.")
    if n > layers:
        raise OptionsError(f"--require-collapsed {n} exceeds the {layers} audited layers; pass a number between 0 "
                           f"and {layers}.")  # fmt: skip
    if fmt is OutputFormat.json:
        sys.stdout.write(trend_json(labels, reports))
    elif fmt is OutputFormat.github:
        from nrc_audit.outputs.ci import github_annotations

        sys.stdout.writelines(line + "\n" for line in github_annotations(reports[-1]))
    else:
        console = charset.console()
        for table in trend_tables(labels, reports, n):
            console.print(table)
    passed = gate_of(reports[-1], n)
    if n:
        err_console.print(f"gate on the last checkpoint ({labels[-1]}, last {n} layer(s)): "
                          f"{'PASSED' if passed else 'FAILED'}", highlight=False, soft_wrap=True)  # fmt: skip
    return exit_code(passed)


@validate_app.command()
def validate(reports: Annotated[list[Path], typer.Argument(metavar="REPORTS...", help="JSON report files to check.", show_default=False)]) -> None:
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
            text = read_document(path, str(path))  # size-capped: /dev/zero is refused, not read forever
            doc = parse_json(text, str(path))  # refuses 10⁵-deep nesting before jsonschema recurses
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
