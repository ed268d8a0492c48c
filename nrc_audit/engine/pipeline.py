"""``run_audit(config) -> Report``: the one module that wires io, extract, store, stats and conditions.

One pass over the data: read a batch → forward with hooks → per-layer float64 statistics (on the model's
device) → queue the features to the store writer → next batch. The report is built from the statistics
alone, so a saved store re-analyses to the same report (:func:`reanalyze`).
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from nrc_audit import __version__
from nrc_audit.engine import distributed
from nrc_audit.core.conditions import layer_metrics, target_summary
from nrc_audit.core.verdicts import collapse_onset, gate
from nrc_audit.config import AnalysisOptions, AuditConfig
from nrc_audit.errors import ModelDataMismatchError, NrcAuditError, OptionsError
from nrc_audit.core.layer import LayerInfo
from nrc_audit.engine.extract import FeatureExtractor, candidate_layers
from nrc_audit.models.architecture import resolve_model
from nrc_audit.io import lifecycle
from nrc_audit.io.checkpoint import load_checkpoint, sha256_file
from nrc_audit.io.dataset import HDF5Dataset
from nrc_audit.outputs.report import Gate, LayerReport, Report, Summary
from nrc_audit.core.stats import Accumulator, JointAccumulator
from nrc_audit.io.store import FeatureStore, FeatureStoreWriter

ProgressHook = Callable[[int, int], None]  # (rows done, rows total)
POOLING_NOTE = "Conv2d inputs averaged over H×W and Linear inputs over extra dims (pooled: true)"


@dataclass
class PassStatistics:
    """Everything one pass accumulates: per-layer joint moments, target moments and the model's SSE."""

    layers: list[LayerInfo] = field(default_factory=list)
    joint: list[JointAccumulator] = field(default_factory=list)
    targets: Accumulator = field(default_factory=Accumulator)
    sse: float = 0.0
    n: int = 0
    _sse_pending: torch.Tensor | None = field(default=None, repr=False)

    def update(self, layers: list[LayerInfo], outputs: torch.Tensor, y: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Add one batch: outputs (B, t), y (B, t), feats [(B, h_ℓ)] — all on the same device.

        On an accelerator nothing here waits for the device: the squared error is summed on the device and
        folded into :attr:`sse` by :meth:`flush` (``extraction_pass`` calls it after the last batch).
        """
        if not self.joint:
            self.layers = layers
            self.joint = [JointAccumulator(layer.in_dim) for layer in layers]
        y64 = y.to(device=outputs.device, dtype=torch.float64)
        for acc, f in zip(self.joint, feats):
            acc.update_pair(f, y64)
        self.targets.update(y64)
        sq = ((outputs.to(torch.float64) - y64) ** 2).sum()  # 0-d, on the batch's device
        if sq.device.type == "cpu":
            self.sse += float(sq)
        else:
            self._sse_pending = sq if self._sse_pending is None else self._sse_pending + sq
        self.n += int(y.shape[0])

    def flush(self) -> None:
        """Bring the device-side squared-error sum into :attr:`sse` (one host synchronisation)."""
        if self._sse_pending is not None:
            self.sse += float(self._sse_pending)
            self._sse_pending = None


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cpu'; 'cuda' / 'cuda:i' (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionsError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:INDEX.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionsError(f"--device {name}: CUDA is not available here; use --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionsError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present.")
    elif device.type != "cpu":
        raise OptionsError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:INDEX.")
    return device


def _check_input_width(model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
    """Fail early, with a clear message, when the first layer cannot take the data's samples."""
    first = next((m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))), None)
    if isinstance(first, torch.nn.Linear) and len(input_shape) == 1 and input_shape[0] != first.in_features:
        raise ModelDataMismatchError(
            f"the data's samples have {input_shape[0]} features but the model's first Linear layer takes "
            f"{first.in_features}. Check --x-key, or that the checkpoint belongs to this dataset."
        )
    if isinstance(first, torch.nn.Conv2d) and len(input_shape) == 3 and input_shape[0] != first.in_channels:
        raise ModelDataMismatchError(
            f"the images have {input_shape[0]} channels (shape {input_shape}) but the first Conv2d takes "
            f"{first.in_channels}. For (N, H, W, C) data pass --channels-last."
        )


def _check_output(out: torch.Tensor, t: int) -> torch.Tensor:
    """Model output must be (B, t), or (B,) when t = 1; returns (B, t)."""
    if out.ndim == 1 and t == 1:
        return out.unsqueeze(1)
    if out.ndim != 2 or out.shape[1] != t:
        raise ModelDataMismatchError(
            f"the model's output has shape {tuple(out.shape)} per batch, but the targets have {t} columns; "
            f"expected (B, {t}). Is this a regression model for these targets (check --y-key)?"
        )
    return out


