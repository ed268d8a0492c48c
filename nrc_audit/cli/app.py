"""The main command, ``nrc-audit MODEL DATA``, and the console entry point that dispatches subcommands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional
import os
import sys

import typer

from nrc_audit.cli.common import DEBUG_ENV
from nrc_audit.cli.common import (
    ANALYSIS, ANALYSIS_OPTIONS, DATA_PASS_OPTIONS, MODEL, OUTPUTS, REPORT_OUTPUTS, RUN_OPTIONS, ActivationOpt,
    VersionOpt, analysis_options, err_console, flag, guarded, json_object, make_app, model_def_file, opt, outputs,
    require_inputs, settings, settings_source, takes, with_progress,
)  # fmt: skip
from nrc_audit.cli import streams
from nrc_audit.cli.commands import SUBCOMMANDS
from nrc_audit.errors import ExitCode, OptionsError
from nrc_audit.io import lifecycle
from nrc_audit.io.files import on_commit, published_together
from nrc_audit.io.store_lock import clean_stale, default_store_path

audit_app = make_app("Audit a trained regression network for Deep Neural Regression Collapse (NRC1–NRC4).")
EPILOG = ("Subcommands (each with its own --help): nrc-audit trend CHECKPOINTS… --data DATA: collapse over "
          "training · nrc-audit reanalyze STORE: a new report from a saved feature store · nrc-audit validate "
          "REPORT…: check reports against the JSON Schema.")  # fmt: skip


@audit_app.command(epilog=EPILOG)
@takes(ANALYSIS_OPTIONS, DATA_PASS_OPTIONS, REPORT_OUTPUTS, RUN_OPTIONS)
def audit(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint: .safetensors, or a .pt/.pth state dict.", show_default=False)],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="HDF5 file with inputs and targets.", show_default=False)],
    model_def: Annotated[Optional[str], opt("--model-def", help="file.py:callable or package.module:callable returning the nn.Module. EXECUTES that code.", panel=MODEL, show="built-in MLP/ResNet from the state dict")] = None,
    model_kwargs: Annotated[Optional[str], opt("--model-kwargs", help="JSON object of keyword arguments for --model-def.", panel=MODEL, show=False)] = None,
    activation: ActivationOpt = None,
    input_key: Annotated[Optional[list[str]], opt("--input-key", help="Extra HDF5 array passed to the model by keyword: NAME (array NAME) or NAME=KEY (repeatable). 'attention_mask' also masks token pooling.", panel=MODEL, show=False)] = None,
    output_key: Annotated[Optional[str], opt("--output-key", help="Entry of a dict / ModelOutput model output to audit.", panel=MODEL, show="logits")] = None,
    token_pooling: Annotated[str, opt("--token-pooling", help="Linear inputs (B, T, h) → (B, h): mean (unmasked tokens), cls (token 0) or last (last unmasked token).", panel=MODEL)] = "mean",
    layers: Annotated[Optional[list[str]], opt("--layers", help="Glob of layer names to audit (repeatable).", panel=ANALYSIS, show="every Linear/Conv2d layer")] = None,
    exclude: Annotated[Optional[list[str]], opt("--exclude", help="Glob of layer names to skip (repeatable).", panel=ANALYSIS, key="exclude")] = None,
    features: Annotated[Optional[Path], opt("--features", help="Feature store path.", panel=OUTPUTS, show="MODEL-STEM-HASH8.features.h5 in the current folder (beside a model folder, never in it)")] = None,
    no_features: Annotated[bool, flag("--no-features", help="Do not write the feature store.", panel=OUTPUTS)] = False,
    features_compression: Annotated[Optional[str], opt("--features-compression", help="gzip or lzf.", panel=OUTPUTS, show="none")] = None,
    version: VersionOpt = False,
    **opts: Any,
) -> None:
    """Audit MODEL on DATA: per-layer NRC1–NRC4, the Frobenius bound, a table, a JSON report and a gate."""
    given = {**locals(), **opts}  # every option by name as typed (None: not given), resolved with the settings file

    def body() -> ExitCode:
        from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
        from nrc_audit.outputs.emit import emit, failure_reports

        out = outputs(given, model)
        with failure_reports(out):
            s = settings(opts["config"], given)
            out = out.with_tolerance(float(s["baseline_tolerance"]))
            store = None if no_features else (features or default_store_path(model))
            if store is None:  # what a killed run left at the store this run would have written goes all the same
                clean_stale(features or default_store_path(model))
            out.check_before_run(
                {"the checkpoint": model, "the data file": data, "the settings file": settings_source(opts["config"]),
                 "the --model-def file": model_def_file(model_def)}, {"--features": store})  # fmt: skip
            cfg = AuditConfig(
                model_path=model, data_path=data,
                data=DataOptions(s["x_key"], s["y_key"], opts["channels_last"], opts["scale_uint8"], opts["limit"],
                                 input_keys(input_key)),
                model=ModelOptions(model_def, json_object(model_kwargs), s["activation"], output_key, token_pooling),
                analysis=analysis_options(s), layers=tuple(s["layers"]), exclude=tuple(s["exclude"]),
                device=s["device"], batch_size=int(s["batch_size"]), features_path=store,
                features_compression=features_compression,
            ).validate()  # fmt: skip
            require_inputs(("checkpoint", model), ("data file", data))
            # torch loads only now, once the options and paths are known to be good (tests/test_streams.py)
            from nrc_audit.engine.pipeline import run_audit

            report = with_progress(not (opts["no_progress"] or opts["quiet"]), lambda hook: run_audit(cfg, hook))
        if store is not None and out.is_main and not opts["quiet"]:
            on_commit(lambda: _note_store(store), lambda: None)  # once the store is in place
        return emit(report, out)

    guarded(published_together(body))  # the store and every output file: all put in place, or none


def input_keys(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--input-key`` values → (keyword, HDF5 key) pairs: 'attention_mask' or 'attention_mask=masks/train'."""
    pairs = []
    for value in values or []:
        name, _, key = value.partition("=")
        if not name or (_ and not key):
            raise OptionsError(f"--input-key {value!r} is not NAME or NAME=KEY (e.g. attention_mask=mask).")
        pairs.append((name, key or name))
    return tuple(pairs)


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
