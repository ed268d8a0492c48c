"""The fixed probe set a training callback audits on: tensors, a DataLoader or an HDF5 file, validated once.

Under DDP every rank takes a contiguous block of whole batches (``engine.distributed.shard``), so that each
batch holds the same rows as in a single-process audit with the same ``batch_size``; the statistics are then
merged exactly (``nrc_audit.audit(..., across_ranks=True)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nrc_audit.config import AuditConfig, DataOptions
from nrc_audit.engine import distributed
from nrc_audit.errors import OptionsError
from nrc_audit.io.dataset import HDF5Dataset

Batch = tuple  # (x, y) or (x, y, extra): what nrc_audit.audit takes


class ProbeSet:
    """A re-iterable source of ``(x, y[, extra])`` batches, the same rows at every audit.

    Args:
        data: ``(X, Y)`` or ``(X, Y, {"attention_mask": M, ...})`` tensors (rows first); a re-iterable of
            batches (a ``DataLoader``; dict batches as the HF Trainer sees them are read through ``x_key``/
            ``y_key``, the other tensor entries passed as keyword inputs); or the path of an HDF5 file.
        batch_size: rows per batch for tensors and HDF5 files (default: the CLI's ``--batch-size``).
        x_key, y_key: the HDF5 keys, or the dict-batch keys (default ``input_ids``/``labels`` for dicts).
        data_options: HDF5 reading options as ``--channels-last``/``--scale-uint8``/``--input-key``.
    """

    def __init__(self, data: Any, batch_size: int = AuditConfig.batch_size, *, x_key: str | None = None,
                 y_key: str | None = None, data_options: DataOptions | None = None) -> None:  # fmt: skip
        if batch_size < 1:
            raise OptionsError(f"batch_size={batch_size} must be ≥ 1.")
        self.batch_size, self.x_key, self.y_key = batch_size, x_key, y_key
        self.path: Path | None = None
        self.tensors: tuple | None = None
        self.loader: Iterable | None = None
        if isinstance(data, (str, Path)):
            self.path = Path(data)
            opts = data_options or DataOptions()
            self.options = DataOptions(x_key or opts.x_key, y_key or opts.y_key, opts.channels_last,
                                       opts.scale_uint8, opts.limit, opts.input_keys)  # fmt: skip
            with HDF5Dataset(self.path, self.options) as ds:  # validated now, not at the first epoch's end
                self.num_rows = ds.info.num_samples
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(
                isinstance(t, torch.Tensor) for t in data[:2]):  # fmt: skip
            self.tensors = _checked_tensors(data)
            self.num_rows = len(self.tensors[0])
        elif isinstance(data, Iterable) and not isinstance(data, Iterator):
            self.loader = data
        else:
            raise OptionsError(
                f"the probe set must be (X, Y) tensors, a re-iterable of batches (a DataLoader) or an HDF5 path; "
                f"got {type(data).__name__}{' (a one-shot iterator)' if isinstance(data, Iterator) else ''}."
            )

    def batches(self, group: distributed.DistContext | None = None) -> Iterator[Batch]:
        """This rank's batches (all of them outside DDP), in order."""
        if self.loader is not None:
            yield from self._loader_batches(group)
            return
        start, stop = (0, self.num_rows) if group is None else distributed.shard(self.num_rows, self.batch_size, group)
        if group is not None and start == stop:
            raise OptionsError(f"the probe set's {self.num_rows} rows make fewer batches of {self.batch_size} than "
                               f"the {group.world_size} ranks; pass a smaller batch_size.")  # fmt: skip
        if self.tensors is not None:
            x, y, extra = self.tensors
            for a in range(start, stop, self.batch_size):
                b = min(a + self.batch_size, stop)
                yield x[a:b], y[a:b], {k: v[a:b] for k, v in extra.items()}
            return
        with HDF5Dataset(self.path, self.options) as ds:
            for a, x, y in ds.batches(self.batch_size, start, stop):
                yield x, y, ds.extras(a, a + len(x))

    def _loader_batches(self, group: distributed.DistContext | None) -> Iterator[Batch]:
        if group is None:
            first, last = 0, None
        else:
            try:
                count = len(self.loader)  # type: ignore[arg-type]
            except TypeError:
                raise OptionsError("under DDP the probe DataLoader needs a length (to split its batches between "
                                   "ranks); pass (X, Y) tensors or an HDF5 path instead.") from None  # fmt: skip
            first, last = count * group.rank // group.world_size, count * (group.rank + 1) // group.world_size
            if first == last:
                raise OptionsError(f"the probe DataLoader has {count} batches for {group.world_size} ranks; "
                                   "give it at least one batch per rank.")  # fmt: skip
        for i, batch in enumerate(self.loader):  # type: ignore[union-attr]
            if last is not None and i >= last:
                break
            if i >= first:
                yield self._as_tuple(batch)

    def _as_tuple(self, batch: Any) -> Batch:
        """A dict batch (HF style) → (x, y, extra); tuples pass through for ``audit`` to validate."""
        if not isinstance(batch, Mapping):
            return tuple(batch) if isinstance(batch, Sequence) else batch
        x_key, y_key = self.x_key or "input_ids", self.y_key or "labels"
        missing = [k for k in (x_key, y_key) if k not in batch]
        if missing:
            raise OptionsError(f"a probe batch is a dict with keys {sorted(batch)}; it lacks {missing}. Pass "
                               "x_key=/y_key= naming the model's input and the targets.")  # fmt: skip
        extra = {k: v for k, v in batch.items() if k not in (x_key, y_key) and isinstance(v, torch.Tensor)}
        return batch[x_key], batch[y_key], extra


def _checked_tensors(data: Sequence) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x, y = data[0], data[1]
    extra = dict(data[2]) if len(data) == 3 else {}
    if len(x) != len(y) or any(len(v) != len(x) for v in extra.values()):
        shapes = {"X": tuple(x.shape), "Y": tuple(y.shape), **{k: tuple(v.shape) for k, v in extra.items()}}
        raise OptionsError(f"the probe tensors must have the same number of rows; found {shapes}.")
    if len(x) == 0:
        raise OptionsError("the probe set is empty; pass at least t + 1 rows.")
    return x.detach(), y.detach(), {k: v.detach() for k, v in extra.items()}
