"""Output paths: checked against the run's inputs before anything is written, then written atomically.

Rules (docs/reliability.md, "Inputs are sacred"):

- every output path is resolved (symlinks followed) before the pass; one that is the same file as an input
  (checkpoint, data, baseline, settings file, ``--model-def`` file) or as another output of the run is
  refused with exit 2. "Same file" means the same resolved path or, for files that exist, the same inode
  (hard links count);
- a symlink is written through: its target is replaced, the link stays;
- a regular file is replaced atomically (temporary file in the target's folder, then a rename); it keeps
  the replaced file's permission bits, and a new file gets ``0666 & ~umask`` (0644 under umask 022);
- a character device or a FIFO (``/dev/null``, ``/dev/stdout``, ``/dev/fd/N`` from a shell's ``>(…)``) is
  never replaced: it is opened and written directly. Anything else that is not a regular file (a folder, a
  block device, a socket) is refused;
- all or nothing: inside :func:`all_or_nothing` (the CLI opens one around a whole command) every output is
  first written in full to its temporary file, and the renames run only once every output (the feature
  store included) is staged; if anything fails first, every temporary file is removed and every earlier
  output stays byte-identical.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

from nrc_audit.errors import OptionsError
from nrc_audit.io import lifecycle

Action = Callable[[], None]
T = TypeVar("T")
_groups: list[list[tuple[Action, Action]]] = []  # open all-or-nothing groups, innermost last: (publish, abort)


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Collect the outputs staged inside; publish them together on success, drop them all on any exception.

    A group nested in another hands its outputs to the outer one, which alone publishes."""
    group: list[tuple[Action, Action]] = []
    _groups.append(group)
    try:
        yield
    except BaseException:
        _groups.remove(group)
        _run_all(abort for _, abort in group)
        raise
    _groups.remove(group)
    if _groups:
        _groups[-1].extend(group)
        return
    for k, (publish, _) in enumerate(group):
        try:
            publish()
        except BaseException:
            _run_all(abort for _, abort in group[k + 1:])
            raise


def published_together(body: Callable[[], T]) -> Callable[[], T]:
    """``body`` run inside one :func:`all_or_nothing` group (a command's whole run: the store and every file)."""

    def run() -> T:
        with all_or_nothing():
            return body()

    return run


def _run_all(actions: Iterator[Action]) -> None:
    for action in actions:
        try:
            action()
        except Exception:  # cleaning up after a failure: the first failure is what the user must see
            pass


def on_commit(publish: Action, abort: Action) -> None:
    """``publish`` now, or when the open all-or-nothing group succeeds (``abort`` when it fails)."""
    if _groups:
        _groups[-1].append((publish, abort))
    else:
        publish()


def current_umask() -> int:
    """The process umask (read without changing it where /proc tells it; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_stream(mode: int) -> bool:
    """Written directly, never replaced: character devices (/dev/null, a tty) and FIFOs / pipes."""
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _identity(path: Path) -> tuple[str, tuple[int, int] | None, int | None]:
    """(resolved path, (device, inode) or None, st_mode or None) of ``path``."""
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError:
        return real, None, None
    return real, (st.st_dev, st.st_ino), st.st_mode


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def check_output_paths(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """Refuse (OptionsError, exit 2) an output that is an input, another output, or an unwritable kind of file.

    Args:
        outputs: option name → output path (None: not requested), e.g. {"--json": Path("r.json")}.
        inputs: description → input path, e.g. {"the checkpoint": Path("m.safetensors")}.
    """
    for label, p in [*inputs.items(), *outputs.items()]:
        if p is not None:
            _require_utf8(label, p)
    ins = {label: _identity(p) for label, p in inputs.items() if p is not None}
    seen: dict[str, tuple] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        ident = _identity(path)
        mode = ident[2]
        if mode is not None and not stat.S_ISREG(mode) and not _is_stream(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file, a character device or a FIFO"
            raise OptionsError(f"{option} {path} is {kind}; pass the path of a file to write.")
        for label, other in ins.items():
            if _same(ident, other):
                raise OptionsError(
                    f"{option} {path} is the same file as {label} ({inputs[label]}); writing it would destroy "
                    "that input. Choose another output path."
                )
        stream = mode is not None and _is_stream(mode)  # /dev/null for two outputs is harmless
        for other_option, other in seen.items():
            if not stream and _same(ident, other):
                raise OptionsError(
                    f"{option} {path} and {other_option} {outputs[other_option]} are the same file; one output "
                    "would overwrite the other. Give each output its own path."
                )
        seen[option] = ident


def _require_utf8(label: str, path: Path) -> None:
    """Paths go into the UTF-8 JSON report and the store: one whose bytes are not UTF-8 is refused by name."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise OptionsError(f"{label} {shown}: the path is not valid UTF-8, and the report records paths as UTF-8 "
                           "text. Rename the file (or its folder) to a UTF-8 name.") from None


