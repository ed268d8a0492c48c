"""The chunked HDF5 feature store (schema ``nrc-audit-features/1``, SPEC §5).

Layout: root attrs (schema, tool_version, model_sha256, data_sha256, complete, context JSON),
``/targets (N, t)``, ``/outputs (N, t)``, ``/layers/NN (N, h)`` with row chunks and attrs
(index, name, kind, pooled, in_dim, out_dim), ``/weights/NN`` (the W used for NRC3, float64).
Features are float32 (float64 when the model computes in float64). ``complete`` turns true only after the
last batch. The store is written as ``.NAME.partial`` beside the target, created fresh (``O_EXCL``: never
through a symlink) under an exclusive ``flock`` on ``.NAME.lock`` (store_lock.py: a second run on the same
path exits 2 instead of truncating it; a killed run's leftovers are removed by the next one), and renamed
over the target when complete; a failed or interrupted run deletes its partial file, so an earlier store
is never damaged.

Writes go through a background thread so the forward pass and the Gram products overlap with the I/O.
Without compression every chunk is allocated when its dataset is created and the thread writes rows
straight into the chunks with ``os.pwrite``, which releases the GIL (h5py does not); with compression
the rows go through h5py and its filters. Both produce the same file layout.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch
from h5py import h5d, h5p

from nrc_audit.version import __version__
from nrc_audit.io import lifecycle
from nrc_audit.io.files import new_file_mode, on_commit, replace_target
from nrc_audit.io.store_lock import StoreLock
from nrc_audit.errors import FeatureStoreError
from nrc_audit.core.layer import LayerInfo
from nrc_audit.io.store_check import check_store

SCHEMA = "nrc-audit-features/1"
CHUNK_BYTES = 1 << 20  # ≈1 MiB per chunk (rows rounded down to a power of two); see docs/performance.md
QUEUE_BATCHES = 4  # batches the writer may lag behind: bounds its memory to 4 batches of features …
QUEUE_BYTES = 64 << 20  # … and to ≈ 64 MiB of them (at least one batch): see docs/performance.md (b)


def _chunk_rows(width: int, itemsize: int, n: int) -> int:
    """Rows per chunk: ≈CHUNK_BYTES, a power of two so that power-of-two batches fill whole chunks."""
    rows = max(1, CHUNK_BYTES // max(1, width * itemsize))
    return max(1, min(n, 1 << (rows.bit_length() - 1)))


def _host_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


class _PinnedPool:
    """Page-locked host buffers, reused, for non-blocking device→host copies of the features."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for buf in buffers:
                self._free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)


