"""The installed console script under the stream states a shell gives it: a reader that leaves early, closed
stdout or stderr, an ASCII-only stdout. Every file output is written as asked; the exit code is the audit's own
(0/1), or 141 (as for a broken pipe) when the product could not reach stdout; never 2, never "internal error".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _console import bash, console_script, sample_args
from conftest import SAMPLES

BROKEN_PIPE = 141


def audit(*extra: str, sample: str = "mlp_wd") -> str:
    args = sample_args("--no-features", "--json", "r.json", *extra)
    return args.replace("mlp_wd.safetensors", f"{sample}.safetensors")


def assert_report_written(folder: Path, passed: bool = True) -> None:
    doc = json.loads((folder / "r.json").read_text())  # the whole report, nothing else in the file
    assert doc["summary"]["gate"]["passed"] is passed


def assert_no_false_alarm(stderr: str) -> None:
    assert "internal error" not in stderr and "Traceback" not in stderr and "no report was written" not in stderr


def test_reader_that_takes_one_line(tmp_path):
    """``| head -1`` on a failed gate: the reader may leave before the last line is written (then 141) or after
    (then the audit's own 1); never 2."""
    result = bash(f"{audit(sample='mlp_nowd')} | head -1; echo \"rc=${{PIPESTATUS[0]}}\"", tmp_path)
    first, rc = result.stdout.splitlines()
    assert "Deep NRC audit" in first
    assert rc in ("rc=1", f"rc={BROKEN_PIPE}"), result.stderr
    assert_report_written(tmp_path, passed=False)
    assert_no_false_alarm(result.stderr)


def test_reader_gone_before_the_product(tmp_path):
    """``| true``: the reader has left long before the table is printed: the product was not delivered."""
    result = bash(f"{audit()} | true; echo \"rc=${{PIPESTATUS[0]}}\"", tmp_path)
    assert result.stdout.strip() == f"rc={BROKEN_PIPE}", result.stderr
    assert_report_written(tmp_path)
    assert_no_false_alarm(result.stderr)
    assert result.stderr.strip() == ""  # a reader that leaves is no error to report, as for any filter


def test_pager_quit_early(tmp_path):
    """``| less``, quit after the first screen: a reader that shows the start of the JSON, then closes the pipe
    while the rest may still be coming."""
    reader = "{ head -c 10; exec 0<&-; sleep 1; }"
    result = bash(f"{audit('--format', 'json')} | {reader}; echo; echo \"rc=${{PIPESTATUS[0]}}\"", tmp_path)
    assert result.stdout.startswith("{")
    assert result.stdout.splitlines()[-1] in ("rc=0", f"rc={BROKEN_PIPE}"), result.stderr
    assert_report_written(tmp_path)
    assert_no_false_alarm(result.stderr)


def test_stdout_closed(tmp_path):
    result = bash(f"{audit()} >&-", tmp_path)
    assert result.returncode == BROKEN_PIPE, result.stderr
    assert "stdout is closed" in result.stderr
    assert_report_written(tmp_path)  # and no stray bytes in it: descriptor 1 was not handed to the report
    assert_no_false_alarm(result.stderr)


def test_stdout_closed_keeps_an_input_error(tmp_path):
    result = bash(f"'{console_script()}' missing.safetensors '{SAMPLES / 'data.h5'}' >&-", tmp_path)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr


@pytest.mark.parametrize("redirect", ["2>&-", "2> >(true)"], ids=["stderr-closed", "stderr-reader-gone"])
def test_stderr_lost(tmp_path, redirect):
    """Only diagnostics are lost: the exit code is the audit's own, the table and the report are complete."""
    result = bash(f"{audit()} {redirect}", tmp_path)  # progress bar and notes on: stderr is written to
    assert result.returncode == 0, result.stdout
    assert "Deep NRC audit" in result.stdout and "gate: PASSED" in result.stdout
    assert_report_written(tmp_path)


@pytest.mark.parametrize("env, sample, code", [({"PYTHONIOENCODING": "ascii"}, "mlp_wd", 0),
                                               ({"LC_ALL": "C", "PYTHONUTF8": "0"}, "mlp_nowd", 1)],
                         ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])  # fmt: skip
def test_ascii_stdout_gets_an_ascii_table(tmp_path, env, sample, code):
    result = bash(audit("-q", sample=sample), tmp_path, {"PYTHONIOENCODING": "", "LC_ALL": "", **env})
    assert result.returncode == code, result.stderr
    assert result.stdout.isascii() and "?" not in result.stdout, result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("--+--") for line in lines) and "| summary |" not in result.stdout
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 6 and len({len(line) for line in rows}) == 1  # the columns stay aligned
    verdicts = [line.split("|")[-1].split()[0] for line in rows]
    assert verdicts[-1] == ("ok" if code == 0 else "no") and set(verdicts) <= {"ok", "no"}
    assert "<=" in result.stdout and ">=" in result.stdout
    assert_report_written(tmp_path, passed=code == 0)
    assert_no_false_alarm(result.stderr)


def test_help_and_version_without_a_reader(tmp_path):
    exe = console_script()
    result = bash(f"'{exe}' --help | true; echo \"rc=${{PIPESTATUS[0]}}\"", tmp_path)
    assert result.stdout.strip() in ("rc=0", f"rc={BROKEN_PIPE}") and result.stderr.strip() == "", result.stderr
    result = bash(f"'{exe}' --version >&-", tmp_path)
    assert result.returncode == BROKEN_PIPE and "stdout is closed" in result.stderr, result.stderr
    assert_no_false_alarm(result.stderr)
