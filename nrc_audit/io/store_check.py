"""Read-side validation of a feature store (schema ``nrc-audit-features/1``): a tampered or truncated store
is refused with the group, dataset or attribute that is wrong, never analysed misaligned.

Checked: ``/outputs`` and ``/targets`` of shape (N, t); one ``/layers/NN`` of shape (N, h) per
``/weights/NN``, except for a layer that reads an earlier layer's input (q/k/v): its ``/weights/NN`` carries
its attributes and ``shares_input_with`` (the earlier layer's index, whose ``/layers`` dataset it reads); the layer attributes (index, name, kind, pooled, in_dim, out_dim) present and typed, with
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
    if f"layers/{key}" not in fh:
        return _sharing_layer(fh, key, n, path)
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


def _sharing_layer(fh: h5py.File, key: str, n: int, path: Path) -> LayerInfo:
    """A layer that reads another layer's input: its attributes on /weights/NN, its rows in the other's dataset."""
    a = fh[f"weights/{key}"].attrs
    src = a.get("shares_input_with")
    if not key.isdigit() or src is None or isinstance(src, (bool, np.bool_)) or not isinstance(src, (int, np.integer)) \
            or not 0 <= int(src) < int(key) or f"layers/{int(src):02d}" not in fh:
        raise FeatureStoreError(f"{path}: /layers/{key} is missing and /weights/{key} names no earlier layer whose "
                                f"input it shares (attribute shares_input_with = {src!r}). {_FIX}")  # fmt: skip
    own = _layer(fh, f"{int(src):02d}", n, path)
    missing = [k for k in _ATTRS if k not in a]
    if missing or int(a.get("in_dim", -1)) != own.in_dim:
        raise FeatureStoreError(f"{path}: /weights/{key} (a layer sharing the input of layer {int(src)}) lacks the "
                                f"attribute(s) {missing} or its in_dim differs from that layer's {own.in_dim}. {_FIX}")
    w = fh[f"weights/{key}"]
    if w.shape is None or len(w.shape) < 2 or w.shape[0] != int(a["out_dim"]) or w.dtype.kind != "f":
        raise FeatureStoreError(f"{path}: /weights/{key} is not a float array of shape ({int(a['out_dim'])}, …). {_FIX}")
    name, kind = (v.decode() if isinstance(v, bytes) else str(v) for v in (a["name"], a["kind"]))
    return LayerInfo(int(a["index"]), name, kind, int(a["in_dim"]), int(a["out_dim"]), bool(a["pooled"]),
                     torch.from_numpy(w[...]), int(src))  # fmt: skip


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
    if not set(keys) <= set(weights) or not keys:  # a weight without features shares an earlier layer's input
        raise FeatureStoreError(f"{path}: /layers holds {keys} but /weights holds {weights}; expected a non-empty "
                                f"set of layers, each with its weight. {_FIX}")  # fmt: skip
    if n < t + 1:
        raise FeatureStoreError(f"{path}: the store holds {n} rows for {t} targets; at least t+1 are needed. {_FIX}")
    return attrs, context, [_layer(fh, key, n, path) for key in weights], (int(n), int(t))
