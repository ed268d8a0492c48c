"""Everything an audit writes after the report exists: files (atomic), stdout, the baseline verdict, the exit code."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

from rich.table import Table
from rich.text import Text

from nrc_audit.core.verdicts import TABLE, exit_code
from nrc_audit.outputs import charset
from nrc_audit.outputs.baseline import Regression, compare, load_baseline
from nrc_audit.config import BaselineOptions
from nrc_audit.errors import ExitCode, NrcAuditError, OptionsError
from nrc_audit.io.files import all_or_nothing, check_output_paths, check_writable_folder, write_atomic, write_with
from nrc_audit.outputs.model_card import HubCard
from nrc_audit.outputs.report import Report


@dataclass(frozen=True)
class Outputs:
    """Where the product goes. ``fmt``: "table", "json" or "github" (workflow commands) on stdout; the paths
    are optional files; ``card`` holds the Hub fields for ``--model-index`` and ``--model-card``."""

    fmt: str = "table"
    json_path: Path | None = None
    markdown_path: Path | None = None
    model_index_path: Path | None = None
    plot_path: Path | None = None
    baseline_path: Path | None = None
    baseline_tolerance: float = BaselineOptions.baseline_tolerance
    exit_zero: bool = False
    is_main: bool = True  # False on torchrun ranks other than 0: they write and print nothing
    junit_path: Path | None = None
    model_card_path: Path | None = None
    card: HubCard = field(default_factory=HubCard)

    def with_tolerance(self, tolerance: float) -> "Outputs":
        return replace(self, baseline_tolerance=tolerance)

    def paths(self) -> dict[str, Path | None]:
        """Option name → output file (None: not requested)."""
        return {"--json": self.json_path, "--markdown": self.markdown_path, "--model-index": self.model_index_path,
                "--plot": self.plot_path, "--junit-xml": self.junit_path,
                "--model-card": self.model_card_path}  # fmt: skip

    def check_paths(self, inputs: Mapping[str, Path | None] | None = None,
                    more_outputs: Mapping[str, Path | None] | None = None) -> "SafeOutputs":  # fmt: skip
        """Refuse an output that is an input or another output (``inputs``: label → path; ``more_outputs``:
        option → path, e.g. the feature store), and return these outputs as :class:`SafeOutputs`: only those
        may receive the could-not-run files (:func:`emit_failure`). The baseline is always an input; a
        --model-card is read and rewritten, so it is an output only."""
        outputs = {**self.paths(), **(more_outputs or {})}
        check_output_paths(outputs, {"the baseline": self.baseline_path, **(inputs or {})})
        return SafeOutputs(self, outputs)


@dataclass(frozen=True)
class SafeOutputs:
    """Outputs whose paths :meth:`Outputs.check_paths` found to be no input and no other output.

    ``paths``: every output file of the run (option → path), the ``more_outputs`` such as the store included.
    """

    outputs: Outputs
    paths: Mapping[str, Path | None]

    def check_before_run(self) -> None:
        """Fail before the (long) pass on what else can be known now: missing or unwritable folders,
        matplotlib, the baseline, a model-index without a dataset id, an existing card that cannot be merged
        into. A failure here still leaves the could-not-run files: the paths are known to be safe."""
        out = self.outputs
        for option, path in self.paths.items():
            if path is not None and not path.resolve().parent.is_dir():
                raise OptionsError(
                    f"{option} {path}: the folder {path.resolve().parent} does not exist; create it or choose another path."
                )
            if path is not None:
                check_writable_folder(option, path)
        if out.plot_path is not None:
            from nrc_audit.outputs.plot import _pyplot

            _pyplot()
        if out.baseline_path is not None:
            load_baseline(out.baseline_path)
        if out.model_index_path is not None and not out.card.dataset_id:
            raise OptionsError("--model-index needs --dataset-id: the Hub requires a dataset id on every result "
                               "(e.g. --dataset-id user/my-data); the local HDF5 file is no Hub dataset.")  # fmt: skip
        if out.model_card_path is not None:
            from nrc_audit.outputs.model_card import check_card

            check_card(out.model_card_path, out.card.dataset_id)


def _write_plot(report: Report, path: Path) -> None:
    from nrc_audit.outputs.plot import plot_report

    write_with(path, lambda tmp: plot_report(report, tmp), suffix=path.suffix or ".png")


def baseline_table(regressions: list[Regression], report: Report, baseline: Report) -> Table:
    """Per-layer deltas against the baseline, regressions in red."""
    table = Table(title=f"against baseline (onset {baseline.summary.collapse_onset} → {report.summary.collapse_onset})")
    compared = [c for c in TABLE if c.baseline]
    for col in ("#", "layer", *(f"Δ {c.column}" for c in compared), "collapsed"):
        table.add_column(col, justify="right" if col.startswith(("#", "Δ")) else "left")
    bad = {(r.layer, r.metric) for r in regressions if r.metric is not None}
    for old, new in zip(baseline.layers, report.layers):
        cells = []
        for key in (c.field for c in compared):
            a, b = getattr(old, key), getattr(new, key)
            text = "—" if a is None or b is None else f"{b - a:+.3f}"
            cells.append(Text(text, style="bold red" if (new.index, key) in bad else ""))
        flag = f"{'yes' if old.collapsed else 'no'} → {'yes' if new.collapsed else 'no'}"
        cells.append(Text(flag, style="bold red" if old.collapsed and not new.collapsed else ""))
        table.add_row(str(new.index), new.name, *cells)
    return table


def emit(report: Report, out: Outputs) -> ExitCode:
    """Compare with the baseline, write every requested file, print the product; return the exit code.

    Under torchrun only rank 0 writes and prints; the other ranks return the same exit code silently.
    """
    if not out.is_main:
        out = Outputs(fmt="none", baseline_path=out.baseline_path, baseline_tolerance=out.baseline_tolerance,
                      exit_zero=out.exit_zero, card=out.card)  # fmt: skip
    regressions: list[Regression] = []
    baseline = None
    if out.baseline_path is not None:
        baseline = load_baseline(out.baseline_path)
        regressions = compare(report, baseline, out.baseline_tolerance)
        report.extensions["baseline"] = {
            "path": str(out.baseline_path), "tolerance": out.baseline_tolerance, "passed": not regressions,
            "regressions": [{"layer": r.layer, "name": r.name, "what": r.what, "metric": r.metric}
                            for r in regressions],
        }  # fmt: skip
    text = report.to_json()
    with all_or_nothing():  # every file staged in full before any is renamed into place (io/files.py)
        _write_files(report, out, text, regressions)
    return _print_product(report, out, text, regressions, baseline)


def _write_files(report: Report, out: Outputs, text: str, regressions: list[Regression]) -> None:
    if out.json_path is not None:
        write_atomic(out.json_path, text)
    if out.markdown_path is not None:
        from nrc_audit.outputs.markdown import to_markdown

        write_atomic(out.markdown_path, to_markdown(report))
    if out.model_index_path is not None:
        from nrc_audit.outputs.model_card import to_model_index

        write_atomic(out.model_index_path, to_model_index(report, out.card))
    if out.model_card_path is not None:
        _write_card(out.model_card_path, report, out)
    if out.junit_path is not None:
        from nrc_audit.outputs.ci import junit_xml

        write_atomic(out.junit_path, junit_xml(report, regressions, out.card.model_name))
    if out.plot_path is not None:
        _write_plot(report, out.plot_path)



def _print_product(report: Report, out: Outputs, text: str, regressions: list[Regression],
                   baseline: Report | None) -> ExitCode:  # fmt: skip
    if out.fmt == "json":
        sys.stdout.write(text)
    elif out.fmt == "github":
        from nrc_audit.outputs.ci import github_annotations

        sys.stdout.write("".join(line + "\n" for line in github_annotations(report, regressions)))
    elif out.fmt == "table":
        from nrc_audit.outputs.render import print_report

        console = charset.console(width=None if sys.stdout.isatty() else 120)  # logs and pipes: no 80-column squeeze
        print_report(report, console)
        if baseline is not None:
            console.print(baseline_table(regressions, report, baseline))
            for r in regressions:
                console.print(Text(f"regression: layer {r.layer} ({r.name}): {r.what}" if r.layer is not None
                                   else f"regression: {r.what}", style="bold red"))  # fmt: skip
    if out.is_main:
        print_warnings(report)
    return exit_code(report.summary.gate.passed, len(regressions), out.exit_zero)


def print_warnings(report: Report) -> None:
    """The report-level warnings on stderr (they never change the exit code)."""
    console = charset.console(stderr=True, width=None if sys.stderr.isatty() else 120)
    for w in report.warnings:
        console.print(Text(f"warning: {w}", style="bold yellow"), soft_wrap=True)


def _write_card(path: Path, report: Report, out: Outputs) -> None:
    from nrc_audit.outputs.model_card import merge_model_card

    existing = path.read_bytes().decode("utf-8") if path.exists() else ""  # bytes: CRLF stays CRLF
    write_atomic(path, merge_model_card(existing, report, out.card, where=path))


def emit_failure(target: Outputs | SafeOutputs, message: str) -> None:
    """An audit that could not run (exit 2) still leaves what CI reads next: the markdown section says so
    (replacing an earlier one: a stale verdict in a job summary would mislead), the JUnit file holds one
    testcase in error, ``--format github`` prints an ``::error``. No JSON report, figure or model-index is
    written, and a ``--model-card`` is left as it was: a published card keeps its last real audit.

    Files are written only for :class:`SafeOutputs`: before :meth:`Outputs.check_paths` has passed, the
    failure may be that an output path is an input, so plain :class:`Outputs` get the ``::error`` line only."""
    from nrc_audit.outputs.ci import github_failure, junit_failure
    from nrc_audit.outputs.markdown import failure_markdown

    out = target.outputs if isinstance(target, SafeOutputs) else target
    if not out.is_main:
        return
    if out.fmt == "github":
        sys.stdout.write(github_failure(message) + "\n")
    if not isinstance(target, SafeOutputs):
        return
    section = failure_markdown(message)
    writers = [(out.markdown_path, lambda p: write_atomic(p, section, now=True)),
               (out.junit_path, lambda p: write_atomic(p, junit_failure(message, out.card.model_name or "nrc-audit"),
                                                       now=True))]
    for path, write in writers:  # fmt: skip
        if path is None or not path.resolve().parent.is_dir():
            continue
        try:
            write(path)
        except (OSError, NrcAuditError):  # the original error is what the user must see; this one is secondary
            pass


@contextmanager
def failure_reports(target: Outputs | SafeOutputs) -> Iterator[None]:
    """Run the audit; on a package error (exit 2) write the could-not-run outputs (:func:`emit_failure`:
    files only for ``SafeOutputs``), then re-raise."""
    try:
        yield
    except NrcAuditError as exc:
        if exc.exit_code == ExitCode.USAGE:
            emit_failure(target, str(exc))
        raise
    except OSError as exc:  # unreadable input or unwritable output: exit 2 as well (cli.common.guarded)
        emit_failure(target, f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc))
        raise