class FeatureStoreWriter:
    """Writes one audit pass into a feature store, on a background thread.

    :meth:`write` only queues the batch (CPU tensors as zero-copy numpy views; accelerator tensors through
    non-blocking copies into reused pinned buffers, waited for by the writer thread), so the forward pass
    and the Gram products of the next batch overlap with the HDF5 I/O of this one. At most
    ``QUEUE_BATCHES`` batches, and no more than ``QUEUE_BYTES`` of them (but always one), are in flight.

    Args:
        path: destination file (replaced by a rename when :meth:`close` completes it; symlinks followed).
        n: number of rows N. layers: the audited layers (weights are written immediately).
        attrs: root attributes (model/data sha256 and the report ``context``).
        compression: None, "gzip" or "lzf".
    """

    def __init__(self, path: Path, n: int, layers: list[LayerInfo], attrs: dict[str, Any],
                 compression: str | None = None) -> None:  # fmt: skip
        self.path, self.n, self.compression = Path(path), n, compression
        self.final, self._mode = _store_target(self.path)
        self._lock: StoreLock | None = StoreLock(self.final, self.path)  # the partial path is ours and free
        self.partial = self._lock.partial
        try:
            self._open(attrs, layers)
        except BaseException as exc:  # also an interruption here: no partial file may stay behind
            if getattr(self, "_fh", None) is not None:
                self._fh.close()
            self._release(remove=True)
            if isinstance(exc, OSError):
                raise FeatureStoreError(f"cannot create the feature store {self.path}: {exc}") from None
            raise

    def _open(self, attrs: dict[str, Any], layers: list[LayerInfo]) -> None:
        # "x": O_CREAT | O_EXCL, so a symlink planted after the lock cleared the path is refused, never followed;
        # the file is new, so ext4's replace-via-truncate flush (auto_da_alloc) is never armed either
        self._fh = h5py.File(self.partial, "x", locking=False)  # our own lock (above) excludes other runs
        root = self._fh.attrs
        root["schema"], root["tool_version"], root["complete"] = SCHEMA, __version__, False
        for key, value in attrs.items():
            root[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        self._layers = layers
        wgroup = self._fh.create_group("weights")
        for layer in layers:
            wds = wgroup.create_dataset(f"{layer.index:02d}", data=layer.weight.numpy())
            if layer.shares_input_with is not None:  # no /layers/NN of its own: its identity lives here
                wds.attrs.update(_identity(layer), shares_input_with=layer.shares_input_with)
        self._datasets: list[h5py.Dataset] = []  # outputs, targets, layers/NN… once the first batch arrives
        self._sinks: list = []  # one _RawRows (or the h5py Dataset itself) per dataset
        self._fd: int | None = None
        self._pinned = _PinnedPool()
        self._worker = lifecycle.Worker("nrc-audit-store", self._handle, QUEUE_BATCHES,
                                        on_skip=lambda item: self._pinned.give(item[3]))  # fmt: skip
        self._sized = False  # the queue's bound in batches is set from the first batch's bytes

    def _create(self, name: str, width: int, dtype: np.dtype) -> h5py.Dataset:
        rows = _chunk_rows(width, dtype.itemsize, self.n)
        dcpl = None
        if self.compression is None:  # every chunk placed now, so the writer can pwrite into it (_RawRows)
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
        return self._fh.create_dataset(name, shape=(self.n, width), dtype=dtype, chunks=(rows, width),
                                       compression=self.compression, dcpl=dcpl)  # fmt: skip

    def write(self, start: int, outputs: torch.Tensor, targets: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Queue rows [start, start+B) of outputs (B, t), targets (B, t) and features [(B, h_ℓ)]."""
        self._raise_if_failed()
        own = [f for layer, f in zip(self._layers, feats) if layer.shares_input_with is None]  # one per distinct input
        arrays = [outputs.reshape(len(outputs), -1), targets.reshape(len(targets), -1).to(torch.float64), *own]
        arrays = [a.detach() for a in arrays]
        event, pinned = None, list[torch.Tensor]()
        if any(a.device.type == "cuda" for a in arrays):
            arrays, pinned = self._stage(arrays)
            event = torch.cuda.Event()
            event.record()  # the writer thread waits for this point of the stream, the main thread does not
        else:
            arrays = [a.to("cpu", _host_dtype(a)) for a in arrays]  # a no-op view for CPU float32/float64
        if not self._sized:  # a writer slowed by the disk fills its queue only at large N: keep it small
            nbytes = sum(a.numel() * a.element_size() for a in arrays)
            self._worker.limit(max(1, min(QUEUE_BATCHES, QUEUE_BYTES // max(1, nbytes))))
            self._sized = True
        if not self._worker.submit((start, arrays, event, pinned)):
            self._raise_if_failed()
            raise FeatureStoreError(f"the feature store writer for {self.path} has stopped")

    def _stage(self, arrays: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Start non-blocking copies of the CUDA tensors into pinned buffers; returns (host tensors, pinned)."""
        host, pinned = [], []
        for a in arrays:
            if a.device.type != "cuda":
                host.append(a.to("cpu", _host_dtype(a)))
                continue
            buf = self._pinned.take(a.shape, _host_dtype(a))
            buf.copy_(a, non_blocking=True)  # (B, h) device → page-locked host, asynchronous
            host.append(buf)
            pinned.append(buf)
        return host, pinned

    def _handle(self, item: tuple) -> None:
        start, arrays, event, pinned = item
        try:
            if event is not None:
                event.synchronize()  # the non-blocking copies into the pinned buffers are done
            self._write_now(start, [a.numpy() for a in arrays])
        finally:
            self._pinned.give(pinned)

    def _write_now(self, start: int, arrays: list[np.ndarray]) -> None:
        if not self._datasets:
            outputs, targets, *feats = arrays
            self._datasets.append(self._create("outputs", outputs.shape[1], outputs.dtype))
            self._datasets.append(self._create("targets", targets.shape[1], np.dtype(np.float64)))
            self._fh.create_group("layers")
            for layer, f in zip([x for x in self._layers if x.shares_input_with is None], feats):
                ds = self._create(f"layers/{layer.index:02d}", f.shape[1], f.dtype)
                ds.attrs.update(_identity(layer))
                self._datasets.append(ds)
            self._sinks = self._raw_sinks() or self._datasets
        stop = start + len(arrays[0])
        for sink, a in zip(self._sinks, arrays):
            sink[start:stop] = a

    def _raw_sinks(self) -> list | None:
        """Direct writers into the pre-allocated chunks, or None where HDF5 must write (filters, old HDF5)."""
        if self.compression is not None:
            return None
        try:
            self._fh.flush()
            self._fd = os.dup(self._fh.id.get_vfd_handle())  # the very file HDF5 created, not a path lookup
            return [_RawRows(ds, self._fd) for ds in self._datasets]
        except (AttributeError, NotImplementedError, OSError, RuntimeError, ValueError):
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            return None

    def _raise_if_failed(self) -> None:
        if self._worker.error is not None:
            raise FeatureStoreError(f"writing the feature store {self.path} failed: {self._worker.error}")

    def close(self, complete: bool, now: bool = False) -> None:
        """``complete``: write what is queued, mark the store complete and rename it into place (atomically,
        keeping an existing store's mode) — together with the run's other outputs when an all-or-nothing
        group is open (io/files.py; ``now``: at once regardless, e.g. a shard the master store links).
        Otherwise (error, interruption): drop the queue and delete the partial file; an earlier store at the
        path is left as it was."""
        if not complete:
            self.discard()
            return
        self._worker.finish()
        try:
            self._close_fd()
            self._raise_if_failed()
            self._fh.attrs["complete"] = True
            self._fh.close()
            os.chmod(self.partial, new_file_mode(self._mode))
        except BaseException:
            self.discard()
            raise
        if now:
            self._publish()
        else:
            on_commit(self._publish, lambda: self._release(remove=True))

    def _publish(self) -> None:
        try:
            os.replace(self.partial, self.final)
        except BaseException:
            self._release(remove=True)
            raise
        self._release(remove=False)

    def discard(self) -> None:
        """Stop the writer (queued batches dropped) and delete the partial file. Safe to call more than once."""
        stopped = self._worker.stop()
        self._close_fd()
        if stopped:  # a wedged writer thread may still be inside h5py: leave the handle to process exit
            try:
                self._fh.close()
            except Exception:  # already closed, or the file is broken: it is deleted next anyway
                pass
        self._release(remove=True)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _release(self, remove: bool) -> None:
        if self._lock is not None:
            self._lock.release(remove_partial=remove)
            self._lock = None


def _identity(layer: LayerInfo) -> dict[str, Any]:
    return {"index": layer.index, "name": layer.name, "kind": layer.kind, "pooled": layer.pooled,
            "in_dim": layer.in_dim, "out_dim": layer.out_dim}


def _store_target(path: Path) -> tuple[Path, int | None]:
    try:
        return replace_target(path)
    except OSError:
        raise FeatureStoreError(f"--features {path} is not a regular file; pass the path of an .h5 file.") from None


class _RawRows:
    """``sink[a:b] = rows`` for an uncompressed, early-allocated chunked dataset, by ``os.pwrite``.

    h5py keeps the GIL for the whole of an HDF5 write, including the time the kernel makes the writing
    thread wait for dirty pages to drain (measured: it stalled the forward pass of a 200k-row audit by
    ~9 s). The chunks of a dataset without filters are plain C-order blocks of (chunk_rows, width) values at
    fixed file offsets, so rows can be written there with ``os.pwrite``, which releases the GIL; HDF5
    writes only its metadata, at close. The bytes and the layout are exactly those HDF5 would write.
    """

    def __init__(self, ds: h5py.Dataset, fd: int) -> None:
        self.fd, self.rows = fd, ds.chunks[0]
        self.row_bytes = ds.chunks[1] * ds.dtype.itemsize
        self.dtype = ds.dtype
        offsets: dict[int, int] = {}
        ds.id.chunk_iter(lambda info: offsets.__setitem__(info.chunk_offset[0] // self.rows, info.byte_offset))
        n_chunks = -(-ds.shape[0] // self.rows)
        if sorted(offsets) != list(range(n_chunks)) or ds.chunks[1] != ds.shape[1]:
            raise ValueError("chunks are not all allocated")
        self.offsets = [offsets[k] for k in range(n_chunks)]

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)  # (B, width); a no-op for fresh features
        start, stop = rows.start, rows.stop
        while start < stop:
            k, within = divmod(start, self.rows)
            end = min(stop, (k + 1) * self.rows)
            data = memoryview(values[start - rows.start : end - rows.start].data).cast("B")
            offset = self.offsets[k] + within * self.row_bytes
            while data:  # pwrite may write less than asked
                done = os.pwrite(self.fd, data, offset)
                data, offset = data[done:], offset + done
            start = end


class FeatureStore:
    """A complete feature store opened for re-analysis."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureStoreError(f"feature store not found: {self.path}")
        try:
            self._fh = h5py.File(self.path, "r")
        except OSError as exc:
            raise FeatureStoreError(f"{self.path} is not a readable HDF5 feature store ({exc}).") from None
        attrs = self._fh.attrs
        if attrs.get("schema") != SCHEMA:
            self._fh.close()
            raise FeatureStoreError(f"{self.path}: schema {attrs.get('schema')!r}, expected {SCHEMA!r}.")
        complete = attrs.get("complete", False)
        if not (isinstance(complete, (bool, np.bool_)) and bool(complete)):  # the string "false" is truthy
            self._fh.close()
            raise FeatureStoreError(
                f"{self.path} is incomplete (the run that wrote it was interrupted or failed); re-run the audit."
            )
        try:
            self._read_layout()
        except BaseException:
            self._fh.close()
            raise

    def _read_layout(self) -> None:
        """Validate the whole layout once (store_check.py); afterwards every read is of a known shape."""
        self.attrs, self.context, self.layers, (self.n, self.t) = check_store(self._fh, self.path)

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """Yield (start, outputs (B, t), targets (B, t), [features (B, h_ℓ)]) in row order."""
        keys = [f"layers/{layer.index:02d}" for layer in self.layers if layer.shares_input_with is None]
        for a in range(0, self.n, batch_size):
            b = min(a + batch_size, self.n)
            own = iter([torch.from_numpy(self._fh[k][a:b]) for k in keys])
            feats: list[torch.Tensor] = []
            for layer in self.layers:  # a layer sharing an input gets its first layer's rows (the same tensor)
                feats.append(next(own) if layer.shares_input_with is None else feats[layer.shares_input_with])
            yield a, torch.from_numpy(self._fh["outputs"][a:b]), torch.from_numpy(self._fh["targets"][a:b]), feats

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