def replace_target(path: Path) -> tuple[Path, int | None]:
    """Where an atomic replacement of ``path`` goes, and the permission bits it must get.

    Returns (the symlink-resolved path, the existing file's mode bits, or None for a new file). Raises
    OSError for a path that is not a regular file (callers write streams directly, see :func:`write_atomic`).
    """
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real, None
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(21, "not a regular file", str(path))
    return real, stat.S_IMODE(st.st_mode)


def new_file_mode(existing: int | None) -> int:
    """The mode a replacement gets: the replaced file's, else what ``open()`` would give (0666 & ~umask)."""
    return existing if existing is not None else 0o666 & ~current_umask()


def is_stream(path: Path) -> bool:
    """Whether ``path`` exists and is a character device or FIFO (written directly, not replaced)."""
    try:
        return _is_stream(os.stat(path).st_mode)
    except OSError:
        return False


def write_atomic(path: Path, text: str | bytes, now: bool = False) -> None:
    """Write ``text`` to ``path``: atomically for files (see the module docstring), directly for streams;
    ``now``: published at once even inside an all-or-nothing group."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    write_with(path, lambda tmp: tmp.write_bytes(data), now=now)


def write_with(path: os.PathLike | str, produce: Callable[[Path], object], suffix: str = ".tmp",
               now: bool = False) -> None:  # fmt: skip
    """Let ``produce(tmp)`` write a temporary file, then put it at ``path`` (rename, or copy into a stream)
    — at once, or when the open :func:`all_or_nothing` group succeeds.

    For a regular file (or a symlink to one, or a new name) the temporary file sits next to the resolved
    target and is renamed over it; for a character device or FIFO its bytes are written into the stream.
    The temporary file (named ``.NAME.XXXX`` + ``suffix``; matplotlib picks the format from it) is removed
    on every path, also by the watchdog's hard exit.
    """
    path = Path(path)
    stream = is_stream(path)
    real, existing = (path, None) if stream else replace_target(path)
    folder = Path(tempfile.gettempdir()) if stream else real.parent
    fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=suffix, dir=folder)
    tmp = Path(name)
    lifecycle.track(tmp)
    try:
        os.fchmod(fd, new_file_mode(existing))  # mkstemp creates 0600; the result must honour the umask
    finally:
        os.close(fd)

    def drop() -> None:
        tmp.unlink(missing_ok=True)
        lifecycle.untrack(tmp)

    def publish() -> None:
        try:
            if stream:
                with open(path, "wb") as fh:  # /dev/null, /dev/stdout, a FIFO: no rename, no chmod
                    fh.write(tmp.read_bytes())
            else:
                os.replace(tmp, real)
        finally:
            drop()

    try:
        produce(tmp)
    except BaseException:
        drop()
        raise
    if now:
        publish()
    else:
        on_commit(publish, drop)


def check_writable_folder(option: str, path: Path) -> None:
    """Refuse, before the pass, an output whose folder cannot take a new file (read-only mount, no write
    permission): the rename that puts a finished output in place needs one there."""
    if is_stream(path):
        return
    folder = Path(os.path.realpath(path)).parent
    if os.access(folder, os.W_OK | os.X_OK):
        return
    hint = (" Pass --features PATH in a writable folder, or --no-features." if option == "--features"
            else " Choose a path in a writable folder.")  # fmt: skip
    raise OptionsError(f"{option} {path}: the folder {folder} is not writable (read-only or no permission), so "
                       f"the output cannot be put there.{hint}")  # fmt: skip
