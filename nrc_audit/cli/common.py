"""What every command shares: option declarations, settings resolution, progress, and the one place where
exceptions and signals become exit codes.

Originally: Typer wiring only: options → settings → config → run_audit → outputs → exit code.

Exceptions become exit codes here and nowhere else: NrcAuditError → 2, SIGINT → 130, SIGTERM → 143.
stdout carries only the product (table or JSON); progress, warnings and errors go to stderr.
Analysis options default to None on the command line so that a ``[tool.nrc-audit]`` table can fill them
(command line > settings file > built-in default).
"""

from __future__ import annotations

import enum
import json
import signal
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nrc_audit.config import AnalysisOptions, Thresholds
from nrc_audit.errors import ExitCode, Interrupted, NrcAuditError, OptionsError
from nrc_audit.io.settings_file import DEFAULTS, load_settings, resolve

err_console = Console(stderr=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


# Options shared by every command that turns statistics into a report.
RankOpt = Annotated[Optional[str], typer.Option("--rank", help="Subspace rank k: 'auto' (default: the targets' intrinsic rank estimate, ≤ t), 't' (the paper's k = t) or an integer.")]
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
    """Resolved settings → validated AnalysisOptions (``rank`` may be an int, 'auto', 't' or None)."""
    rank = s["rank"]
    if isinstance(rank, str) and rank not in ("auto", "t"):
        try:
            rank = int(rank)
        except ValueError:
            raise OptionsError(f"--rank {rank!r} is not understood; pass an integer ≥ 1, 'auto' or 't'.") from None
    thresholds = Thresholds(float(s["nrc1_max"]), float(s["nrc2_min"]), float(s["nrc3_min"]), float(s["nrc4_ratio_max"]))
    return AnalysisOptions(rank, float(s["pinv_rtol"]), float(s["rank_energy"]), int(s["require_collapsed"]),
                           thresholds).validate()  # fmt: skip


def is_main() -> bool:
    """Whether this process writes and prints (rank 0 under torchrun, always outside it)."""
    from nrc_audit.engine.distributed import env_rank

    return env_rank() == 0


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


def json_object(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionsError(f"--model-kwargs is not valid JSON ({exc}); pass e.g. '{{\"width\": 64}}'.") from None
    if not isinstance(value, dict):
        raise OptionsError("--model-kwargs must be a JSON object, e.g. '{\"width\": 64}'.")
    return value


