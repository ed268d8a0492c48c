"""Sharded audits under ``torchrun`` (SPEC §8): shard rows, accumulate per rank, merge exactly.

Every NRC quantity is a function of per-layer (n, μ, S) triples, so a sharded audit is exact: each rank
streams a contiguous block of whole batches, then the triples are all-gathered (float64 tensors, NCCL on
GPUs, gloo on CPUs) and merged *in rank order* with the same Chan formula as batches. Shards are made of
whole batches so that every batch holds the same rows as in a single-process run with the same
``--batch-size``: the model's own float32 forward pass then sees identical inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from datetime import timedelta
from typing import Any

import h5py
import torch

from nrc_audit.config import AuditConfig
from nrc_audit.errors import NrcAuditError, OptionsError, PlanError
from nrc_audit.core.stats import Accumulator, Moments, PassStatistics, distinct, shared_accumulators
from nrc_audit.engine.pipeline import ProgressHook, opened, pass_rows
from nrc_audit.io.files import write_with
from nrc_audit.outputs.context import RunContext
from nrc_audit.io.validate import env_int

TIMEOUT_ENV = "NRC_AUDIT_DIST_TIMEOUT"
# How long a rank waits for the others in a collective (gloo/NCCL timeout) and at the rendezvous. Ranks of
# one audit stream equal shards, so they reach each collective close together; a dead rank is noticed at
# once through its closed connections, and the timeout is the bound for everything else.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    backend: str
    owns_group: bool  # this package initialised the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def audit_sharded(config: AuditConfig, device: torch.device, ctx: DistContext,
                  progress: ProgressHook | None = None) -> tuple[PassStatistics, RunContext]:  # fmt: skip
    """The single-process pass on this rank's shard of whole batches, wrapped in the exact merge over ranks.

    Returns the statistics of all rows (the same on every rank) and the run context; with a feature store,
    every rank has completed its shard and rank 0 has written the master store over them."""
    error: NrcAuditError | None = None
    store: str | None = None
    with opened(config, device) as inputs:
        num_samples = inputs.ds.info.num_samples
        agree(ctx, "checkpoints (sha256)", inputs.context.model.sha256)
        agree(ctx, "data files (sha256)", inputs.context.data.sha256)
        if len(inputs.groups) > 1:
            raise PlanError("the memory plan needs several passes over the data, which the sharded (torchrun) audit "
                            "does not run; raise NRC_AUDIT_MAX_MEMORY, audit fewer layers (--layers/--exclude), or "
                            "audit in one process.")
        inputs = replace(inputs, context=replace(inputs.context, world_size=ctx.world_size))
        start, stop = shard(num_samples, config.batch_size, ctx)
        if start >= stop:  # reported to every rank by sync_errors, so that none waits for this one
            sync_errors(ctx, OptionsError(
                f"{num_samples} rows in batches of {config.batch_size} leave rank {ctx.rank} of "
                f"{ctx.world_size} without data; lower --batch-size or use fewer processes."
            ))  # fmt: skip
        if config.features_path is not None:
            store = shard_path(config.features_path, ctx.rank, ctx.world_size)
        try:
            done = pass_rows(config, inputs, device, (start, stop), None if store is None else Path(store),
                             progress if ctx.is_main else None)  # fmt: skip
            if done.writer is not None:  # every shard complete before rank 0 links them into the master store
                done.writer.close(complete=True, now=True)
        except NrcAuditError as exc:
            error = exc
    try:
        sync_errors(ctx, error)
    except BaseException:  # another rank failed: no complete-looking shard of this one stays behind
        if store is not None:
            Path(store).unlink(missing_ok=True)
        raise
    merge_pass(ctx, done.stats, device)
    if config.features_path is not None:
        barrier(ctx)
        if ctx.is_main:
            shards = [shard_path(config.features_path, r, ctx.world_size) for r in range(ctx.world_size)]
            write_master_store(config.features_path, shards, num_samples)
        barrier(ctx)
    return done.stats, done.context


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 1e7:  # also NaN and inf
        raise OptionsError(f"{TIMEOUT_ENV}={raw[:40]!r}: expected a number of seconds > 0 (default "
                           f"{DEFAULT_TIMEOUT_S:g}).")  # fmt: skip
    return timedelta(seconds=seconds)


def from_env(device: torch.device) -> DistContext | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else None."""
    if env_int("WORLD_SIZE", 1) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise OptionsError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process.")
    owns = not dist.is_initialized()
    if owns:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise OptionsError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: this process was not started "
                "by torchrun's rendezvous. Launch with `torchrun --nproc-per-node N -m nrc_audit …`, or unset WORLD_SIZE."
            )
        env_int("RANK", 0)  # a junk RANK is named before torch reads it
        timeout = _timeout()
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as exc:  # DistNetworkError / DistStoreError are RuntimeErrors
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OptionsError(
                f"rank {os.environ.get('RANK')} could not join the process group at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} ({first}). Start every rank with torchrun (same MASTER_ADDR/PORT); "
                f"{TIMEOUT_ENV} sets how long ranks wait for each other (default {DEFAULT_TIMEOUT_S:g} s)."
            ) from None
    return DistContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()), owns)


