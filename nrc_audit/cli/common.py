"""What every command shares: option declarations, settings resolution, progress, and the one place where
exceptions and signals become exit codes.

Exceptions become exit codes here and nowhere else: NrcAuditError → 2, any unexpected exception → 2 (one
paragraph; traceback with --debug), SIGINT → 130, SIGTERM → 143, SIGHUP → 129; 1 only for a failed gate or baseline.
stdout carries only the product (table or JSON); progress, warnings and errors go to stderr.
Analysis options default to None on the command line so that a ``[tool.nrc-audit]`` table can fill them
(command line > settings file > built-in default).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar, get_type_hints

import typer
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nrc_audit.config import AnalysisOptions, Thresholds
from nrc_audit.core.verdicts import BY_NAME, TABLE
from nrc_audit.errors import ExitCode, Interrupted, NrcAuditError, OptionsError
from nrc_audit.io import lifecycle
from nrc_audit.io.lifecycle import Watchdog
from nrc_audit.io.settings_file import DEFAULTS, find_pyproject
from nrc_audit.outputs import charset
from nrc_audit.outputs.records import shown

err_console = charset.console(stderr=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    github = "github"


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


# Help panels: every option is declared once here, in one of these, and shared by every command that takes it.
INPUTS, MODEL, ANALYSIS, THRESHOLDS, OUTPUTS, CI = "Inputs", "Model", "Analysis", "Thresholds", "Outputs", "CI"


def _default(key: str) -> str | bool:
    """The built-in default of a settings key as help shows it (command-line options default to None so that
    a settings file can fill them; help shows what None resolves to)."""
    value = DEFAULTS[key]
    return False if value is None or value == [] else ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def opt(*names: str, help: str, panel: str, key: str | None = None, show: str | bool | None = None, **kw: Any) -> Any:
    """A typer.Option in ``panel``; ``key``: the settings key whose default help shows. Help is plain text:
    brackets are escaped so Rich markup does not eat ``nrc-audit[plot]`` or ``[tool.nrc-audit]``."""
    shown = show if show is not None else _default(key) if key is not None else True
    return typer.Option(*names, help=help.replace("[", "\\["), rich_help_panel=panel, show_default=shown, **kw)


def flag(*names: str, help: str, panel: str, **kw: Any) -> Any:
    """A boolean flag: no value, so help shows no type and no default."""
    return typer.Option(*names, help=help.replace("[", "\\["), rich_help_panel=panel, show_default=False,
                        metavar="", **kw)  # fmt: skip


RankOpt = Annotated[Optional[str], opt("--rank", help="Subspace rank k: 'auto' (the targets' intrinsic rank estimate, ≤ t), 't' (the paper's k = t) or an integer.", panel=ANALYSIS, show="auto")]
def _threshold(name: str) -> Any:
    """The threshold option of a condition, as the conditions table (core/verdicts.py) declares it."""
    c = BY_NAME[name]
    return opt(c.option, help=c.help, panel=THRESHOLDS, key=c.threshold)


Nrc1Opt = Annotated[Optional[float], _threshold("nrc1")]
Nrc2Opt = Annotated[Optional[float], _threshold("nrc2")]
Nrc3Opt = Annotated[Optional[float], _threshold("nrc3")]
Nrc4Opt = Annotated[Optional[float], _threshold("nrc4")]
NoiseOpt = Annotated[Optional[float], _threshold("noise_alignment")]
RtolOpt = Annotated[Optional[float], opt("--pinv-rtol", help="Σ_H⁺ keeps eigenvalues > rtol²·λ₁.", panel=ANALYSIS, key="pinv_rtol")]
EnergyOpt = Annotated[Optional[float], opt("--rank-energy", help="Energy fraction for target.rank_estimate.", panel=ANALYSIS, key="rank_energy")]
RequireOpt = Annotated[Optional[int], opt("--require-collapsed", help="Gate: the last N layers must be collapsed; 0 disables.", panel=CI, key="require_collapsed")]
ConfigOpt = Annotated[Optional[Path], opt("--config", help="TOML settings file ([tool.nrc-audit] table).", panel=INPUTS, show="the nearest pyproject.toml with a [tool.nrc-audit] table")]
ExitZeroOpt = Annotated[bool, flag("--exit-zero", help="Exit 0 even when the gate fails.", panel=CI)]
JsonOpt = Annotated[Optional[Path], opt("--json", help="Write the JSON report here (atomically).", panel=OUTPUTS, show=False)]
MarkdownOpt = Annotated[Optional[Path], opt("--markdown", help="Write a model-card markdown section here (also after exit 2: a section saying the audit could not run).", panel=OUTPUTS, show=False)]
ModelIndexOpt = Annotated[Optional[Path], opt("--model-index", help="Write a Hugging Face model-index YAML fragment here (needs --dataset-id).", panel=OUTPUTS, show=False)]
ModelCardOpt = Annotated[Optional[Path], opt("--model-card", help="Merge the results into this model card (README.md): front matter and a marked section; created if missing.", panel=OUTPUTS, show=False)]
DatasetIdOpt = Annotated[Optional[str], opt("--dataset-id", help="Hub dataset id (user/name) of the audited data, for the model-index.", panel=OUTPUTS, show=False)]
DatasetNameOpt = Annotated[Optional[str], opt("--dataset-name", help="Pretty dataset name for the model-index.", panel=OUTPUTS, show="the dataset id")]
HubTaskOpt = Annotated[Optional[str], opt("--hub-task", help="Hub task id for the model-index.", panel=OUTPUTS, show="tabular-regression for MLPs, else other")]
PlotOpt = Annotated[Optional[Path], opt("--plot", help="Write the 2×2 figure as PNG here (needs nrc-audit[plot]).", panel=OUTPUTS, show=False)]
BaselineOpt = Annotated[Optional[Path], opt("--baseline", help="Earlier JSON report of the same architecture; regressions exit 1.", panel=CI, show=False)]
ToleranceOpt = Annotated[Optional[float], opt("--baseline-tolerance", help="Allowed worsening of NRC1–3 (absolute) and NRC4 ratio (relative).", panel=CI, key="baseline_tolerance")]
FormatOpt = Annotated[OutputFormat, opt("--format", help="What stdout carries: the table, the JSON report, or GitHub workflow annotations.", panel=OUTPUTS)]
JunitOpt = Annotated[Optional[Path], opt("--junit-xml", help="Write JUnit XML here: one testcase per layer, gate failures as failures.", panel=CI, show=False)]
QuietOpt = Annotated[bool, flag("--no-progress", help="No progress bar on stderr.", panel=OUTPUTS)]
QuietFlag = Annotated[bool, flag("-q", "--quiet", help="No progress bar and no notes on stderr; errors still go there.", panel=OUTPUTS)]
BatchOpt = Annotated[Optional[int], opt("--batch-size", help="Rows per batch.", panel=ANALYSIS, key="batch_size")]
XKeyOpt = Annotated[Optional[str], opt("--x-key", help="HDF5 path of the inputs.", panel=INPUTS, key="x_key")]
YKeyOpt = Annotated[Optional[str], opt("--y-key", help="HDF5 path of the targets.", panel=INPUTS, key="y_key")]
ChannelsLastOpt = Annotated[bool, flag("--channels-last", help="Images are (N, H, W, C).", panel=INPUTS)]
ScaleUint8Opt = Annotated[bool, flag("--scale-uint8", help="Divide uint8 images by 255.", panel=INPUTS)]
LimitOpt = Annotated[Optional[int], opt("--limit", help="Audit only the first N rows.", panel=INPUTS, show="all rows")]
DeviceOpt = Annotated[Optional[str], opt("--device", help="auto, cpu, cuda or cuda:INDEX.", panel=ANALYSIS, key="device")]
ActivationOpt = Annotated[Optional[str], opt("--activation", help="MLP activation when the checkpoint does not say.", panel=MODEL, show="relu, recorded as an assumption")]


def version_callback(value: bool) -> None:
    if value:
        from nrc_audit.version import __version__

        print(f"nrc-audit {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[bool, flag("--version", help="Print the version and exit.", panel=OUTPUTS, callback=version_callback, is_eager=True)]


PANEL_ORDER = (INPUTS, MODEL, ANALYSIS, THRESHOLDS, OUTPUTS, CI)
Command = TypeVar("Command", bound=Callable[..., Any])


def takes(command: Command) -> Command:
    """Let Typer see the fields of every option group the command takes as options, and hand the command the
    filled groups. A parameter annotated with a group dataclass (cli/options.py) is replaced, for Typer, by
    the group's fields (Typer builds a command from ``inspect.signature``, which returns ``__signature__``);
    the command itself receives one frozen instance per group, so every option keeps its type from the
    command line to its use. Parameters are ordered for help: arguments, then the panels in PANEL_ORDER."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    keyword = inspect.Parameter.KEYWORD_ONLY  # Typer passes every parameter by name
    groups: dict[str, tuple[type, list[str]]] = {}
    params: list[inspect.Parameter] = []
    for p in own:
        if not dataclasses.is_dataclass(p.annotation):
            params.append(p.replace(kind=keyword))
            continue
        cls = p.annotation
        hints = get_type_hints(cls, include_extras=True)
        names = [f.name for f in dataclasses.fields(cls)]
        groups[p.name] = (cls, names)  # type: ignore[assignment]
        params += [inspect.Parameter(f.name, keyword, annotation=hints[f.name], default=f.default)
                   for f in dataclasses.fields(cls)]  # fmt: skip
    names_seen = [p.name for p in params] + list(groups)  # a group's own name is a keyword of the command too
    clash = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if clash:
        raise TypeError(f"{command.__name__}: option names {clash} are declared twice")

    @functools.wraps(command)
    def typer_entry(**values: Any) -> Any:  # Typer calls with every option by name
        args = {name: cls(**{n: values.pop(n) for n in names}) for name, (cls, names) in groups.items()}
        return command(**values, **args)

    setattr(typer_entry, "__signature__", inspect.Signature(sorted(params, key=_panel_rank), return_annotation=None))
    return typer_entry  # type: ignore[return-value]


