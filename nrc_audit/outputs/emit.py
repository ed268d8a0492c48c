"""Everything an audit writes after the report exists: files (atomic), stdout, the baseline verdict, the exit code."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nrc_audit.outputs.baseline import Regression, compare, load_baseline
from nrc_audit.errors import ExitCode, OptionsError
from nrc_audit.io.files import check_output_paths, write_atomic, write_with
from nrc_audit.outputs.report import Report


@dataclass(frozen=True)
class Outputs:
    """Where the product goes. ``fmt``: "table" or "json" on stdout; the paths are optional files."""

    fmt: str = "table"
    json_path: Path | None = None
    markdown_path: Path | None = None
    model_index_path: Path | None = None
    plot_path: Path | None = None
    baseline_path: Path | None = None
    baseline_tolerance: float = 0.05
    exit_zero: bool = False
    is_main: bool = True  # False on torchrun ranks other than 0: they write and print nothing

    def paths(self) -> dict[str, Path | None]:
        """Option name → output file (None: not requested)."""
        return {"--json": self.json_path, "--markdown": self.markdown_path, "--model-index": self.model_index_path,
                "--plot": self.plot_path}  # fmt: skip

    def check_before_run(self, inputs: Mapping[str, Path | None] | None = None,
                         more_outputs: Mapping[str, Path | None] | None = None) -> None:  # fmt: skip
        """Fail before the (long) pass on what can be known now: missing folders, matplotlib, the baseline,
        and an output that is an input or another output (``inputs``: label → path; ``more_outputs``: option
        → path, e.g. the feature store). The baseline is always an input."""
        outputs = {**self.paths(), **(more_outputs or {})}
        check_output_paths(outputs, {"the baseline": self.baseline_path, **(inputs or {})})
        for option, path in outputs.items():
            if path is not None and not path.resolve().parent.is_dir():
                raise OptionsError(
                    f"{option} {path}: the folder {path.resolve().parent} does not exist; create it or choose another path."
                )
        if self.plot_path is not None:
            from nrc_audit.outputs.plot import _pyplot

            _pyplot()
        if self.baseline_path is not None:
            load_baseline(self.baseline_path)


def _write_plot(report: Report, path: Path) -> None:
    from nrc_audit.outputs.plot import plot_report

    write_with(path, lambda tmp: plot_report(report, tmp), suffix=path.suffix or ".png")


def baseline_table(regressions: list[Regression], report: Report, baseline: Report) -> Table:
    """Per-layer deltas against the baseline, regressions in red."""
    table = Table(title=f"against baseline (onset {baseline.summary.collapse_onset} → {report.summary.collapse_onset})")
    for col in ("#", "layer", "Δ NRC1", "Δ NRC2", "Δ NRC3", "Δ NRC4 ratio", "collapsed"):
        table.add_column(col, justify="right" if col.startswith(("#", "Δ")) else "left")
    bad = {(r.layer, key) for r in regressions for key in ("nrc1", "nrc2", "nrc3", "nrc4_ratio") if key in r.what}
    for old, new in zip(baseline.layers, report.layers):
        cells = []
        for key in ("nrc1", "nrc2", "nrc3", "nrc4_ratio"):
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
                      exit_zero=out.exit_zero)  # fmt: skip
    regressions: list[Regression] = []
    baseline = None
    if out.baseline_path is not None:
        baseline = load_baseline(out.baseline_path)
        regressions = compare(report, baseline, out.baseline_tolerance)
        report.extensions["baseline"] = {
            "path": str(out.baseline_path), "tolerance": out.baseline_tolerance, "passed": not regressions,
            "regressions": [{"layer": r.layer, "name": r.name, "what": r.what} for r in regressions],
        }  # fmt: skip
    text = report.to_json()
    if out.json_path is not None:
        write_atomic(out.json_path, text)
    if out.markdown_path is not None:
        from nrc_audit.outputs.markdown import to_markdown

        write_atomic(out.markdown_path, to_markdown(report))
    if out.model_index_path is not None:
        from nrc_audit.outputs.markdown import to_model_index

        write_atomic(out.model_index_path, to_model_index(report))
    if out.plot_path is not None:
        _write_plot(report, out.plot_path)
    if out.fmt == "json":
        sys.stdout.write(text)
    elif out.fmt == "table":
        from nrc_audit.outputs.render import print_report

        console = Console(width=None if sys.stdout.isatty() else 120)  # logs and pipes: no 80-column squeeze
        print_report(report, console)
        if baseline is not None:
            console.print(baseline_table(regressions, report, baseline))
            for r in regressions:
                console.print(Text(f"regression: layer {r.layer} ({r.name}): {r.what}" if r.layer is not None
                                   else f"regression: {r.what}", style="bold red"))  # fmt: skip
    failed = not report.summary.gate.passed or bool(regressions)
    return ExitCode.GATE_FAILED if failed and not out.exit_zero else ExitCode.OK
