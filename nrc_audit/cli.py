"""Typer wiring only: options → config → run_audit → render → exit code.

Exceptions become exit codes here and nowhere else: NrcAuditError → 2, SIGINT → 130, SIGTERM → 143.
stdout carries only the product (table or JSON); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import enum
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nrc_audit.config import AnalysisOptions, AuditConfig, DataOptions, ModelOptions, Thresholds
from nrc_audit.errors import ExitCode, Interrupted, NrcAuditError, OptionsError
from nrc_audit.report import Report, write_atomic

err_console = Console(stderr=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def _app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


audit_app = _app("Audit a trained regression network for Deep Neural Regression Collapse (NRC1–NRC4).")
reanalyze_app = _app("Recompute the audit report from a saved feature store, without the model or the data.")

# Options shared by the audit and the re-analysis (analysis settings and outputs).
RankOpt = Annotated[Optional[str], typer.Option("--rank", help="Subspace rank k: an integer, or 'auto' (target rank estimate). Default: t.")]
Nrc1Opt = Annotated[float, typer.Option("--nrc1-max", help="NRC1 passes when noise ≤ this.")]
Nrc2Opt = Annotated[float, typer.Option("--nrc2-min", help="NRC2 passes when CKA(H, Y) ≥ this.")]
Nrc3Opt = Annotated[float, typer.Option("--nrc3-min", help="NRC3 passes when the mean principal cosine ≥ this.")]
Nrc4Opt = Annotated[float, typer.Option("--nrc4-ratio-max", help="NRC4 passes when layer probe MSE / model MSE ≤ this.")]
RtolOpt = Annotated[float, typer.Option("--pinv-rtol", help="Σ_H⁺ keeps eigenvalues > rtol²·λ₁.")]
EnergyOpt = Annotated[float, typer.Option("--rank-energy", help="Energy fraction for target.rank_estimate.")]
RequireOpt = Annotated[int, typer.Option("--require-collapsed", help="Gate: the last N layers must be collapsed (0 disables).")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when the gate fails.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here (atomically).")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", help="What stdout carries: the table or the JSON report.")]
QuietOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar on stderr.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Rows per batch.")]


def _analysis(rank: str | None, nrc1_max: float, nrc2_min: float, nrc3_min: float, nrc4_ratio_max: float,
              pinv_rtol: float, rank_energy: float, require_collapsed: int) -> AnalysisOptions:  # fmt: skip
    parsed: int | str | None = rank
    if rank is not None and rank != "auto":
        try:
            parsed = int(rank)
        except ValueError:
            raise OptionsError(f"--rank {rank!r} is not understood; pass an integer ≥ 1 or 'auto'.") from None
    return AnalysisOptions(parsed, pinv_rtol, rank_energy, require_collapsed,
                           Thresholds(nrc1_max, nrc2_min, nrc3_min, nrc4_ratio_max)).validate()  # fmt: skip


def _progress_hook(enabled: bool) -> tuple[Progress | None, Callable[[int, int], None] | None]:
    if not enabled:
        return None, None
    bar = Progress(TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeRemainingColumn(), console=err_console, transient=True)  # fmt: skip
    task = bar.add_task("rows", total=None)

    def hook(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, hook


def _emit(report: Report, fmt: OutputFormat, json_path: Path | None, exit_zero: bool) -> None:
    """Write the outputs, print the product, and exit with the verdict."""
    from nrc_audit.render import print_report

    text = report.to_json()
    if json_path is not None:
        write_atomic(json_path, text)
    if fmt is OutputFormat.json:
        sys.stdout.write(text)
    else:
        print_report(report, Console())
    code = report.exit_code
    if code is ExitCode.GATE_FAILED and exit_zero:
        code = ExitCode.OK
    raise typer.Exit(int(code))


def _guarded(body: Callable[[], None]) -> None:
    """Run ``body`` turning the package's exceptions and signals into exit codes (the one place that does)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(ExitCode.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. inside some test runners): keep the default
        previous = None
    try:
        body()
    except NrcAuditError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(int(exc.exit_code)) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (SIGINT); no report written.")
        raise typer.Exit(int(ExitCode.SIGINT)) from None
    except Interrupted as exc:
        err_console.print(f"[bold red]interrupted[/] ({exc.exit_code.name}); no report written.")
        raise typer.Exit(int(exc.exit_code)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@audit_app.command()
def audit(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, or a .pt/.pth state dict.")],
    data: Annotated[Path, typer.Argument(help="HDF5 file with inputs and targets.")],
    json_path: JsonOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    features: Annotated[Optional[Path], typer.Option("--features", help="Feature store path (default: MODEL-STEM.features.h5 in the current folder).")] = None,
    no_features: Annotated[bool, typer.Option("--no-features", help="Do not write the feature store.")] = False,
    features_compression: Annotated[Optional[str], typer.Option("--features-compression", help="gzip or lzf.")] = None,
    x_key: Annotated[str, typer.Option("--x-key", help="HDF5 path of the inputs.")] = "X",
    y_key: Annotated[str, typer.Option("--y-key", help="HDF5 path of the targets.")] = "Y",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Images are (N, H, W, C).")] = False,
    scale_uint8: Annotated[bool, typer.Option("--scale-uint8", help="Divide uint8 images by 255.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Audit only the first N rows.")] = None,
    batch_size: BatchOpt = 1024,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.")] = "auto",
    model_def: Annotated[Optional[str], typer.Option("--model-def", help="file.py:callable or package.module:callable returning the nn.Module (executes that code).")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON object of keyword arguments for --model-def.")] = None,
    activation: Annotated[Optional[str], typer.Option("--activation", help="MLP activation when the checkpoint does not say (default relu).")] = None,
    layers: Annotated[Optional[list[str]], typer.Option("--layers", help="Glob of layer names to audit (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob of layer names to skip (repeatable; default '*downsample*').")] = None,
    rank: RankOpt = None,
    nrc1_max: Nrc1Opt = 0.25,
    nrc2_min: Nrc2Opt = 0.6,
    nrc3_min: Nrc3Opt = 0.7,
    nrc4_ratio_max: Nrc4Opt = 2.0,
    pinv_rtol: RtolOpt = 1e-3,
    rank_energy: EnergyOpt = 0.99,
    require_collapsed: RequireOpt = 1,
    exit_zero: ExitZeroOpt = False,
    no_progress: QuietOpt = False,
) -> None:
    """Audit MODEL on DATA: per-layer NRC1–NRC4, the Frobenius bound, a table, a JSON report and a gate."""

    def body() -> None:
        from nrc_audit.pipeline import run_audit

        kwargs = None
        if model_kwargs is not None:
            try:
                kwargs = json.loads(model_kwargs)
            except json.JSONDecodeError as exc:
                raise OptionsError(f"--model-kwargs is not valid JSON ({exc}); pass e.g. '{{\"width\": 64}}'.") from None
            if not isinstance(kwargs, dict):
                raise OptionsError("--model-kwargs must be a JSON object, e.g. '{\"width\": 64}'.")
        store = None if no_features else (features or Path(f"{model.stem}.features.h5"))
        config = AuditConfig(
            model_path=model, data_path=data,
            data=DataOptions(x_key, y_key, channels_last, scale_uint8, limit),
            model=ModelOptions(model_def, kwargs, activation),
            analysis=_analysis(rank, nrc1_max, nrc2_min, nrc3_min, nrc4_ratio_max, pinv_rtol, rank_energy,
                               require_collapsed),
            layers=tuple(layers or ()), exclude=tuple(exclude) if exclude is not None else ("*downsample*",),
            device=device, batch_size=batch_size, features_path=store, features_compression=features_compression,
        )  # fmt: skip
        bar, hook = _progress_hook(not no_progress)
        if bar is not None:
            with bar:
                report = run_audit(config, hook)
        else:
            report = run_audit(config, None)
        _emit(report, fmt, json_path, exit_zero)

    _guarded(body)


@reanalyze_app.command()
def reanalyze(
    store: Annotated[Path, typer.Argument(help="Feature store written by a previous audit (--features).")],
    json_path: JsonOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    batch_size: BatchOpt = 4096,
    rank: RankOpt = None,
    nrc1_max: Nrc1Opt = 0.25,
    nrc2_min: Nrc2Opt = 0.6,
    nrc3_min: Nrc3Opt = 0.7,
    nrc4_ratio_max: Nrc4Opt = 2.0,
    pinv_rtol: RtolOpt = 1e-3,
    rank_energy: EnergyOpt = 0.99,
    require_collapsed: RequireOpt = 1,
    exit_zero: ExitZeroOpt = False,
    no_progress: QuietOpt = False,
) -> None:
    """Recompute the report from STORE alone (new thresholds or rank allowed)."""

    def body() -> None:
        from nrc_audit.pipeline import reanalyze as run_reanalysis

        analysis = _analysis(rank, nrc1_max, nrc2_min, nrc3_min, nrc4_ratio_max, pinv_rtol, rank_energy,
                             require_collapsed)  # fmt: skip
        if batch_size < 1:
            raise OptionsError(f"--batch-size {batch_size} must be ≥ 1.")
        bar, hook = _progress_hook(not no_progress)
        if bar is not None:
            with bar:
                report = run_reanalysis(store, analysis, batch_size, hook)
        else:
            report = run_reanalysis(store, analysis, batch_size, None)
        _emit(report, fmt, json_path, exit_zero)

    _guarded(body)


SUBCOMMANDS: dict[str, typer.Typer] = {"reanalyze": reanalyze_app}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``nrc-audit MODEL DATA [options]`` or ``nrc-audit SUBCOMMAND …``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]](args=args[1:], prog_name=f"nrc-audit {args[0]}")
    else:
        audit_app(args=args, prog_name="nrc-audit")
