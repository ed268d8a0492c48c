"""The chunked HDF5 feature store (schema ``nrc-audit-features/1``, SPEC §5).

Layout: root attrs (schema, tool_version, model_sha256, data_sha256, complete, context JSON),
``/targets (N, t)``, ``/outputs (N, t)``, ``/layers/NN (N, h)`` with row chunks and attrs
(index, name, kind, pooled, in_dim, out_dim), ``/weights/NN`` (the W used for NRC3, float64).
Features are float32 (float64 when the model computes in float64). ``complete`` turns true only after the
last batch, so a store left by an interrupted run is recognisable and refused for re-analysis.

Writes go through a background thread so the forward pass and the Gram products overlap with HDF5 I/O.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from nrc_audit import __version__
from nrc_audit.errors import FeatureStoreError
from nrc_audit.extract import LayerInfo

SCHEMA = "nrc-audit-features/1"
CHUNK_BYTES = 1 << 20  # ≈1 MiB per chunk: large sequential writes, small enough for partial reads
_STOP = object()


def _chunk_rows(width: int, itemsize: int, n: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(1, width * itemsize)))


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.cpu().numpy()


class FeatureStoreWriter:
    """Writes one audit pass into a feature store, on a background thread.

    Args:
        path: destination file (created or truncated).
        n: number of rows N. layers: the audited layers (weights are written immediately).
        attrs: root attributes (model/data sha256 and the report ``context``).
        compression: None, "gzip" or "lzf".
    """

    def __init__(self, path: Path, n: int, layers: list[LayerInfo], attrs: dict[str, Any],
                 compression: str | None = None) -> None:  # fmt: skip
        self.path, self.n, self.compression = Path(path), n, compression
        try:
            self._fh = h5py.File(self.path, "w")
        except OSError as exc:
            raise FeatureStoreError(f"cannot create the feature store {self.path}: {exc}") from None
        root = self._fh.attrs
        root["schema"], root["tool_version"], root["complete"] = SCHEMA, __version__, False
        for key, value in attrs.items():
            root[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        self._layers = layers
        wgroup = self._fh.create_group("weights")
        for layer in layers:
            wgroup.create_dataset(f"{layer.index:02d}", data=layer.weight.numpy())
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._worker, name="nrc-audit-store", daemon=True)
        self._thread.start()

    def _create(self, name: str, width: int, dtype: np.dtype) -> h5py.Dataset:
        rows = _chunk_rows(width, dtype.itemsize, self.n)
        return self._fh.create_dataset(name, shape=(self.n, width), dtype=dtype, chunks=(rows, width),
                                       compression=self.compression)  # fmt: skip

    def write(self, start: int, outputs: torch.Tensor, targets: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Queue rows [start, start+B) of outputs (B, t), targets (B, t) and features [(B, h_ℓ)]."""
        self._raise_if_failed()
        item = (start, _numpy(outputs.reshape(len(outputs), -1)), targets.numpy(), [_numpy(f) for f in feats])
        self._queue.put(item)

    def _worker(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None:
                continue
            try:
                self._write_now(*item)
            except BaseException as exc:  # surfaced to the main thread on the next write/close
                self._error = exc

    def _write_now(self, start: int, outputs: np.ndarray, targets: np.ndarray, feats: list[np.ndarray]) -> None:
        if "targets" not in self._fh:
            self._create("targets", targets.shape[1], np.dtype(np.float64))
            self._create("outputs", outputs.shape[1], outputs.dtype)
            self._fh.create_group("layers")
            for layer, f in zip(self._layers, feats):
                ds = self._create(f"layers/{layer.index:02d}", f.shape[1], f.dtype)
                ds.attrs.update(index=layer.index, name=layer.name, kind=layer.kind, pooled=layer.pooled,
                                in_dim=layer.in_dim, out_dim=layer.out_dim)  # fmt: skip
        stop = start + len(targets)
        self._fh["targets"][start:stop] = targets
        self._fh["outputs"][start:stop] = outputs
        for layer, f in zip(self._layers, feats):
            self._fh[f"layers/{layer.index:02d}"][start:stop] = f

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise FeatureStoreError(f"writing the feature store {self.path} failed: {self._error}")

    def close(self, complete: bool) -> None:
        """Drain the queue, mark the store complete (or not) and close it."""
        self._queue.put(_STOP)
        self._thread.join()
        try:
            if complete:
                self._raise_if_failed()
                self._fh.attrs["complete"] = True
        finally:
            self._fh.close()


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
        if not bool(attrs.get("complete", False)):
            self._fh.close()
            raise FeatureStoreError(
                f"{self.path} is incomplete (the run that wrote it was interrupted or failed); re-run the audit."
            )
        self.attrs = {k: attrs[k] for k in attrs}
        self.context: dict[str, Any] = json.loads(self.attrs.get("context", "{}"))
        self.layers = [self._layer_info(name) for name in sorted(self._fh["layers"])]
        self.n, self.t = self._fh["targets"].shape

    def _layer_info(self, key: str) -> LayerInfo:
        a = self._fh[f"layers/{key}"].attrs
        w = torch.from_numpy(self._fh[f"weights/{key}"][...])
        return LayerInfo(int(a["index"]), str(a["name"]), str(a["kind"]), int(a["in_dim"]), int(a["out_dim"]),
                         bool(a["pooled"]), w)  # fmt: skip

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """Yield (start, outputs (B, t), targets (B, t), [features (B, h_ℓ)]) in row order."""
        keys = [f"layers/{layer.index:02d}" for layer in self.layers]
        for a in range(0, self.n, batch_size):
            b = min(a + batch_size, self.n)
            feats = [torch.from_numpy(self._fh[k][a:b]) for k in keys]
            yield a, torch.from_numpy(self._fh["outputs"][a:b]), torch.from_numpy(self._fh["targets"][a:b]), feats

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
