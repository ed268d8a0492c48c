"""Plan before allocating: what an audit will need, estimated from headers alone, refused when absurd.

Each check runs before the allocation it guards and raises :class:`PlanError` (exit 2) naming the figure,
the limit, and the knob that moves the limit. The limits:

- memory budget: ``NRC_AUDIT_MAX_MEMORY`` (bytes, suffixes K/M/G/T allowed) or else the kernel's
  ``MemAvailable``; used for the Σ 8·h² statistics, one batch of data and the tensors of a checkpoint;
- ``.pt`` zip archives: at most ``NRC_AUDIT_MAX_INFLATE`` (default 256 MiB) produced by decompression —
  ``torch.save`` stores its entries uncompressed, so only a crafted file inflates;
- module indices in state-dict keys: at most ``MAX_MODULE_INDEX`` (a key ``1000000000.weight`` would make
  the MLP builder create 10⁹ modules);
- the feature store: its worst-case size on disk (compressed or not) against the free space of its folder.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch

from nrc_audit.errors import PlanError

MAX_MODULE_INDEX = 100_000  # the deepest plausible Sequential; building 10⁵ empty modules takes ~0.1 s
DEFAULT_MAX_INFLATE = 256 << 20
STATS_FACTOR = 3  # S_HH (h×h float64) plus the eigendecomposition's copy and workspace
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def _gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.3g} GiB"


def _size(nbytes: float) -> str:
    return _gib(nbytes) if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.3g} MiB"


def _env_bytes(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", raw, re.IGNORECASE)
    if m is None:
        raise PlanError(f"{name}={raw!r}: expected a number of bytes such as 8G or 500M.")
    return int(float(m[1]) * _SUFFIX[m[2].upper()])


def memory_budget() -> int:
    """Bytes the audit may allocate: ``NRC_AUDIT_MAX_MEMORY`` or the kernel's MemAvailable."""
    configured = _env_bytes("NRC_AUDIT_MAX_MEMORY")
    if configured is not None:
        return configured
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 40


def refuse_over_memory(what: str, nbytes: float, fix: str) -> None:
    """Raise PlanError when ``nbytes`` exceeds the memory budget."""
    budget = memory_budget()
    if nbytes > budget:
        raise PlanError(f"{what} needs {_gib(nbytes)} of memory; {_gib(budget)} is available "
                        f"(NRC_AUDIT_MAX_MEMORY or MemAvailable). {fix}")  # fmt: skip


def check_pt_archive(path: Path) -> None:
    """Refuse a ``.pt`` zip whose entries would inflate beyond the cap, from its central directory alone.

    The declared sizes are an upper bound of what the reader allocates (it refuses an entry that inflates
    past its declared size), so checking them is enough.
    """
    if not zipfile.is_zipfile(path):
        return  # the legacy pickle format: everything it holds is in the file's own bytes
    try:
        with zipfile.ZipFile(path) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load reports the damage with its own words
    cap = _env_bytes("NRC_AUDIT_MAX_INFLATE") or DEFAULT_MAX_INFLATE
    inflated = sum(max(0, e.file_size - e.compress_size) for e in entries if e.compress_type != zipfile.ZIP_STORED)
    if inflated > cap:
        raise PlanError(f"{path}: its zip entries would inflate by {_gib(inflated)} on loading; the cap is "
                        f"{_gib(cap)} (torch.save writes uncompressed entries, so this file was crafted or "
                        "re-compressed). Re-save it with torch.save, or raise NRC_AUDIT_MAX_INFLATE.")  # fmt: skip
    refuse_over_memory(f"{path}: loading its {len(entries)} zip entries",
                       sum(e.file_size for e in entries), "Audit on a machine with more memory.")


def check_module_indices(keys: Iterable[str], path: Path) -> None:
    """Refuse state-dict keys whose integer components would make a builder create absurdly many modules."""
    worst, key_of_worst = -1, ""
    for key in keys:
        for m in _INDEX.finditer(key):
            if len(m[1]) > 12 or int(m[1]) > worst:
                worst, key_of_worst = (10**12 if len(m[1]) > 12 else int(m[1])), key
    if worst > MAX_MODULE_INDEX:
        shown = key_of_worst if len(key_of_worst) <= 80 else key_of_worst[:80] + "…"
        raise PlanError(f"{path}: key {shown!r} names module index {worst}; rebuilding it would create that many "
                        f"modules, and nrc-audit accepts indices up to {MAX_MODULE_INDEX}. Re-save the state dict "
                        "of the real model, or pass --model-def to build it yourself.")  # fmt: skip


STORE_SLACK = 0.01  # HDF5's metadata and chunk index on top of the raw values, as a fraction …
STORE_FIXED = 256 << 10  # … plus a fixed allowance (a store of a few rows still has its headers)


