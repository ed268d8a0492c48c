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
  block device, a socket) is refused.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Mapping

from nrc_audit.errors import OptionsError


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


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path``: atomically for files (see the module docstring), directly for streams."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    write_with(path, lambda tmp: tmp.write_bytes(data))


def write_with(path: os.PathLike | str, produce: Callable[[Path], object], suffix: str = ".tmp") -> None:
    """Let ``produce(tmp)`` write a temporary file, then put it at ``path`` (rename, or copy into a stream).

    For a regular file (or a symlink to one, or a new name) the temporary file sits next to the resolved
    target and is renamed over it; for a character device or FIFO its bytes are written into the stream.
    The temporary file (named ``.NAME.XXXX`` + ``suffix``; matplotlib picks the format from it) is removed
    on every path.
    """
    path = Path(path)
    stream = is_stream(path)
    real, existing = (path, None) if stream else replace_target(path)
    folder = Path(tempfile.gettempdir()) if stream else real.parent
    fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=suffix, dir=folder)
    tmp = Path(name)
    try:
        os.fchmod(fd, new_file_mode(existing))  # mkstemp creates 0600; the result must honour the umask
        os.close(fd)
        produce(tmp)
        if stream:
            with open(path, "wb") as fh:  # /dev/null, /dev/stdout, a FIFO: no rename, no chmod
                fh.write(tmp.read_bytes())
        else:
            os.replace(tmp, real)
    finally:
        tmp.unlink(missing_ok=True)
