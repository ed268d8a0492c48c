"""The main command, ``nrc-audit MODEL DATA``, and the console entry point that dispatches subcommands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
import os
import sys

import typer

from nrc_audit.cli.common import DEBUG_ENV
from nrc_audit.cli.common import (
    OUTPUTS, VersionOpt, err_console, flag, guarded, make_app, model_def_file, require_inputs, settings_source, takes,
    with_progress,
)  # fmt: skip
from nrc_audit.cli.options import (
    AnalysisArgs, CompressionOpt, DataArgs, ModelArgs, PassArgs, ReportArgs, RunArgs, StoreOpt, audit_config, settings,
)  # fmt: skip
from nrc_audit.cli import streams
from nrc_audit.cli.commands import SUBCOMMANDS
from nrc_audit.errors import ExitCode
from nrc_audit.io import lifecycle
from nrc_audit.io.files import on_commit, published_together
from nrc_audit.io.store_lock import clean_stale, default_store_path

audit_app = make_app("Audit a trained regression network for Deep Neural Regression Collapse (NRC1–NRC4).")
EPILOG = ("Subcommands (each with its own --help): nrc-audit trend CHECKPOINTS… --data DATA: collapse over "
          "training · nrc-audit reanalyze STORE: a new report from a saved feature store · nrc-audit validate "
          "REPORT…: check reports against the JSON Schema.")  # fmt: skip


@audit_app.command(epilog=EPILOG)
@takes
def audit(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint: .safetensors, or a .pt/.pth state dict.", show_default=False)],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="HDF5 file with inputs and targets.", show_default=False)],
    data_args: DataArgs,
    model_args: ModelArgs,
    pass_args: PassArgs,
    analysis: AnalysisArgs,
    report: ReportArgs,
    run_opts: RunArgs,
    features: StoreOpt = None,
    no_features: Annotated[bool, flag("--no-features", help="Do not write the feature store.", panel=OUTPUTS)] = False,
    features_compression: CompressionOpt = None,
    version: VersionOpt = False,
) -> None:
    """Audit MODEL on DATA: per-layer NRC1–NRC4, the Frobenius bound, a table, a JSON report and a gate."""

    def body() -> ExitCode:
        from nrc_audit.outputs.emit import emit, failure_reports

        out = report.outputs(model)
        with failure_reports(out):  # until the paths are checked, a failure writes no file: one may be an input
            s = settings(run_opts, data_args, model_args, pass_args, analysis, report)
            out = out.with_tolerance(float(s["baseline_tolerance"]))
            store = None if no_features else (features or default_store_path(model))
            if store is None:  # what a killed run left at the store this run would have written goes all the same
                clean_stale(features or default_store_path(model))
            safe = out.check_paths(
                {"the checkpoint": model, "the data file": data, "the settings file": settings_source(run_opts.config),
                 "the --model-def file": model_def_file(model_args.model_def)}, {"--features": store})  # fmt: skip
        with failure_reports(safe):  # from here on a failure leaves the could-not-run markdown and JUnit files
            safe.check_before_run()
            cfg = audit_config(model, data, s, data_args, model_args, store, features_compression)
            require_inputs(("checkpoint", model), ("data file", data))
            # torch loads only now, once the options and paths are known to be good (tests/test_streams.py)
            from nrc_audit.engine.run import run_audit

            done = with_progress(run_opts.progress, lambda hook: run_audit(cfg, hook))
        if store is not None and out.is_main and not run_opts.quiet:
            on_commit(lambda: _note_store(store), lambda: None)  # once the store is in place
        return emit(done, out)

    guarded(published_together(body))  # the store and every output file: all put in place, or none


def _note_store(path: Path) -> None:
    """One stderr line: where the feature store went and how big it is (it can be hundreds of MB)."""
    if path.exists():
        size = path.stat().st_size
        text = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        err_console.print(f"feature store: {path} ({text}); --no-features skips it", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``nrc-audit MODEL DATA [options]`` or ``nrc-audit SUBCOMMAND …``."""
    streams.guard()  # closed descriptors, readers that leave early, ASCII-only encodings (cli/streams.py)
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
        if lifecycle.received or exc.code in (ExitCode.SIGINT, ExitCode.SIGTERM, ExitCode.SIGHUP):
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
        if exc.code is None or isinstance(exc.code, int):
            raise SystemExit(streams.final_code(exc.code or 0)) from None
        raise
