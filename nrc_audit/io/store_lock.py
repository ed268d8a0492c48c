"""Who may write a feature store, and where its incomplete file lives.

A store at ``DIR/NAME`` is written as ``DIR/.NAME.partial`` (the resolved target's own folder) while its
writer holds an exclusive ``flock`` on ``DIR/.NAME.lock``. The lock file is opened with ``O_NOFOLLOW`` and
must be a regular file; the partial file is only ever created fresh with ``O_CREAT | O_EXCL`` (HDF5's
"x" mode), which refuses to follow a symlink, so a planted ``.NAME.partial`` link to the checkpoint (or
anything else) is removed as a link and never written through.

The kernel drops a flock when its holder dies (SIGKILL included), so the lock tells a live run from a
dead one: a partial file whose lock nobody holds is stale and is deleted by the next run on that store,
also one that writes no store (:func:`clean_stale`). A partial file whose lock is held belongs to a live
run and is never touched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

from nrc_audit.errors import FeatureStoreError
from nrc_audit.io import lifecycle

_OPEN_TRIES = 8  # a lock file removed by its previous owner between our open and our flock: try again


def default_store_path(model: Path, folder: Path | None = None) -> Path:
    """Where a store goes without ``--features``: ``STEM-HASH8.features.h5`` in ``folder`` (default: the
    current one), HASH8 the first 8 hex digits of the SHA-256 of the model's resolved path.

    Two models with one file name in different folders get different stores (and different locks); a rerun
    on the same model replaces its own store. When the folder is a model folder (``nrc-audit . data.h5`` in a
    save_pretrained folder) or inside one, the store goes beside that folder instead: the folder's hash (the
    report's ``model.sha256``) covers every file in it, so a store there would change it on every run.
    """
    real = Path(os.path.realpath(model))
    name = real.name if real.is_dir() else real.stem
    tag = hashlib.sha256(os.fsencode(real)).hexdigest()[:8]
    here = Path(os.path.realpath(folder if folder is not None else Path.cwd()))
    stem = f"{name or 'model'}-{tag}.features.h5"
    if real.is_dir() and (here == real or real in here.parents):
        return real.parent / stem
    return Path(stem) if folder is None else here / stem


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


def _open_lock(lock: Path, shown: Path) -> int:
    """Open (creating) the lock file without following a symlink; a planted link is removed, not followed."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(2):
        try:
            fd = os.open(lock, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink stands where the lock goes: it is no lock of ours
                lock.unlink(missing_ok=True)
                continue
            raise FeatureStoreError(f"cannot create the feature store {shown}: {exc.strerror} ({lock}). Pass "
                                    "--features PATH in a writable folder, or --no-features.") from None  # fmt: skip
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        break
    raise FeatureStoreError(f"cannot lock the feature store {shown}: {lock} is not a regular file; remove it.")


def _names_fd(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) is still the file open as ``fd``."""
    try:
        a, b = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _clear_partial(partial: Path, shown: Path) -> None:
    """Remove what stands where the partial file goes (a stale file or a planted link; never a folder)."""
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise FeatureStoreError(f"cannot create the feature store {shown}: a folder {partial} stands where its "
                                "partial file goes; remove it or pass another --features path.")  # fmt: skip
    partial.unlink(missing_ok=True)  # a symlink: the link goes, whatever it points to stays


class StoreLock:
    """The exclusive right to write the store at ``final`` (the resolved path); ``shown``: the path as given.

    On success the partial path is free (a stale file or link removed) and tracked for removal on a hard
    exit. Raises FeatureStoreError when another live run holds the lock.
    """

    def __init__(self, final: Path, shown: Path) -> None:
        self.final, self.partial, self.lock = final, partial_path(final), lock_path(final)
        self._fd: int | None = None
        if fcntl is not None:
            self._fd = self._acquire(shown)
        try:
            _clear_partial(self.partial, shown)
        except BaseException:
            self.release(remove_partial=False)
            raise
        lifecycle.track(self.partial)

    def _acquire(self, shown: Path) -> int:
        for _ in range(_OPEN_TRIES):
            fd = _open_lock(self.lock, shown)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FeatureStoreError(
                    f"another nrc-audit run is writing the feature store {shown} right now (it holds the lock on "
                    f"{self.lock}). Wait for it to finish, or pass another --features path (or --no-features)."
                ) from None
            if _names_fd(self.lock, fd):
                lifecycle.track(self.lock)
                return fd
            os.close(fd)  # its owner removed it between our open and our lock: take the one there now
        raise FeatureStoreError(f"cannot lock the feature store {shown}: {self.lock} keeps being replaced.")

    def release(self, remove_partial: bool) -> None:
        """Give up the lock (the lock file is removed first, while still held). Safe to call more than once."""
        if remove_partial:
            self.partial.unlink(missing_ok=True)
        lifecycle.untrack(self.partial)
        if self._fd is not None:
            if _names_fd(self.lock, self._fd):
                self.lock.unlink(missing_ok=True)
            lifecycle.untrack(self.lock)
            os.close(self._fd)
            self._fd = None


def clean_stale(final: Path) -> None:
    """Delete the partial and lock files a killed run left for the store at ``final``; a live run's stay.

    Best effort: a run that writes no store calls it for its default store path, and a failure to clean
    (a read-only folder, a live run) changes nothing about that run.
    """
    final = Path(os.path.realpath(final))
    if not os.path.lexists(partial_path(final)) and not os.path.lexists(lock_path(final)):
        return
    try:
        StoreLock(final, final).release(remove_partial=True)
    except (FeatureStoreError, OSError):
        pass
