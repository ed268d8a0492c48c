"""Typer wiring only: options → settings → config → run_audit → outputs → exit code.

Exceptions become exit codes here and nowhere else: NrcAuditError → 2, SIGINT → 130, SIGTERM → 143.
stdout carries only the product (table or JSON); progress, warnings and errors go to stderr.
Analysis options default to None on the command line so that a ``[tool.nrc-audit]`` table can fill them
(command line > settings file > built-in default).
"""

from __future__ import annotations

import enum
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nrc_audit.config import AnalysisOptions, AuditConfig, DataOptions, ModelOptions, Thresholds
from nrc_audit.errors import ExitCode, Interrupted, NrcAuditError, OptionsError
from nrc_audit.outputs import Outputs, emit
from nrc_audit.settings_file import DEFAULTS, load_settings, resolve

err_console = Console(stderr=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


audit_app = make_app("Audit a trained regression network for Deep Neural Regression Collapse (NRC1–NRC4).")

# Options shared by every command that turns statistics into a report.
RankOpt = Annotated[Optional[str], typer.Option("--rank", help="Subspace rank k: an integer, or 'auto' (target rank estimate). Default: t.")]
Nrc1Opt = Annotated[Optional[float], typer.Option("--nrc1-max", help="NRC1 passes when noise ≤ this (default 0.25).")]
Nrc2Opt = Annotated[Optional[float], typer.Option("--nrc2-min", help="NRC2 passes when CKA(H, Y) ≥ this (default 0.6).")]
Nrc3Opt = Annotated[Optional[float], typer.Option("--nrc3-min", help="NRC3 passes when the mean principal cosine ≥ this (default 0.7).")]
Nrc4Opt = Annotated[Optional[float], typer.Option("--nrc4-ratio-max", help="NRC4 passes when probe MSE / model MSE ≤ this (default 2.0).")]
RtolOpt = Annotated[Optional[float], typer.Option("--pinv-rtol", help="Σ_H⁺ keeps eigenvalues > rtol²·λ₁ (default 1e-3).")]
EnergyOpt = Annotated[Optional[float], typer.Option("--rank-energy", help="Energy fraction for target.rank_estimate (default 0.99).")]
RequireOpt = Annotated[Optional[int], typer.Option("--require-collapsed", help="Gate: the last N layers must be collapsed; 0 disables (default 1).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file ([tool.nrc-audit] table); default: the nearest pyproject.toml that has one.")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when the gate fails.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here (atomically).")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Write a model-card markdown section here.")]
ModelIndexOpt = Annotated[Optional[Path], typer.Option("--model-index", help="Write a Hugging Face model-index YAML fragment here.")]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Write the four-panel PNG here (needs nrc-audit[plot]).")]
BaselineOpt = Annotated[Optional[Path], typer.Option("--baseline", help="Earlier JSON report of the same architecture; regressions exit 1.")]
ToleranceOpt = Annotated[Optional[float], typer.Option("--baseline-tolerance", help="Allowed worsening of NRC1–3 (absolute) and NRC4 ratio (relative) (default 0.05).")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", help="What stdout carries: the table or the JSON report.")]
QuietOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar on stderr.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Rows per batch (default 1024).")]


def analysis_options(s: dict[str, Any]) -> AnalysisOptions:
    """Resolved settings → validated AnalysisOptions (``rank`` may be an int, 'auto' or None)."""
    rank = s["rank"]
    if isinstance(rank, str) and rank != "auto":
        try:
            rank = int(rank)
        except ValueError:
            raise OptionsError(f"--rank {rank!r} is not understood; pass an integer ≥ 1 or 'auto'.") from None
    thresholds = Thresholds(float(s["nrc1_max"]), float(s["nrc2_min"]), float(s["nrc3_min"]), float(s["nrc4_ratio_max"]))
    return AnalysisOptions(rank, float(s["pinv_rtol"]), float(s["rank_energy"]), int(s["require_collapsed"]),
                           thresholds).validate()  # fmt: skip


def settings(config: Path | None, cli: dict[str, Any]) -> dict[str, Any]:
    """Resolve the settings a command was given: ``cli`` is the command's ``locals()``; the names that are
    settings keys (DEFAULTS in settings_file) are taken from it, None meaning 'not given'."""
    file_values, _ = load_settings(config)
    return resolve({k: v for k, v in cli.items() if k in DEFAULTS}, file_values)


def progress_bar(enabled: bool, label: str = "extracting") -> tuple[Progress | None, Callable[[int, int], None] | None]:
    if not enabled:
        return None, None
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeRemainingColumn(),
                   console=err_console, transient=True)  # fmt: skip
    task = bar.add_task(label, total=None)

    def hook(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total or None)

    return bar, hook


def with_progress(enabled: bool, run: Callable[[Callable[[int, int], None] | None], Any]) -> Any:
    bar, hook = progress_bar(enabled)
    if bar is None:
        return run(None)
    with bar:
        return run(hook)


def guarded(body: Callable[[], ExitCode | int]) -> None:
    """Run ``body`` and exit with its code; the package's exceptions and signals become exit codes here."""
    previous: Any = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(ExitCode.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: keep the default handler
        previous = None
    try:
        code = body()
    except NrcAuditError as exc:
        # Text, not markup: messages quote user strings and key lists whose brackets Rich would eat
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        code = exc.exit_code
    except OSError as exc:  # a file that cannot be written or read: missing folder, permissions, full disk
        where = f" ({exc.filename})" if exc.filename else ""
        err_console.print(Text.assemble(("error: ", "bold red"), f"{exc.strerror or exc}{where}. Check that the "
                                        "path's folder exists and is writable, and that the disk has space."),
                          highlight=False, soft_wrap=True)  # fmt: skip
        code = ExitCode.USAGE
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (SIGINT); no report written.")
        code = ExitCode.SIGINT
    except Interrupted as exc:
        err_console.print(f"[bold red]interrupted[/] ({exc.exit_code.name}); no report written.")
        code = exc.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(int(code))


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
        from nrc_audit.pipeline import run_audit

        s = settings(config, given)
        out = Outputs(fmt.value, json_path, markdown, model_index, plot, baseline, float(s["baseline_tolerance"]),
                      exit_zero)  # fmt: skip
        out.check_before_run()
        store = None if no_features else (features or Path(f"{model.stem}.features.h5"))
        cfg = AuditConfig(
            model_path=model, data_path=data,
            data=DataOptions(s["x_key"], s["y_key"], channels_last, scale_uint8, limit),
            model=ModelOptions(model_def, _json_object(model_kwargs), s["activation"]),
            analysis=analysis_options(s), layers=tuple(s["layers"]), exclude=tuple(s["exclude"]),
            device=s["device"], batch_size=int(s["batch_size"]), features_path=store,
            features_compression=features_compression,
        )  # fmt: skip
        report = with_progress(not no_progress, lambda hook: run_audit(cfg, hook))
        return emit(report, out)

    guarded(body)


def _json_object(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionsError(f"--model-kwargs is not valid JSON ({exc}); pass e.g. '{{\"width\": 64}}'.") from None
    if not isinstance(value, dict):
        raise OptionsError("--model-kwargs must be a JSON object, e.g. '{\"width\": 64}'.")
    return value


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``nrc-audit MODEL DATA [options]`` or ``nrc-audit SUBCOMMAND …``."""
    from nrc_audit.commands import SUBCOMMANDS

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]](args=args[1:], prog_name=f"nrc-audit {args[0]}")
    else:
        audit_app(args=args, prog_name="nrc-audit")