def joined_group() -> DistContext | None:
    """The process group the caller already initialised (a training framework's), when it has > 1 rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()), owns_group=False)


def combined_digest(ctx: DistContext, hexdigest: str) -> str:
    """SHA-256 over every rank's shard digest, in rank order: the same on all ranks, names all the rows."""
    import hashlib
    import torch.distributed as dist

    digests: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(digests, hexdigest)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    return device


def shard(num_rows: int, batch_size: int, ctx: DistContext) -> tuple[int, int]:
    """Rows [start, stop) of this rank: a contiguous block of whole batches (the last rank takes the rest)."""
    num_batches = -(-num_rows // batch_size)
    first = num_batches * ctx.rank // ctx.world_size
    last = num_batches * (ctx.rank + 1) // ctx.world_size
    return min(first * batch_size, num_rows), min(last * batch_size, num_rows)


def _gather(ctx: DistContext, tensor: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def agree(ctx: DistContext, what: str, value: str) -> None:
    """Fail on every rank, naming the ranks that differ, unless all ranks hold the same ``value``."""
    import torch.distributed as dist

    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        listing = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise NrcAuditError(
            f"the ranks were given different {what} ({listing}). Every rank must audit the same checkpoint and "
            "data file: pass identical paths (on a shared file system) to every process."
        )


def merge_pass(ctx: DistContext, stats: PassStatistics, device: torch.device) -> None:
    """Replace this rank's statistics by the merge over all ranks, in rank order, by the fields' merge rules.

    Every rank streamed ≥ 1 batch (see :func:`shard`), so all ranks hold the same layers and widths: each
    packs its pass into one float64 vector, one all-gather moves them, and :meth:`PassStatistics.merge_from`
    (Chan's formula for the moments, sums for the counts) folds them exactly as it folds batches.
    """
    stats.flush()
    parts = [_unpack(part.cpu(), stats) for part in _gather(ctx, _pack(stats).to(device))]
    total = PassStatistics()
    for part in parts:
        total.merge_from(part)
    stats.joint, stats.targets, stats.sse, stats.n = total.joint, total.targets, total.sse, total.n


def _moments(acc: Accumulator) -> Moments:
    """An accumulator's moments; every rank streamed ≥ 1 batch (:func:`shard`), so none is empty."""
    m = acc.moments
    if m is None:
        raise NrcAuditError("a rank finished its shard without a single row; this is a bug in nrc-audit.")
    return m


def _accumulators(stats: PassStatistics) -> list[Accumulator]:
    return [*(acc for (acc,) in distinct(stats.layers, stats.joint)), stats.targets]  # a shared state once


def _pack(stats: PassStatistics) -> torch.Tensor:
    """[sse, n, then per accumulator: n, bad, μ (p,), S (p·p,)] as one float64 vector."""
    pieces = [torch.tensor([stats.sse, float(stats.n)], dtype=torch.float64)]
    for acc in _accumulators(stats):
        m = _moments(acc)
        head = torch.tensor([float(m.n), float(acc.nonfinite_rows)], dtype=torch.float64)
        pieces += [head, m.mean.cpu(), m.scatter.cpu().reshape(-1)]
    return torch.cat(pieces)


def _unpack(packed: torch.Tensor, like: PassStatistics) -> PassStatistics:
    """One rank's :class:`PassStatistics` from its :func:`_pack` vector (shapes from this rank's ``like``)."""
    out = PassStatistics(layers=like.layers, joint=shared_accumulators(like.layers),
                         sse=float(packed[0]), n=int(packed[1]))  # fmt: skip
    at = 2
    for acc, mine in zip(_accumulators(out), _accumulators(like)):
        p = _moments(mine).dim
        n, bad = int(packed[at]), int(packed[at + 1])
        mean, scatter = packed[at + 2 : at + 2 + p], packed[at + 2 + p : at + 2 + p + p * p].reshape(p, p)
        acc.moments = Moments(n, mean.clone(), scatter.clone()) if n else None
        acc.nonfinite_rows = bad
        at += 2 + p + p * p
    return out


def sync_errors(ctx: DistContext, error: NrcAuditError | None) -> None:
    """Make a usage error on one rank fail every rank (instead of leaving the others waiting in a collective)."""
    import torch.distributed as dist

    messages: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise NrcAuditError(f"rank {rank} failed: {message}")


def barrier(ctx: DistContext) -> None:
    import torch.distributed as dist

    dist.barrier()


def close(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def shard_path(path: os.PathLike, rank: int, world_size: int) -> str:
    """The store file of one rank's shard, beside the master store ``path``."""
    base = os.fspath(path)
    stem = base[:-3] if base.endswith(".h5") else base
    return f"{stem}.rank{rank}-of-{world_size}.h5"


def write_master_store(path: os.PathLike, shard_files: list[str], num_rows: int) -> None:
    """Rank 0: a master feature store whose datasets are HDF5 virtual datasets over the rank shards.

    Sources are named relative to the master's folder, so the set of files can be moved together.
    """
    write_with(path, lambda tmp: _write_master(tmp, shard_files, num_rows), suffix=".h5",
               now=True)  # beside the target; at once: a report failure afterwards removes it  # fmt: skip


def _write_master(path: os.PathLike, shard_files: list[str], num_rows: int) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with h5py.File(shard_files[0], "r") as first, h5py.File(path, "w") as out:
        for key, value in first.attrs.items():
            out.attrs[key] = value
        out.attrs["complete"] = False
        out.attrs["shards"] = [os.path.relpath(s, folder) for s in shard_files]
        first.copy("weights", out)
        names = ["targets", "outputs"] + [f"layers/{k}" for k in first["layers"]]
        for name in names:
            width, dtype = first[name].shape[1], first[name].dtype
            layout = h5py.VirtualLayout(shape=(num_rows, width), dtype=dtype)
            offset = 0
            for shard_file in shard_files:
                with h5py.File(shard_file, "r") as src:
                    rows = src[name].shape[0]
                source = h5py.VirtualSource(os.path.relpath(shard_file, folder), name, shape=(rows, width))
                layout[offset : offset + rows] = source
                offset += rows
            out.create_virtual_dataset(name, layout)
            out[name].attrs.update(dict(first[name].attrs))
        out.attrs["complete"] = all(_complete(s) for s in shard_files)


def _complete(path: str) -> bool:
    with h5py.File(path, "r") as fh:
        return bool(fh.attrs.get("complete", False))