def _panel_rank(param: inspect.Parameter) -> int:
    """0 for arguments (no panel), else 1 + the panel's place in PANEL_ORDER."""
    panels = [getattr(m, "rich_help_panel", None) for m in getattr(param.annotation, "__metadata__", ())]
    return next((1 + PANEL_ORDER.index(p) for p in panels if p in PANEL_ORDER), 0)


def analysis_options(s: dict[str, Any]) -> AnalysisOptions:
    """Resolved settings → validated AnalysisOptions (``rank`` may be an int, 'auto', 't' or None)."""
    rank = s["rank"]
    if isinstance(rank, str) and rank not in ("auto", "t"):
        try:
            rank = int(rank)
        except ValueError:
            raise OptionsError(f"--rank {rank!r} is not understood; pass an integer ≥ 1, 'auto' or 't'.") from None
    thresholds = Thresholds(**{c.threshold: float(s[c.threshold]) for c in TABLE})
    return AnalysisOptions(rank, float(s["pinv_rtol"]), float(s["rank_energy"]), int(s["require_collapsed"]),
                           thresholds).validate()  # fmt: skip


def is_main() -> bool:
    """Whether this process writes and prints (rank 0 under torchrun's RANK, always outside it). Read from the
    environment, not from engine.distributed, which imports torch: option errors come before torch loads."""
    from nrc_audit.io.validate import env_int

    return env_int("RANK", 0) == 0