def run_audit(config: AuditConfig, progress: ProgressHook | None = None) -> Report:
    """Run the whole audit described by ``config`` and return its report (no output files but the store).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank audits a shard of the rows and the statistics are merged
    exactly; every rank returns the same report (the CLI prints it on rank 0 only).
    """
    config.validate()
    device = resolve_device(config.device)
    ctx = distributed.from_env(device)
    try:
        if ctx is not None:
            device = distributed.local_device(device)
        return _audit(config, device, ctx, progress)
    finally:
        distributed.close(ctx)


def _audit(config: AuditConfig, device: torch.device, ctx: distributed.DistContext | None,
           progress: ProgressHook | None) -> Report:  # fmt: skip
    ckpt = load_checkpoint(config.model_path)
    resolved = resolve_model(ckpt, config.model)
    model = resolved.module.to(device)
    with HDF5Dataset(config.data_path, config.data) as ds:
        info = ds.info
        _check_input_width(model, info.input_shape)
        modules = candidate_layers(model, config.layers, config.exclude)
        context = {
            "model": {"path": str(config.model_path), "sha256": sha256_file(config.model_path), "format": ckpt.format,
                      "architecture": resolved.architecture, "num_parameters": resolved.num_parameters,
                      "assumptions": list(resolved.assumptions)},
            "data": {"path": str(config.data_path), "sha256": sha256_file(config.data_path), "x_key": info.x_key,
                     "y_key": info.y_key, "num_samples": info.num_samples, "input_shape": list(info.input_shape),
                     "target_dim": info.target_dim},
            "device": str(device), "batch_size": config.batch_size,
        }  # fmt: skip
        start, stop = 0, info.num_samples
        if ctx is not None:
            distributed.agree(ctx, "checkpoints (sha256)", context["model"]["sha256"])
            distributed.agree(ctx, "data files (sha256)", context["data"]["sha256"])
            context["world_size"] = ctx.world_size
            start, stop = distributed.shard(info.num_samples, config.batch_size, ctx)
            if start >= stop:  # reported to every rank by sync_errors, so that none waits for this one
                no_rows = OptionsError(
                    f"{info.num_samples} rows in batches of {config.batch_size} leave rank {ctx.rank} of "
                    f"{ctx.world_size} without data; lower --batch-size or use fewer processes."
                )
                distributed.sync_errors(ctx, no_rows)
        writer_factory = None
        store_path = config.features_path
        if store_path is not None:
            store_attrs = {"model_sha256": context["model"]["sha256"], "data_sha256": context["data"]["sha256"],
                           "context": context}  # fmt: skip
            if ctx is not None:
                store_path = Path(distributed.shard_path(store_path, ctx))
            writer_factory = functools.partial(FeatureStoreWriter, store_path, stop - start, attrs=store_attrs,
                                               compression=config.features_compression)  # fmt: skip
        batches = ((a - start, x, y) for a, x, y in ds.batches(config.batch_size, start, stop))  # shard-local rows
        error: NrcAuditError | None = None
        try:
            stats = extraction_pass(model, modules, batches, device=device, target_dim=info.target_dim,
                                    input_shape=info.input_shape, num_rows=stop - start, writer_factory=writer_factory,
                                    progress=progress if ctx is None or ctx.is_main else None)  # fmt: skip
        except NrcAuditError as exc:
            if ctx is None:
                raise
            error = exc
    if ctx is not None:
        try:
            distributed.sync_errors(ctx, error)
        except BaseException:  # another rank failed: no complete-looking shard of this one stays behind
            if store_path is not None:
                Path(store_path).unlink(missing_ok=True)
            raise
        distributed.merge_pass(ctx, stats, device)
        if config.features_path is not None:
            distributed.barrier(ctx)
            if ctx.is_main:
                shards = [distributed.shard_path(config.features_path, distributed.DistContext(r, ctx.world_size, "", False))
                          for r in range(ctx.world_size)]  # fmt: skip
                distributed.write_master_store(config.features_path, shards, info.num_samples)
            distributed.barrier(ctx)
    try:
        return build_report(stats, config.analysis, context)
    except NrcAuditError:  # unusable after all (e.g. constant targets): leave no output behind
        if config.features_path is not None and (ctx is None or ctx.is_main):
            Path(config.features_path).unlink(missing_ok=True)
        raise


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def extraction_pass(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    batches: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    target_dim: int,
    input_shape: tuple[int, ...],
    num_rows: int | None = None,
    writer_factory: Callable[[list[LayerInfo]], FeatureStoreWriter] | None = None,
    progress: ProgressHook | None = None,
) -> PassStatistics:
    """The one pass: forward each ``(first_row, x (B, …), y (B, t))`` batch with hooks, accumulate the
    float64 statistics of every layer, and hand the features to the store writer (if any)."""
    stats, writer = PassStatistics(), None
    dtype = _model_dtype(model)
    reader = _Prefetcher(batches, pin=device.type == "cuda")  # reads batch k+1 while batch k is computed
    try:
        with FeatureExtractor(model, modules) as extractor:
            for start, x, y in reader:
                x = x.to(device, dtype=dtype if x.is_floating_point() else None, non_blocking=True)
                y = y.to(device, dtype=torch.float64, non_blocking=True).reshape(len(y), -1)  # (B, t)
                out, feats = _forward(extractor, x, start, input_shape)
                out = _check_output(out, target_dim)
                layers = extractor.layers or []
                if writer is None and writer_factory is not None:
                    writer = writer_factory(layers)
                if writer is not None:  # queued first: the writer thread works while this batch's Grams run
                    writer.write(start, out, y, feats)
                stats.update(layers, out, y, feats)
                if progress is not None:
                    progress(start + len(y), num_rows or 0)
        stats.flush()
    except BaseException:  # unusable input, interruption, a bug: no partial store; an earlier one is kept
        reader.close()
        if writer is not None:
            writer.discard()
        raise
    reader.close()
    if writer is not None:
        writer.close(complete=True)
    return stats


