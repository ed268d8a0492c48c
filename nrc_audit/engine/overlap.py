"""Threads that overlap the pass's stages: the reader one batch ahead, the float64 folds one batch behind.

:class:`Prefetcher` reads batch k+1 from the data file while batch k is computed. :class:`FoldWorker`
runs the float64 folds on a worker thread, fed by a bounded queue, so that they overlap the forward pass.

The forward of batch k+1 (float32, torch's pool, main thread) and the folds of batch k (float64 syrk,
numpy's BLAS, this worker) run on different cores; both release the GIL in their heavy loops. One worker
folds the batches in their order, so the result is the one the serial pass computes, bit for bit.
Memory stays bounded: at most ``depth`` batches of features wait in the queue.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

import torch

from nrc_audit.io import lifecycle

_STOP = object()


class FoldWorker:
    """Calls ``fold(*item)`` on a background thread for every item :meth:`put`, in order.

    An exception raised by ``fold`` is re-raised on the caller's thread by the next :meth:`put` or by
    :meth:`finish`; :meth:`cancel` drops what is queued and stops the thread. Either is safe to call twice.
    """

    def __init__(self, fold: Callable[..., None], depth: int = 2) -> None:
        self._fold = fold
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="nrc-audit-fold", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._cancelled.is_set():
                return  # cancel() does not wait for the queued batches
            if self._error is None:
                try:
                    self._fold(*item)
                except BaseException as exc:  # handed to the main thread
                    self._error = exc

    def put(self, *item: object) -> None:
        """Queue one batch for folding (blocks while ``depth`` batches wait)."""
        self._raise_if_failed()
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()  # a dead fold must not leave the forward waiting forever

    def finish(self) -> None:
        """Fold everything queued, stop the thread, raise the fold's error if there was one."""
        self._stop()
        self._raise_if_failed()

    def cancel(self) -> None:
        """Drop the queued batches and stop the thread (after an error or an interrupt), waiting at most
        ``lifecycle.JOIN_TIMEOUT_S`` for the fold in progress: a signal must end the process promptly."""
        self._cancelled.set()
        if not self._done:
            self._done = True
            try:
                self._queue.put_nowait(_STOP)  # a full queue is fine: the thread returns at its next item
            except queue.Full:
                pass
            lifecycle.join(self._thread)

    def _stop(self) -> None:
        if not self._done:
            self._done = True
            self._queue.put(_STOP)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Prefetcher:
    """Iterates ``batches`` on a background thread, ``depth`` items ahead, in order.

    An exception raised by the source is re-raised by ``__next__`` at the position where it occurred, so
    errors such as "NaN at row r" surface exactly as they would without prefetching. With ``pin`` the CPU
    tensors of each ``(start, x, y)`` item are copied to page-locked memory on the thread, so that the
    transfer to the GPU can be asynchronous. :meth:`close` stops the thread (it finishes the item it is
    producing) and is safe to call more than once.
    """

    _END = object()

    def __init__(self, batches: Iterable, depth: int = 2, pin: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin
        self._thread = threading.Thread(target=self._run, args=(batches,), name="nrc-audit-reader", daemon=True)
        self._thread.start()

    def _run(self, batches: Iterable) -> None:
        try:
            for item in batches:
                if self._pin:
                    item = tuple(t.pin_memory() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
                                 for t in item)  # fmt: skip
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((None, exc))
            return
        self._put((self._END, None))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple:
        item, exc = self._queue.get()
        if exc is not None:
            raise exc
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        lifecycle.join(self._thread)  # with a timeout: a read stuck in C (a FIFO) must not hold the exit