def store_bytes(num_rows: int, widths: Mapping[str, int], target_dim: int, itemsize: int, weights: int = 0,
                pooled: Iterable[str] = ()) -> int:  # fmt: skip
    """Bytes a feature store can take on disk: every feature (N·Σh·itemsize; 8 bytes for the ``pooled``
    layers, whose features are averaged and stored in float64), the outputs (N·t·itemsize) and targets
    (N·t·8), the float64 weights, and HDF5's own. A compressed store is planned at this same worst case:
    gzip and lzf may not shrink the data at all, and HDF5 fails (or crashes) on a full disk mid-write."""
    wide = set(pooled)
    features = sum(h * (8 if name in wide else itemsize) for name, h in widths.items())
    raw = num_rows * (features + target_dim * (itemsize + 8)) + weights
    return int(raw * (1 + STORE_SLACK)) + STORE_FIXED


@dataclass(frozen=True)
class MemoryPlan:
    """How the audit fits: the layers' groups, one pass over the data each (one group: the usual single pass),
    and the figures the run announces before it starts."""

    groups: tuple[tuple[str, ...], ...]
    stats_bytes: int
    budget: int
    store_bytes: int | None = None
    disk_free: int | None = None

    def notices(self) -> list[str]:
        lines = []
        if len(self.groups) > 1:
            lines.append(f"memory plan: the statistics of all layers need {_size(self.stats_bytes)}, over the "
                         f"{_size(self.budget)} budget (NRC_AUDIT_MAX_MEMORY or MemAvailable); the layers are audited "
                         f"in {len(self.groups)} groups, one pass over the data each (same report): "
                         + "; ".join(f"{g[0]} … {g[-1]} ({len(g)})" if len(g) > 1 else g[0] for g in self.groups))
        if self.store_bytes is not None:
            free = f", {_size(self.disk_free)} free on its disk" if self.disk_free is not None else ""
            lines.append(f"feature store: up to {_size(self.store_bytes)}{free}")
        return lines


def plan_groups(widths: Mapping[str, int], target_dim: int, budget: int) -> tuple[tuple[str, ...], ...]:
    """Consecutive layers packed into groups whose statistics (with the targets') fit the budget; a layer
    that alone does not fit is refused (PlanError)."""
    t = target_dim
    fixed = 8 * t * t * STATS_FACTOR
    groups: list[list[str]] = [[]]
    used = fixed
    for name, h in widths.items():
        cost = 8 * (h + t) ** 2 * STATS_FACTOR
        if fixed + cost > budget:
            raise PlanError(f"the statistics of layer {name!r} alone (h = {h}, {t} targets; 8·(h+t)² bytes "
                            f"×{STATS_FACTOR}) need {_size(fixed + cost)} of memory; {_size(budget)} is available "
                            "(NRC_AUDIT_MAX_MEMORY or MemAvailable). Exclude it with --exclude, or audit on a "
                            "machine with more memory.")  # fmt: skip
        if groups[-1] and used + cost > budget:
            groups.append([])
            used = fixed
        groups[-1].append(name)
        used += cost
    return tuple(tuple(g) for g in groups)


def plan_statistics(widths: Mapping[str, int], num_rows: int, store_path: Path | None, itemsize: int,
                    target_dim: int = 0, weights: int = 0, pooled: Iterable[str] = ()) -> MemoryPlan:  # fmt: skip
    """Plan the statistics into the memory budget (:func:`plan_groups`: more than one pass when all layers'
    do not fit at once) and refuse a feature store (:func:`store_bytes`) over the free disk of its folder.

    The statistics of a layer are the joint moments of [H | Y], (h + t)² float64 values, times the
    eigendecomposition's workspace; the targets' own t×t moments come once more. With many targets the t
    term dominates: 3000 targets cost 8·3000² bytes per layer, whatever the widths.

    Args:
        widths: audited layer name → feature width h. num_rows: N. itemsize: bytes per stored feature.
        target_dim: t. weights: bytes of the float64 weights the store keeps. pooled: the layers whose
        features are stored in float64 (pooled conv inputs).
    """
    t, budget = target_dim, memory_budget()
    stats = (sum(8 * (h + t) ** 2 for h in widths.values()) + 8 * t * t) * STATS_FACTOR
    plan = MemoryPlan(plan_groups(widths, t, budget) if widths else ((),), stats, budget)
    if store_path is None or not widths:
        return plan
    folder = Path(store_path).resolve().parent
    need = store_bytes(num_rows, widths, t, itemsize, weights, pooled)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return replace(plan, store_bytes=need)  # the folder's absence is reported by the store writer
    if need > free:
        raise PlanError(f"--features {store_path}: the store needs up to {_size(need)} ({num_rows} rows × "
                        f"({sum(widths.values())} features + {t} outputs) × {itemsize} bytes, {t} float64 targets, "
                        f"the weights and HDF5's own; compressed stores are planned at this worst case) but {folder} "
                        f"has {_size(free)} free. Free space, choose another folder with --features PATH, pass "
                        "--no-features, or audit fewer layers.")
    return replace(plan, store_bytes=need, disk_free=free)