def require_inputs(*inputs: tuple[str, Path | None]) -> None:
    """Refuse a missing input file (exit 2) before the command imports torch, so a mistyped path is answered at
    once. ``inputs``: (what the file is: "checkpoint", "data file", "feature store"; its path); the io modules
    that read them later check the contents."""
    for what, path in inputs:
        if path is not None and not path.exists():
            raise OptionsError(f"{what} not found: {path}. Check the path (relative paths start at {Path.cwd()}).")


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


WORD_MAX = 300  # the longest unbroken run an error message prints: a long path fits, a 1 MB tensor name is cut


def _printable(message: str) -> str:
    """An error message safe for a terminal: the user strings it quotes (tensor, file and key names) with their
    control characters (escape codes) written as ``\\x1b``-style escapes and any run of more than WORD_MAX
    characters cut, its length noted. Line breaks of the message itself stay."""
    return "\n".join(" ".join(shown(word, WORD_MAX) for word in line.split(" ")) for line in message.split("\n"))


def _report_internal_error(exc: BaseException) -> None:
    """One paragraph for an exception that is not a known failure (a bug, or an input nobody foresaw)."""
    first = _printable(str(exc).splitlines()[0]) if str(exc) else ""
    err_console.print(Text.assemble(("error: ", "bold red"), (
        f"internal error: {type(exc).__name__}{': ' + first if first else ''}. This is a bug in nrc-audit or an input "
        f"it does not recognise; no report was written. Re-run with --debug (or {DEBUG_ENV}=1) for the traceback "
        "and report it with the command line.")), highlight=False, soft_wrap=True)  # fmt: skip
    _traceback_if_debug(exc)


