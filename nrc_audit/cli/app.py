"""The main command, ``nrc-audit MODEL DATA``, and the console entry point that dispatches subcommands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional
import os
import sys

import typer

from nrc_audit.cli.common import DEBUG_ENV
from nrc_audit.cli.common import (
    BaselineOpt, BatchOpt, ConfigOpt, EnergyOpt, ExitZeroOpt, FormatOpt, JsonOpt, MarkdownOpt, ModelIndexOpt,
    Nrc1Opt, Nrc2Opt, Nrc3Opt, Nrc4Opt, OutputFormat, PlotOpt, QuietOpt, RankOpt, RequireOpt, RtolOpt,
    ToleranceOpt, analysis_options, is_main, guarded, json_object, make_app, model_def_file, settings, settings_source,
    with_progress,
)  # fmt: skip
from nrc_audit.cli.commands import SUBCOMMANDS
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.errors import ExitCode
from nrc_audit.io import lifecycle
from nrc_audit.outputs.emit import Outputs, emit
audit_app = make_app("Audit a trained regression network for Deep Neural Regression Collapse (NRC1–NRC4).")

@audit_app.command()
def audit(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, or a .pt/.pth state dict.")],
    data: Annotated[Path, typer.Argument(help="HDF5 file with inputs and targets.")],
    json_path: JsonOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    markdown: MarkdownOpt = None,
    model_index: ModelIndexOpt = None,
    plot: PlotOpt = None,
    baseline: BaselineOpt = None,
    baseline_tolerance: ToleranceOpt = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="Feature store path (default: MODEL-STEM.features.h5 in the current folder).")] = None,
    no_features: Annotated[bool, typer.Option("--no-features", help="Do not write the feature store.")] = False,
    features_compression: Annotated[Optional[str], typer.Option("--features-compression", help="gzip or lzf (default: none).")] = None,
    x_key: Annotated[Optional[str], typer.Option("--x-key", help="HDF5 path of the inputs (default X).")] = None,
    y_key: Annotated[Optional[str], typer.Option("--y-key", help="HDF5 path of the targets (default Y).")] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Images are (N, H, W, C).")] = False,
    scale_uint8: Annotated[bool, typer.Option("--scale-uint8", help="Divide uint8 images by 255.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Audit only the first N rows.")] = None,
    batch_size: BatchOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX (default auto).")] = None,
    model_def: Annotated[Optional[str], typer.Option("--model-def", help="file.py:callable or package.module:callable returning the nn.Module. EXECUTES that code.")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON object of keyword arguments for --model-def.")] = None,
    activation: Annotated[Optional[str], typer.Option("--activation", help="MLP activation when the checkpoint does not say (default relu).")] = None,
    layers: Annotated[Optional[list[str]], typer.Option("--layers", help="Glob of layer names to audit (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob of layer names to skip (repeatable; default '*downsample*').")] = None,
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
    """Audit MODEL on DATA: per-layer NRC1–NRC4, the Frobenius bound, a table, a JSON report and a gate."""
    given = dict(locals())  # the options as typed (None: not given), resolved against the settings file

    def body() -> ExitCode:
        from nrc_audit.engine.pipeline import run_audit

        s = settings(config, given)
        out = Outputs(fmt.value, json_path, markdown, model_index, plot, baseline, float(s["baseline_tolerance"]),
                      exit_zero, is_main=is_main())  # fmt: skip
        store = None if no_features else (features or Path(f"{model.stem}.features.h5"))
        out.check_before_run(
            {"the checkpoint": model, "the data file": data, "the settings file": settings_source(config),
             "the --model-def file": model_def_file(model_def)}, {"--features": store})  # fmt: skip
        cfg = AuditConfig(
            model_path=model, data_path=data,
            data=DataOptions(s["x_key"], s["y_key"], channels_last, scale_uint8, limit),
            model=ModelOptions(model_def, json_object(model_kwargs), s["activation"]),
            analysis=analysis_options(s), layers=tuple(s["layers"]), exclude=tuple(s["exclude"]),
            device=s["device"], batch_size=int(s["batch_size"]), features_path=store,
            features_compression=features_compression,
        )  # fmt: skip
        report = with_progress(not no_progress, lambda hook: run_audit(cfg, hook))
        return emit(report, out)

    guarded(body)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``nrc-audit MODEL DATA [options]`` or ``nrc-audit SUBCOMMAND …``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:  # every command: unexpected errors print their traceback (same as NRC_AUDIT_DEBUG=1)
        args.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        if args and args[0] in SUBCOMMANDS:
            SUBCOMMANDS[args[0]](args=args[1:], prog_name=f"nrc-audit {args[0]}")
        else:
            audit_app(args=args, prog_name="nrc-audit")
    except SystemExit as exc:
        if lifecycle.received or exc.code in (ExitCode.SIGINT, ExitCode.SIGTERM):
            # Stopped by a signal: the graceful path is done (workers stopped, partial files removed). The
            # interpreter's teardown of torch & co. can take seconds on a loaded machine, during which no
            # thread may run, so end now (docs/reliability.md: "within a second").
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            lifecycle.remove_tracked()
            os._exit(128 + lifecycle.received[0] if lifecycle.received else int(exc.code or 0))
        raise