_WIDTH_ATTRS = ("in_features", "in_channels", "embed_dim", "input_size", "nx")  # Linear, Conv, MHA, RNN, HF Conv1D


def plan_audit(modules: Mapping[str, torch.nn.Module], num_rows: int, input_shape: tuple[int, ...], batch_size: int,
               store_path: Path | None, itemsize: int, target_dim: int = 0) -> MemoryPlan:
    """Everything the pass will allocate, refused up front: the statistics and store (:func:`plan_statistics`)
    and one batch of data, read as stored (≤ 8 bytes a value) and prefetched once (×2), with its targets.

    Args:
        modules: audited layers (Linear: h = in_features; Conv2d: h = in_channels, pooled).
        input_shape: per-sample shape, e.g. (C, H, W). itemsize: bytes per stored feature (4 or 8). target_dim: t.
    """
    widths = {name: next((int(getattr(m, a)) for a in _WIDTH_ATTRS if isinstance(getattr(m, a, None), int)), 0)
              for name, m in modules.items()}  # fmt: skip
    weights = sum(8 * int(getattr(m, "weight").numel()) for m in modules.values()
                  if isinstance(getattr(m, "weight", None), torch.Tensor))  # fmt: skip
    convs = [name for name, m in modules.items() if isinstance(m, torch.nn.modules.conv._ConvNd)]  # pooled, float64
    plan = plan_statistics(widths, num_rows, store_path, itemsize, target_dim, weights, convs)
    per_sample = 8 * (max(1, math.prod(input_shape)) + target_dim)
    refuse_over_memory(f"a batch of {batch_size} samples of shape {input_shape} (×2: read and prefetched)",
                       2 * batch_size * per_sample, "Lower --batch-size.")
    return plan


# Element types nrc-audit computes with; every other one is refused by name (never cast silently).
_PLAIN = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool,
          *(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))}  # fmt: skip
_ADVICE = {
    "complex": "complex weights have an imaginary part that a real-valued audit would drop; audit the real model",
    "quantized": "dequantize first (tensor.dequantize()) and save the float state dict",
    "low-bit": "unpack/dequantize the packed or 8-bit float weights to float16/float32 first",
    "sparse": "save tensor.to_dense() instead",
    "meta": "the tensor has no data (device 'meta'); save the state dict after the weights are materialised",
    "view": "the tensor is a view larger than its storage (stride 0 or overlapping); save tensor.clone() instead",
}


def _kind_of_problem(t: torch.Tensor) -> str | None:
    if t.layout != torch.strided:
        return "sparse"
    if t.is_meta:
        return "meta"
    if t.is_quantized:
        return "quantized"
    if t.is_complex():
        return "complex"
    if t.dtype not in _PLAIN:
        return "low-bit"
    if t.numel() > 1 and (0 in t.stride() or t.numel() * t.element_size() > t.untyped_storage().nbytes()):
        return "view"
    return None


def check_state_dict(sd: Mapping, path: Path) -> None:
    """Refuse non-string keys and tensors nrc-audit cannot compute with exactly, listing all of them."""
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise PlanError(f"{path}: the state dict has non-string keys {bad_keys[:5]!r}"
                        f"{' …' if len(bad_keys) > 5 else ''}; expected parameter names such as '0.weight'. "
                        "Save model.state_dict().")  # fmt: skip
    problems: dict[str, list[str]] = {}
    for key, t in sd.items():
        kind = _kind_of_problem(t)
        if kind is not None:
            problems.setdefault(kind, []).append(f"{key} ({t.dtype}, {t.layout})")
    if problems:
        lines = "; ".join(f"{kind}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''} — {_ADVICE[kind]}"
                          for kind, names in problems.items())  # fmt: skip
        raise PlanError(f"{path}: tensors nrc-audit cannot audit exactly — {lines}.")
    check_module_indices(sd.keys(), path)


_ST_PLAIN = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64"}
_ST_KIND = {"C64": "complex", "C128": "complex"}  # any other unknown dtype name is a packed / low-bit one
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def check_safetensors_header(path: Path) -> None:
    """Read only the JSON header of a safetensors file and refuse exotic dtypes and absurd module indices
    before any tensor is read. Malformed headers are left to ``safe_open`` (reported as a damaged file)."""
    import json

    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= min(MAX_HEADER, os.fstat(fh.fileno()).st_size - 8):
                return
            header = json.loads(fh.read(size))
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(header, dict):
        return
    entries = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    problems: dict[str, list[str]] = {}
    for key, entry in entries.items():
        dtype = entry.get("dtype")
        if isinstance(dtype, str) and dtype not in _ST_PLAIN:
            problems.setdefault(_ST_KIND.get(dtype, "low-bit"), []).append(f"{key} ({dtype})")
    if problems:
        lines = "; ".join(f"{kind}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''} — {_ADVICE[kind]}"
                          for kind, names in problems.items())  # fmt: skip
        raise PlanError(f"{path}: tensors nrc-audit cannot audit exactly — {lines}.")
    check_module_indices(entries, path)
