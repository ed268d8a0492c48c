"""HDF5 dataset reader: validate once, then yield (x, y) batches in file order, never the whole array.

Layout (SPEC §1): an input array X — (N, d) features, (N, T, d) token features, (N, C, L) sequences,
(N, C, H, W) images (``channels_last``: (N, H, W, C)), (N, C, D, H, W) volumes, or (N, T) integer token ids
of any integer dtype — and a target array Y, (N,) or (N, t). Keys may be group paths (``train/X``) or
pandas ``to_hdf`` groups (io/pandas_hdf.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from nrc_audit.config import DataOptions
from nrc_audit.errors import DatasetError
from nrc_audit.io.pandas_hdf import values_of

Y_MAX_ABS = 1e100  # larger targets overflow the float64 scatter S_YY = Σ (y − μ)(y − μ)ᵀ
X_NDIMS = (2, 3, 4, 5)  # (N, d) / (N, T); (N, T, d) or (N, C, L); (N, C, H, W); (N, C, D, H, W)
MASK_NAMES = ("attention_mask",)  # arrays a Hugging Face forward takes as the padding mask


@dataclass(frozen=True)
class DatasetInfo:
    """What the reader found, after validation and ``limit``."""

    path: Path
    x_key: str
    y_key: str
    num_samples: int
    input_shape: tuple[int, ...]  # per sample, as the model sees it (channels first)
    target_dim: int
    x_kind: str  # "float" (floats, and integer images other than uint8: cast) | "uint8" | "tokens" (integer ids)


def _dataset(fh: h5py.File, key: str, role: str, path: Path, notes: list[str] | None = None) -> h5py.Dataset:
    """Resolve ``key`` to a dataset inside this file; refuse external links, virtual datasets and
    external raw storage (anything that would read another file). A pandas group stands for its values
    array (the note saying so goes to ``notes``)."""
    key = _resolve_soft_links(fh, key, role, path)
    parts = [p for p in key.split("/") if p] or [""]  # "" (an empty key) is reported as a missing array
    for depth in range(1, len(parts) + 1):  # check every component, so no external link is ever followed
        sub = "/".join(parts[:depth])
        link = fh.get(sub, getlink=True) if sub else None
        if link is None:
            names: list[str] = []
            fh.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            raise DatasetError(
                f"{path}: no array {key!r} for {role}; the file holds {names or 'no arrays'}. "
                f"Pass the right key with --{role.lower()}-key (group paths like 'train/{role}' work)."
            )
        if isinstance(link, h5py.ExternalLink):
            raise DatasetError(
                f"{path}: {role} array {key!r} goes through {sub!r}, an external link to {link.filename!r}; "
                "nrc-audit reads only data stored inside the given file. Copy the array into the file "
                "(h5py: f[key] = src[...])."
            )
    obj = fh[key]
    if isinstance(obj, h5py.Dataset) and obj.shape is None:
        raise DatasetError(f"{path}: {role} array {key!r} has a null dataspace (no shape, no values); expected "
                           "an array of one row per sample. Write the data into it (h5py: f[key] = array).")
    if isinstance(obj, h5py.Group):
        obj, note = values_of(obj, key, role, path)
        if notes is not None:
            notes.append(note)
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(f"{path}: {key!r} is not an array; pass the array's full path.")
    if obj.is_virtual or obj.external or obj.file.filename != fh.filename:
        raise DatasetError(
            f"{path}: {role} array {key!r} reads from other files (a virtual dataset, external storage or a "
            "link into another file); nrc-audit reads only data stored inside the given file. Materialise it "
            "first (h5py: f[key] = src[...])."
        )
    return obj


def _resolve_soft_links(fh: h5py.File, key: str, role: str, path: Path, hops: int = 32) -> str:
    """Rewrite ``key`` until no component is a soft link, so that every component of the final path can be
    checked for external links *before* h5py follows anything (a soft link may lead into an external
    link, and an external link may name a FIFO, whose open blocks forever)."""
    for _ in range(hops):
        parts = [p for p in key.split("/") if p]
        for depth in range(1, len(parts) + 1):
            link = fh.get("/".join(parts[:depth]), getlink=True)
            if isinstance(link, h5py.SoftLink):
                target = link.path if link.path.startswith("/") else "/".join(parts[: depth - 1] + [link.path])
                key = "/".join([target.rstrip("/")] + parts[depth:])
                break
            if link is None or isinstance(link, h5py.ExternalLink):
                return key  # reported by the caller (missing array / external link)
        else:
            return key
    raise DatasetError(f"{path}: {role} array {key!r} goes through more than {hops} soft links (a cycle?); "
                       "point the key at the array itself.")


def _x_kind(dtype: np.dtype, ndim: int, path: Path, key: str) -> str:
    if dtype.kind == "f":
        return "float"
    if dtype == np.uint8:
        return "uint8"
    if dtype.kind in "iu":
        return "tokens" if ndim == 2 else "float"  # (N, T) token ids; 3-D+ integers are images, cast to float
    raise DatasetError(
        f"{path}: input array {key!r} has dtype {dtype}; expected float, uint8 images or integer token ids."
    )


class HDF5Dataset:
    """An open, validated dataset. Use as a context manager; iterate with :meth:`batches`.

    Example:
        >>> with HDF5Dataset(Path("data.h5"), DataOptions()) as ds:   # doctest: +SKIP
        ...     for start, x, y in ds.batches(1024):
        ...         pass
    """

    compute_dtype: torch.dtype = torch.float32  # the model's dtype; float64 lifts the float32 range check

    def __init__(self, path: Path, opts: DataOptions) -> None:
        self.path, self.opts = Path(path), opts
        if not self.path.is_file():
            raise DatasetError(f"data file not found: {self.path}. Pass the path of an HDF5 file with X and Y.")
        try:
            self._fh = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetError(
                f"{self.path} is not a readable HDF5 file ({exc}). nrc-audit reads HDF5 with input and target "
                "arrays (default keys X and Y); convert your data with h5py."
            ) from None
        try:
            self.info = self._validate()
        except BaseException:
            self._fh.close()
            raise

    def _validate(self) -> DatasetInfo:
        path, o = self.path, self.opts
        self.notes: list[str] = []  # how the arrays were read (pandas groups, integer inputs kept as ids)
        try:
            self._x = _dataset(self._fh, o.x_key, "X", path, self.notes)
            self._y = _dataset(self._fh, o.y_key, "Y", path, self.notes)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:  # h5py's errors for damaged metadata
            raise DatasetError(f"{path}: the HDF5 file is corrupt or truncated ({exc}).") from None
        xs, ys = self._x.shape, self._y.shape
        kind = _x_kind(self._x.dtype, len(xs), path, o.x_key)
        if len(xs) not in X_NDIMS:
            raise DatasetError(
                f"{path}: X {o.x_key!r} has shape {xs}; expected (N, d), (N, T) token ids, (N, T, d) tokens, "
                "(N, C, L) sequences, (N, C, H, W) images or (N, C, D, H, W) volumes."
            )
        if o.channels_last and len(xs) != 4:
            raise DatasetError(f"{path}: --channels-last needs 4-D images (N, H, W, C); X has shape {xs}.")
        if self._y.dtype.kind not in "fiub" or len(ys) not in (1, 2):
            raise DatasetError(
                f"{path}: Y {o.y_key!r} has shape {ys} and dtype {self._y.dtype}; expected numbers of shape (N,) or (N, t)."
            )
        if xs[0] != ys[0]:
            raise DatasetError(
                f"{path}: X has {xs[0]} rows but Y has {ys[0]}; they must have one row per sample. "
                "Check --x-key/--y-key or re-export the data."
            )
        n = xs[0] if o.limit is None else min(o.limit, xs[0])
        t = 1 if len(ys) == 1 else ys[1]
        if t < 1:
            raise DatasetError(f"{path}: Y has shape {ys}: no target columns.")
        if n < t + 1:
            raise DatasetError(
                f"{path}: {n} samples for {t} target dims; the audit needs at least t+1 = {t + 1} samples."
            )
        shape = tuple(xs[1:])
        if o.channels_last:
            shape = (shape[2], shape[0], shape[1])
        self._extras = _extra_arrays(self._fh, o, n, path)
        x_key, y_key = (ds.name.lstrip("/") if any(n.startswith(f"{role} read from") for n in self.notes) else key
                        for ds, role, key in ((self._x, "X", o.x_key), (self._y, "Y", o.y_key)))  # pandas: the array read
        return DatasetInfo(path, x_key, y_key, int(n), tuple(int(s) for s in shape), int(t), kind)

    def keep_integer_ids(self) -> None:
        """Feed a uint8 X as integer ids (int64) rather than as an image: the model begins with an embedding."""
        if self.info.x_kind == "uint8":
            self.info = replace(self.info, x_kind="tokens")
            self.notes.append(f"X {self.info.x_key!r} (uint8) fed as integer token ids: the model's first layer "
                              "is an embedding")  # fmt: skip

    def unused_masks(self) -> list[str]:
        """Keys of the file's padding-mask arrays (:data:`MASK_NAMES`, at the root or next to X) with one row
        per sample that no ``--input-key`` passes to the model."""
        used = {key.strip("/") for _, key in self.opts.input_keys} | {name for name, _ in self.opts.input_keys}
        parent = self.info.x_key.rpartition("/")[0]
        found = []
        for name in MASK_NAMES:
            for key in dict.fromkeys([f"{parent}/{name}".lstrip("/"), name]):
                obj = self._fh.get(key, getlink=True)
                if isinstance(obj, h5py.HardLink) and isinstance(self._fh.get(key), h5py.Dataset) and \
                        key not in used and self._fh[key].shape[:1] == (self._x.shape[0],):
                    found.append(key)
        return found

    def add_input(self, name: str, key: str) -> None:
        """Pass the array ``key`` to the model as the keyword ``name`` from now on (checked like ``--input-key``)."""
        self.opts = replace(self.opts, input_keys=(*self.opts.input_keys, (name, key)))
        self._extras = _extra_arrays(self._fh, self.opts, self.info.num_samples, self.path)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Yield ``(first_row, x, y)`` over rows [start, stop) in file order.

        x: (B, …) float32/float64 (uint8 images cast, /255 with ``scale_uint8``) or int64 token ids;
        y: (B, t) float64. Raises :class:`DatasetError` naming the first row with NaN/Inf.
        """
        stop = self.info.num_samples if stop is None else stop
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            try:
                x_np, y_np = self._x[a:b], self._y[a:b]
            except (OSError, RuntimeError, ValueError) as exc:
                raise DatasetError(f"{self.path}: rows {a}:{b} cannot be read; the file is corrupt ({exc}).") from None
            yield a, self._to_x(x_np, a), self._to_y(y_np, a)

    def extras(self, a: int, b: int) -> dict[str, torch.Tensor]:
        """The extra model inputs (``--input-key``) for rows [a, b): keyword → (B, …) tensor (integers as
        int64, booleans kept, floats as float32)."""
        out = {}
        for name, ds in self._extras.items():
            try:
                arr = ds[a:b]
            except (OSError, RuntimeError, ValueError) as exc:
                raise DatasetError(f"{self.path}: rows {a}:{b} of {ds.name!r} cannot be read ({exc}).") from None
            if arr.dtype.kind in "iu":
                arr = arr.astype(np.int64, copy=False)
            elif arr.dtype.kind == "f":
                _check_finite(arr, name, ds.name, a, self.path)
                arr = arr.astype(np.float32, copy=False)
            out[name] = torch.from_numpy(np.ascontiguousarray(arr))
        return out

    def _to_x(self, x: np.ndarray, first_row: int) -> torch.Tensor:
        kind = self.info.x_kind
        if kind == "tokens":
            return torch.from_numpy(x.astype(np.int64, copy=False))
        if kind == "float":
            if x.dtype.itemsize > 8:  # long double: torch has no such dtype
                with np.errstate(over="ignore"):  # out-of-range values become Inf, reported below
                    x = x.astype(np.float64)
            _check_finite(x, "X", self.opts.x_key, first_row, self.path)
        if kind == "float" and self.compute_dtype != torch.float64:
            _check_float32_range(x, self.opts.x_key, first_row, self.path)
        out = torch.from_numpy(np.ascontiguousarray(x))
        if out.dtype != torch.float64:  # float64 data stays exact for float64 models
            out = out.to(torch.float32)
        if kind == "uint8" and self.opts.scale_uint8:
            out = out / 255.0
        if self.opts.channels_last:
            out = out.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) → (B, C, H, W)
        return out

    def _to_y(self, y: np.ndarray, first_row: int) -> torch.Tensor:
        with np.errstate(invalid="ignore", over="ignore"):  # out-of-range values become Inf, reported below
            y = y.astype(np.float64, copy=False).reshape(len(y), -1)  # (B, t)
        _check_finite(y, "Y", self.opts.y_key, first_row, self.path)
        big = np.abs(y) > Y_MAX_ABS
        if big.any():
            row = first_row + int(np.argmax(big.any(axis=1)))
            raise DatasetError(
                f"{self.path}: Y {self.opts.y_key!r} has a value beyond ±{Y_MAX_ABS:g} at row {row}; sums of its "
                "squares overflow float64. Rescale the targets (the paper standardises them)."
            )
        return torch.from_numpy(y)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "HDF5Dataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_finite(a: np.ndarray, role: str, key: str, first_row: int, path: Path) -> None:
    flat = a.reshape(len(a), -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise DatasetError(
            f"{path}: {role} {key!r} has NaN or Inf at row {row} (first bad row). "
            "Remove or impute those rows before auditing."
        )


def _extra_arrays(fh: h5py.File, o: DataOptions, n: int, path: Path) -> dict[str, h5py.Dataset]:
    """Resolve and check the ``--input-key NAME=KEY`` arrays: one row per sample, numbers or booleans."""
    found = {}
    for name, key in o.input_keys:
        if not name.isidentifier():
            raise DatasetError(f"--input-key {name}={key}: {name!r} is not a keyword argument name; "
                               "pass NAME=KEY, e.g. attention_mask=mask.")  # fmt: skip
        ds = _dataset(fh, key, "input", path)
        if ds.ndim < 1 or ds.shape[0] < n or ds.dtype.kind not in "fiub":
            raise DatasetError(
                f"{path}: extra input {key!r} (for {name}=) has shape {ds.shape} and dtype {ds.dtype}; expected "
                f"numbers with at least {n} rows (one per sample, like X)."
            )
        found[name] = ds
    return found
F32_MAX = float(np.finfo(np.float32).max)


def _check_float32_range(a: np.ndarray, key: str, first_row: int, path: Path) -> None:
    """X values beyond float32's range would become Inf in a float32 model (and then NaN statistics)."""
    if a.dtype.itemsize <= 4:
        return  # float16/float32 data is in range by construction
    with np.errstate(over="ignore"):  # exactly the values the cast rounds to ±Inf (not merely > F32_MAX)
        big = np.isinf(a.reshape(len(a), -1).astype(np.float32))
    if big.any():
        row = first_row + int(np.argmax(big.any(axis=1)))
        raise DatasetError(
            f"{path}: X {key!r} has a value beyond float32's ±{F32_MAX:.3g} at row {row}, and the model computes "
            "in float32, where it would become Inf. Rescale the inputs, or convert the model to float64 "
            "(model.double()) and re-save it."
        )