# How to install a run-time dependency that may be missing (any other: pip install NAME; the optional extras
# raise their own messages). torch: the CPU build from
# PyTorch's own index, because PyPI's default Linux wheel is a CUDA build of several GB (README, "Install").
INSTALL_HINTS = {
    "torch": "pip install torch --index-url https://download.pytorch.org/whl/cpu (the CPU build; for a GPU, the "
             "command for your CUDA version from https://pytorch.org)",
}  # fmt: skip


def _report_missing_module(exc: ModuleNotFoundError) -> None:
    """A package this Python lacks: which one, which interpreter, and the command that installs it."""
    name = (exc.name or str(exc)).split(".")[0]
    hint = INSTALL_HINTS.get(name, f"pip install {name}")
    err_console.print(Text.assemble(("error: ", "bold red"), (
        f"this command needs the Python package '{name}', which is not installed for {sys.executable} "
        f"(Python {sys.version.split()[0]}); no report was written. Install it with: {hint}")),
        highlight=False, soft_wrap=True)  # fmt: skip
    _traceback_if_debug(exc)


def _report_exit_call(exc: SystemExit) -> None:
    """sys.exit() in code the command ran (a --model-def factory, a library): a stop, not a bug of nrc-audit."""
    err_console.print(Text.assemble(("error: ", "bold red"), (
        f"the audit stopped: code it ran called sys.exit({exc.code!r}) (a --model-def factory or a library it "
        "uses). Re-run with --debug for the traceback.")), highlight=False, soft_wrap=True)  # fmt: skip
    _traceback_if_debug(exc)


def _traceback_if_debug(exc: BaseException) -> None:
    if debug_enabled():
        err_console.print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), markup=False,
                          highlight=False, soft_wrap=True)  # fmt: skip


def _run_body(body: Callable[[], ExitCode | int]) -> int:
    try:
        return int(body())
    except NrcAuditError as exc:
        # Text, not markup: messages quote user strings and key lists whose brackets Rich would eat
        err_console.print(Text.assemble(("error: ", "bold red"), _printable(str(exc))), highlight=False,
                          soft_wrap=True)
        return int(exc.exit_code)
    except OSError as exc:  # a file that cannot be written or read: missing folder, permissions, full disk
        where = f" ({_printable(str(exc.filename))})" if exc.filename else ""
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
    except (typer.Exit, typer.Abort, typer.TyperException):  # Typer's own (usage errors too): Typer answers them
        raise
    except SystemExit as exc:  # the audit could not run to its end: exit 2, never the caller's own code
        _report_exit_call(exc)
        return int(ExitCode.USAGE)
    except ModuleNotFoundError as exc:  # a dependency missing from this Python: how to install it, not a bug
        _report_missing_module(exc)
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
    handled = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in handled}

    def on_term(signum: int, frame: object) -> None:
        lifecycle.note_signal(signum)  # kept even where the raise below is swallowed (a weakref callback)
        raise Interrupted(ExitCode(128 + signum))

    unraisable = sys.unraisablehook

    def quiet_unraisable(u: Any) -> None:  # the signal raised inside a weakref callback: noted, exit follows
        if not isinstance(u.exc_value, (Interrupted, KeyboardInterrupt)):
            unraisable(u)

    sys.unraisablehook = quiet_unraisable
    try:
        try:
            for signum in handled:
                signal.signal(signum, on_term)
        except ValueError:  # not the main thread: keep the default handlers
            previous = {}
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)
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
    from nrc_audit.io.validate import parse_json  # depth-limited: a 10⁵-deep value is a message, not a crash

    value = parse_json(text, f"--model-kwargs {text[:40]!r}{'…' if len(text) > 40 else ''}")
    if not isinstance(value, dict):
        raise OptionsError("--model-kwargs must be a JSON object, e.g. '{\"width\": 64}'.")
    return value


