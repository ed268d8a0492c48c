"""Ending a run fast and clean: stoppable background workers, temporary files removed on every exit, and a
watchdog that ends the process within a second of SIGTERM / SIGINT.

Python runs signal handlers on the main thread only, between bytecodes. A main thread blocked in C code (a
gloo collective waiting for a dead rank, an HDF5 read from a FIFO, a join on a wedged thread) never gets
there, so the graceful path (``Interrupted`` raised, workers stopped, partial files removed) cannot be the
only one. :class:`Watchdog` receives the signal through :func:`signal.set_wakeup_fd`, which the C-level
handler writes to whatever the main thread is doing; if the process is still alive ``GRACE_S`` later it
removes the tracked temporary files and ends with ``os._exit(128 + signum)`` (143 for SIGTERM, 130 for
SIGINT, 129 for SIGHUP).

The stop protocol for background threads (used by the feature-store writer and the batch reader; apply it
to any new worker): every blocking queue operation polls a stop :class:`threading.Event` (:func:`put`,
:func:`get`), every join has a timeout (:func:`join`), and :class:`Worker` bundles both for the common
"consume items from a bounded queue" thread.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from typing import Any, Callable

GRACE_S = 0.8  # after a signal: time the graceful path gets before the watchdog ends the process
JOIN_TIMEOUT_S = 5.0  # a worker that has not stopped by then is abandoned (it is a daemon thread)
POLL_S = 0.05

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
_tracked: set[str] = set()
received: list[int] = []  # stop signals (SIGTERM/SIGINT/SIGHUP) received while a Watchdog was active, in order


def note_signal(signum: int) -> None:
    """Record a stop signal (from the Python handler or the watchdog): the process must end with 128+signum."""
    received.append(int(signum))
_tracked_lock = threading.Lock()


def track(path: os.PathLike | str) -> None:
    """Register a temporary file that must not outlive the process (removed by :func:`remove_tracked`)."""
    with _tracked_lock:
        _tracked.add(os.fspath(path))


def untrack(path: os.PathLike | str) -> None:
    with _tracked_lock:
        _tracked.discard(os.fspath(path))


def remove_tracked() -> None:
    """Delete every tracked temporary file (best effort; called on the hard-exit path)."""
    with _tracked_lock:
        paths = list(_tracked)
        _tracked.clear()
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; False when stopped (the item was not queued)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def join(thread: threading.Thread, timeout: float = JOIN_TIMEOUT_S) -> bool:
    """Join ``thread`` for at most ``timeout`` seconds; whether it ended."""
    thread.join(timeout)
    return not thread.is_alive()


_END = object()


class Worker:
    """A daemon thread that calls ``handle(item)`` for each submitted item, in order, and can always be stopped.

    ``submit`` blocks while the bounded queue is full (back-pressure) but returns as soon as the worker is
    stopped. The first exception of ``handle`` is kept in :attr:`error`; later items are then skipped (not
    handled) so that the producer never blocks on a dead consumer. :meth:`finish` drains the queue and
    joins; :meth:`stop` drops what is queued and joins with a timeout. Both are safe to call more than once.
    """

    def __init__(self, name: str, handle: Callable[[Any], None], depth: int,
                 on_skip: Callable[[Any], None] | None = None) -> None:  # fmt: skip
        self._handle, self._on_skip = handle, on_skip
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            if item is _END:
                return
            if self.error is not None or self.stopping.is_set():
                if self._on_skip is not None:
                    self._on_skip(item)
                continue
            try:
                self._handle(item)
            except BaseException as exc:  # surfaced to the producer by the owner of the worker
                self.error = exc

    def limit(self, depth: int) -> None:
        """Set the queue's bound to ``depth`` items (e.g. once the first item's size is known)."""
        with self.queue.mutex:
            self.queue.maxsize = depth

    def submit(self, item: Any) -> bool:
        """Queue ``item`` (waiting while the queue is full); False when the worker is stopped."""
        if not self._thread.is_alive():
            return False
        return put(self.queue, item, self.stopping)

    def finish(self) -> None:
        """Let the worker handle everything queued, then end it (waits as long as the writes take)."""
        if self._thread.is_alive() and put(self.queue, _END, self.stopping):
            while self._thread.is_alive():  # in steps, so that a signal handler can run meanwhile
                self._thread.join(POLL_S * 4)

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Drop the queued items and end the worker; whether it ended within ``timeout``."""
        self.stopping.set()
        return join(self._thread, timeout)


class Watchdog:
    """While active (a ``with`` block on the main thread): a signal that the graceful path does not turn
    into an exit within ``grace`` seconds ends the process with ``os._exit(128 + signum)``.

    Installs a wake-up file descriptor (the previous one is restored on exit). Once a signal has arrived
    the watchdog stays armed past the ``with`` block, so that a hang during interpreter shutdown is covered
    as well. Outside the main thread it does nothing.
    """

    def __init__(self, grace: float = GRACE_S) -> None:
        self.grace = grace
        self._fds: tuple[int, int] | None = None
        self._previous_fd = -1
        self._cancel = threading.Event()
        self._fired = threading.Event()

    def __enter__(self) -> "Watchdog":
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return self
        self._fds = (r, w)
        threading.Thread(target=self._run, args=(r,), name="nrc-audit-watchdog", daemon=True).start()
        return self

    def _run(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    note_signal(signum)
                    self._fired.set()
                    if self._cancel.wait(self.grace):
                        return
                    remove_tracked()
                    try:
                        os.write(2, f"interrupted ({signal.Signals(signum).name}); stopped after "
                                    f"{self.grace:g} s without a clean exit; no report written.\n".encode())
                    except OSError:
                        pass
                    os._exit(128 + signum)
            if not data or self._cancel.is_set():
                for end in self._fds or ():
                    os.close(end)
                return

    def __exit__(self, *exc: object) -> None:
        if self._fds is None:
            return
        try:
            signal.set_wakeup_fd(self._previous_fd)
        except ValueError:
            pass
        if self._fired.is_set():
            return  # stay armed: the process is on its way out and must get there within the grace time
        self._cancel.set()
        r, w = self._fds
        try:
            os.write(w, b"\0")  # wakes the thread, which sees the cancellation, closes both ends and ends
        except OSError:
            pass