class _Prefetcher:
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

    def __iter__(self) -> "_Prefetcher":
        return self

    def __next__(self):
        item, exc = self._queue.get()
        if exc is not None:
            raise exc
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        lifecycle.join(self._thread)  # with a timeout: a read stuck in C (a FIFO) must not hold the exit


def _forward(extractor: FeatureExtractor, x: torch.Tensor, start: int, shape: tuple[int, ...]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    try:
        return extractor.run(x)
    except NrcAuditError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDataMismatchError(
            f"the model failed on the batch starting at row {start} (per-sample input shape {shape}): "
            f"{first_line}. Check that the data are in the model's input space and the checkpoint matches."
        ) from None


def reanalyze(store_path: Path, analysis: AnalysisOptions, batch_size: int = 4096,
              progress: ProgressHook | None = None) -> Report:  # fmt: skip
    """Recompute the report from a complete feature store alone, without the model or the data file."""
    analysis.validate()
    stats = PassStatistics()
    with FeatureStore(store_path) as store:
        context = dict(store.context)
        for start, out, y, feats in store.batches(batch_size):
            stats.update(store.layers, out, y, feats)
            if progress is not None:
                progress(start + len(y), store.n)
    return build_report(stats, analysis, context)


def build_report(stats: PassStatistics, analysis: AnalysisOptions, context: dict[str, Any]) -> Report:
    """Statistics + options → the typed report (conditions per layer, target block, summary, gate)."""
    tm = stats.targets.moments
    if tm is None:
        raise OptionsError("no samples were audited")
    n, _, s_yy = tm.to_numpy()
    t = s_yy.shape[0]
    target = target_summary(s_yy, n, analysis.rank_energy)
    if target.rank_estimate == 0:
        raise NrcAuditError(
            f"the targets are constant over the {n} audited samples (zero variance); there is nothing to regress. "
            "Check --y-key and --limit."
        )
    if analysis.rank is None:
        k, source = t, "target_dim"
    elif analysis.rank == "auto":
        k, source = target.rank_estimate, "auto"
    else:
        k, source = int(analysis.rank), "user"
    if analysis.require_collapsed > len(stats.layers):
        raise OptionsError(
            f"--require-collapsed {analysis.require_collapsed} exceeds the {len(stats.layers)} audited layers; "
            f"pass a number between 0 and {len(stats.layers)}."
        )
    model_mse = stats.sse / (n * t)
    model_info = dict(context["model"], assumptions=list(context["model"].get("assumptions", [])))
    if any(layer.pooled for layer in stats.layers) and POOLING_NOTE not in model_info["assumptions"]:
        model_info["assumptions"].append(POOLING_NOTE)
    rows = []
    for layer, acc in zip(stats.layers, stats.joint):
        m = layer_metrics(acc.finalize(), layer.weight.numpy(), k, model_mse, analysis.pinv_rtol, analysis.thresholds)
        rows.append(LayerReport.from_metrics(layer.index, layer.name, layer.kind, layer.in_dim, layer.out_dim,
                                             layer.pooled, m))  # fmt: skip
    collapsed = [r.collapsed for r in rows]
    passed, failing = gate(collapsed, analysis.require_collapsed)
    summary = Summary(
        num_layers=len(rows),
        collapsed_layers=[r.index for r in rows if r.collapsed],
        not_collapsed_layers=[r.index for r in rows if not r.collapsed],
        collapse_onset=collapse_onset(collapsed),
        gate=Gate(analysis.require_collapsed, passed, failing),
    )
    settings = {
        **({"world_size": context["world_size"]} if "world_size" in context else {}),
        "rank": k, "rank_source": source, "device": context.get("device", "cpu"),
        "batch_size": context.get("batch_size", 0), "pinv_rtol": analysis.pinv_rtol,
        "rank_energy": analysis.rank_energy, "require_collapsed": analysis.require_collapsed,
        "thresholds": analysis.thresholds.to_dict(),
    }  # fmt: skip
    return Report(
        tool={"name": "nrc-audit", "version": __version__},
        model=model_info, data=context["data"], settings=settings, target=target,
        model_mse=model_mse, layers=rows, summary=summary,
    )  # fmt: skip
