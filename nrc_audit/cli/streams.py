"""The standard streams as the entry point finds them: closed descriptors, readers that leave early, and
encodings that cannot show the table.

The product (table or JSON) goes to stdout, diagnostics to stderr. Neither may turn a finished audit into an
error: every file output is written before the product is printed, and a failed write to a standard stream
never raises into the command. The exit code then says whether the product was delivered:

- the audit's own code (0 passed, 1 gate failed) when the whole product reached stdout;
- ``BROKEN_PIPE`` (141 = 128 + SIGPIPE) when it could not be: its reader left early (``| head -1``, ``less``
  quit before the end), or stdout is closed (``>&-``) or unwritable. 141 is what a shell reports for any
  filter stopped by a broken pipe (``yes | head -1`` under ``set -o pipefail``), and it differs from 1 (a
  failed gate) and 2 (unusable input): neither would be true. Python's advice for SIGPIPE is the same
  (route stdout to /dev/null and exit non-zero, https://docs.python.org/3/library/signal.html#note-on-sigpipe);
  its exit 1 is nrc-audit's gate code, hence 141. Exit codes 2, 130 and 143 are kept as they are.

A closed stderr, or a stderr whose reader left, loses only diagnostics: the exit code stays the audit's own.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any, TextIO

BROKEN_PIPE = 141  # 128 + SIGPIPE: the product did not reach stdout's reader


class GuardedStream(io.TextIOBase):
    """A standard stream whose failed writes are recorded instead of raised. After the first failure the
    descriptor is pointed at /dev/null, so that later writes and the interpreter's final flush succeed
    silently. Attributes Rich reads (encoding, isatty, fileno) come from the wrapped stream."""

    def __init__(self, stream: TextIO, fd: int, closed: bool = False) -> None:
        super().__init__()
        self.stream, self.fd = stream, fd
        self.failure: OSError | None = OSError(errno.EBADF, "closed") if closed else None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    def isatty(self) -> bool:
        return self.failure is None and self.stream.isatty()

    def fileno(self) -> int:
        return self.fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:  # type: ignore[override]
        if self.failure is None:
            try:
                self.stream.write(text)
            except OSError as exc:
                self._lose(exc)
        return len(text)

    def flush(self) -> None:
        if self.failure is None:
            try:
                self.stream.flush()
            except OSError as exc:
                self._lose(exc)

    def _lose(self, exc: OSError) -> None:
        self.failure = exc
        _point_at_devnull(self.fd)
        try:  # what is still buffered now goes to /dev/null instead of raising at exit
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # buffer, line_buffering, …: the wrapped stream's
        return getattr(self.stream, name)


def _point_at_devnull(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def guard() -> None:
    """Make the standard streams safe to use for the rest of the process. A closed descriptor 0, 1 or 2 gets
    /dev/null first: else the next file opened (a report, the feature store) would take its number, and a
    C library's message to stderr would land inside that file. stdout and stderr become GuardedStreams; an
    encoding that cannot show a character (ASCII, the C locale) writes '?' for it instead of raising."""
    closed = [fd for fd in (0, 1, 2) if not _is_open(fd)]
    for fd in closed:  # lowest first, so each open lands on the number it replaces
        _point_at_devnull(fd)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if isinstance(stream, GuardedStream):
            continue
        if stream is None or fd in closed:
            stream = open(fd, "w", encoding="utf-8", closefd=False)
        elif not (stream.encoding or "utf-8").lower().replace("-", "").startswith("utf") and isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
        setattr(sys, name, GuardedStream(stream, fd, closed=fd in closed))


def final_code(code: int) -> int:
    """The process's exit code once the command returned ``code``: 0 and 1 become BROKEN_PIPE when the product
    did not reach stdout (a closed stdout is named on stderr; a reader that left is not, as for any filter)."""
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if not isinstance(out, GuardedStream) or out.failure is None or code not in (0, 1):
        return code
    if not isinstance(out.failure, BrokenPipeError):
        what = "is closed" if out.failure.errno == errno.EBADF else f"failed ({out.failure.strerror or out.failure})"
        print(f"error: stdout {what}, so the table (or JSON) was not printed in full; exit {BROKEN_PIPE}, as for "
              "a broken pipe.", file=err)  # fmt: skip
        err.flush()
    return BROKEN_PIPE
