"""Read-side validation of a feature store (schema ``nrc-audit-features/1``): a tampered or truncated store
is refused with the group, dataset or attribute that is wrong, never analysed misaligned.

Checked: ``/outputs`` and ``/targets`` of shape (N, t); one ``/layers/NN`` of shape (N, h) per
``/weights/NN``; the layer attributes (index, name, kind, pooled, in_dim, out_dim) present and typed, with
h = in_dim and the weight of shape (out_dim, …); float features; the ``context`` attribute a JSON
object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from nrc_audit.core.layer import LayerInfo
from nrc_audit.errors import FeatureStoreError
from nrc_audit.io.validate import json_object_of_scalars

_ATTRS = {"index": (int, np.integer), "name": (str, bytes), "kind": (str, bytes), "pooled": (bool, np.bool_),
          "in_dim": (int, np.integer), "out_dim": (int, np.integer)}  # fmt: skip
_FIX = "The store was altered after it was written; re-run the audit with --features to write a new one."


def _dataset(fh: h5py.File, key: str, path: Path) -> h5py.Dataset:
    obj = fh.get(key, getlink=True)
    if obj is None:
        raise FeatureStoreError(f"{path}: the dataset /{key} is missing. {_FIX}")
    if not isinstance(obj, h5py.HardLink):
        raise FeatureStoreError(f"{path}: /{key} is a {type(obj).__name__}; a feature store holds its arrays itself. {_FIX}")
    ds = fh[key]
    if not isinstance(ds, h5py.Dataset) or ds.shape is None or len(ds.shape) != 2 or ds.dtype.kind != "f":
        raise FeatureStoreError(f"{path}: /{key} is not a 2-D float array (found "
                                f"{getattr(ds, 'shape', type(ds).__name__)}). {_FIX}")  # fmt: skip
    return ds


def _group(fh: h5py.File, key: str, path: Path) -> h5py.Group:
    obj = fh.get(key)
    if not isinstance(obj, h5py.Group):
        raise FeatureStoreError(f"{path}: the group /{key} is missing. {_FIX}")
    return obj


def _layer(fh: h5py.File, key: str, n: int, path: Path) -> LayerInfo:
    ds = _dataset(fh, f"layers/{key}", path)
    a = ds.attrs
    missing = [k for k in _ATTRS if k not in a]
    if missing:
        raise FeatureStoreError(f"{path}: /layers/{key} lacks the attribute(s) {missing}. {_FIX}")
    wrong = [f"{k}={a[k]!r}" for k, types in _ATTRS.items() if not isinstance(a[k], types)
             or (k in ("in_dim", "out_dim", "index") and (isinstance(a[k], (bool, np.bool_)) or int(a[k]) < 0))]
    if wrong:
        raise FeatureStoreError(f"{path}: /layers/{key} has mistyped attributes {wrong}; expected integer index/in_dim/"
                                f"out_dim ≥ 0, string name/kind and boolean pooled. {_FIX}")  # fmt: skip
    rows, width = ds.shape
    if rows != n or width != int(a["in_dim"]):
        raise FeatureStoreError(f"{path}: /layers/{key} holds {rows} rows of width {width}; expected {n} rows "
                                f"(like /targets) of width in_dim = {int(a['in_dim'])}. {_FIX}")  # fmt: skip
    wlink = fh.get(f"weights/{key}")
    if not isinstance(wlink, h5py.Dataset) or wlink.shape is None or len(wlink.shape) < 2 \
            or wlink.shape[0] != int(a["out_dim"]) or wlink.dtype.kind != "f":
        raise FeatureStoreError(f"{path}: /weights/{key} is missing or not a float array of shape "
                                f"({int(a['out_dim'])}, …). {_FIX}")  # fmt: skip
    name = a["name"].decode() if isinstance(a["name"], bytes) else str(a["name"])
    kind = a["kind"].decode() if isinstance(a["kind"], bytes) else str(a["kind"])
    return LayerInfo(int(a["index"]), name, kind, int(a["in_dim"]), int(a["out_dim"]), bool(a["pooled"]),
                     torch.from_numpy(wlink[...]))  # fmt: skip


def check_store(fh: h5py.File, path: Path) -> tuple[dict[str, Any], dict[str, Any], list[LayerInfo], tuple[int, int]]:
    """Validate an open, complete store; returns (root attrs, context, layers, (N, t))."""
    attrs = {k: fh.attrs[k] for k in fh.attrs}
    raw = attrs.get("context", "{}")
    try:
        context = json_object_of_scalars(raw.decode() if isinstance(raw, bytes) else raw, str(path),
                                         "the attribute 'context'", FeatureStoreError)  # fmt: skip
    except FeatureStoreError as exc:
        raise FeatureStoreError(f"{exc} {_FIX}") from None
    targets, outputs = _dataset(fh, "targets", path), _dataset(fh, "outputs", path)
    n, t = targets.shape
    if outputs.shape != (n, t):
        raise FeatureStoreError(f"{path}: /outputs has shape {outputs.shape} but /targets {targets.shape}; "
                                f"expected both (N, t). {_FIX}")  # fmt: skip
    keys = sorted(_group(fh, "layers", path))
    weights = sorted(_group(fh, "weights", path))
    if keys != weights or not keys:
        raise FeatureStoreError(f"{path}: /layers holds {keys} but /weights holds {weights}; expected the same, "
                                f"non-empty set of layers. {_FIX}")  # fmt: skip
    if n < t + 1:
        raise FeatureStoreError(f"{path}: the store holds {n} rows for {t} targets; at least t+1 are needed. {_FIX}")
    return attrs, context, [_layer(fh, key, n, path) for key in keys], (int(n), int(t))
