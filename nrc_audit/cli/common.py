"""What every command shares: option declarations, settings resolution, progress, and the one place where
exceptions and signals become exit codes.

Originally: Typer wiring only: options → settings → config → run_audit → outputs → exit code.

Exceptions become exit codes here and nowhere else: NrcAuditError → 2, any unexpected exception → 2 (one
paragraph; traceback with --debug), SIGINT → 130, SIGTERM → 143; 1 only for a failed gate or baseline.
stdout carries only the product (table or JSON); progress, warnings and errors go to stderr.
Analysis options default to None on the command line so that a ``[tool.nrc-audit]`` table can fill them
(command line > settings file > built-in default).
"""

from __future__ import annotations

import enum
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import click
import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nrc_audit.config import AnalysisOptions, Thresholds
from nrc_audit.errors import ExitCode, Interrupted, NrcAuditError, OptionsError
from nrc_audit.io import lifecycle
from nrc_audit.io.lifecycle import Watchdog
from nrc_audit.io.settings_file import DEFAULTS, find_pyproject, load_settings, resolve

err_console = Console(stderr=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


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


DEBUG_ENV = "NRC_AUDIT_DEBUG"  # "1": unexpected errors print their traceback too (also: --debug)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _report_internal_error(exc: BaseException) -> None:
    """One paragraph for an exception that is not a known failure (a bug, or an input nobody foresaw)."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    err_console.print(Text.assemble(("error: ", "bold red"), (
        f"internal error: {type(exc).__name__}{': ' + first if first else ''}. This is a bug in nrc-audit or an input "
        f"it does not recognise; no report was written. Re-run with --debug (or {DEBUG_ENV}=1) for the traceback "
        "and report it with the command line.")), highlight=False, soft_wrap=True)  # fmt: skip
    if debug_enabled():
        err_console.print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), markup=False,
                          highlight=False, soft_wrap=True)  # fmt: skip


def _run_body(body: Callable[[], ExitCode | int]) -> int:
    try:
        return int(body())
    except NrcAuditError as exc:
        # Text, not markup: messages quote user strings and key lists whose brackets Rich would eat
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return int(exc.exit_code)
    except OSError as exc:  # a file that cannot be written or read: missing folder, permissions, full disk
        where = f" ({exc.filename})" if exc.filename else ""
        err_console.print(Text.assemble(("error: ", "bold red"), f"{exc.strerror or exc}{where}. Check that the "
                                        "path's folder exists and is writable, and that the disk has space."),
                          highlight=False, soft_wrap=True)  # fmt: skip
        return int(ExitCode.USAGE)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (SIGINT); no report written.")
        return int(ExitCode.SIGINT)
    except Interrupted as exc:
        err_console.print(f"[bold red]interrupted[/] ({exc.exit_code.name}); no report written.")
        return int(exc.exit_code)
    except (typer.Exit, click.exceptions.ClickException):
        raise
    except SystemExit as exc:  # sys.exit() in code we called (a --model-def factory): never its own code
        _report_internal_error(exc)
        return int(ExitCode.USAGE)
    except Exception as exc:  # anything else is a bug or an unforeseen input: exit 2 (ruff's convention), never 1
        _report_internal_error(exc)
        return int(ExitCode.USAGE)


def guarded(body: Callable[[], ExitCode | int]) -> None:
    """Run ``body`` and exit with its code; exceptions and signals become exit codes here and nowhere else.

    NrcAuditError → its code (2); OSError → 2; any other exception → 2 with a one-paragraph "internal error"
    message (the traceback only with --debug / NRC_AUDIT_DEBUG=1); SIGINT → 130; SIGTERM → 143. Exit 1
    comes only from ``body``'s own return value (a failed gate or baseline). A signal that the graceful path
    does not turn into an exit within a second ends the process anyway (io.lifecycle.Watchdog).
    """
    previous: Any = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        lifecycle.note_signal(signum)  # kept even where the raise below is swallowed (a weakref callback)
        raise Interrupted(ExitCode.SIGTERM)

    unraisable = sys.unraisablehook

    def quiet_unraisable(u: Any) -> None:  # the signal raised inside a weakref callback: noted, exit follows
        if not isinstance(u.exc_value, (Interrupted, KeyboardInterrupt)):
            unraisable(u)

    sys.unraisablehook = quiet_unraisable
    try:
        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: keep the default handler
            previous = None
        with Watchdog():
            code = _run_body(body)
    except Interrupted as exc:  # a signal outside the body (just before or after it)
        err_console.print(f"[bold red]interrupted[/] ({exc.exit_code.name}); no report written.")
        code = int(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (SIGINT); no report written.")
        code = int(ExitCode.SIGINT)
    finally:
        sys.unraisablehook = unraisable
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


def model_def_file(spec: str | None) -> Path | None:
    """The Python file of ``--model-def file.py:callable`` (None for ``package.module:callable``)."""
    if spec is None or ":" not in spec:
        return None
    path = spec.rsplit(":", 1)[0]
    return Path(path) if path.endswith(".py") else None


def settings_source(config: Path | None) -> Path | None:
    """The settings file a command reads (``--config`` or the nearest pyproject.toml), an input to protect."""
    return config if config is not None else find_pyproject(Path.cwd())


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


