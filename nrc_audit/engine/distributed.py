"""Sharded audits under ``torchrun`` (SPEC §8): shard rows, accumulate per rank, merge exactly.

Every NRC quantity is a function of per-layer (n, μ, S) triples, so a sharded audit is exact: each rank
streams a contiguous block of whole batches, then the triples are all-gathered (float64 tensors, NCCL on
GPUs, gloo on CPUs) and merged *in rank order* with the same Chan formula as batches. Shards are made of
whole batches so that every batch holds the same rows as in a single-process run with the same
``--batch-size``: the model's own float32 forward pass then sees identical inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import h5py
import torch

from nrc_audit.errors import NrcAuditError, OptionsError
from nrc_audit.core.stats import Moments, merge
from nrc_audit.io.files import write_with

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


def env_rank() -> int:
    """This process's rank from the torchrun environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def from_env(device: torch.device) -> DistContext | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
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
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
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


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
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


def merge_moments(ctx: DistContext, m: Moments | None, p: int, device: torch.device) -> Moments | None:
    """All-gather each rank's (n, μ (p,), S (p, p)) and merge them in rank order (Chan's formula)."""
    packed = torch.zeros(1 + p + p * p, dtype=torch.float64, device=device)
    if m is not None and m.n > 0:
        packed[0] = m.n
        packed[1 : 1 + p] = m.mean.to(device)
        packed[1 + p :] = m.scatter.to(device).reshape(-1)
    total: Moments | None = None
    for part in _gather(ctx, packed):
        part = part.cpu()
        n = int(part[0])
        if n:
            total = merge(total, Moments(n, part[1 : 1 + p].clone(), part[1 + p :].reshape(p, p).clone()))
    return total


def sum_scalars(ctx: DistContext, values: Sequence[float], device: torch.device) -> list[float]:
    """Sum scalars over ranks (float64), in rank order for reproducibility."""
    parts = _gather(ctx, torch.tensor(list(values), dtype=torch.float64, device=device))
    return torch.stack([p.cpu() for p in parts]).sum(dim=0).tolist()


def merge_pass(ctx: DistContext, stats: Any, device: torch.device) -> None:
    """Replace a rank's PassStatistics-like object (joint, targets, sse, n) by the merge over all ranks."""
    for acc in [*stats.joint, stats.targets]:  # every rank streamed ≥ 1 batch (see shard), so dims are known
        acc.moments = merge_moments(ctx, acc.moments, acc.moments.dim, device)
    bad = sum_scalars(ctx, [float(a.nonfinite_rows) for a in stats.joint] or [0.0], device)
    for acc, value in zip(stats.joint, bad):
        acc.nonfinite_rows = int(value)
    stats.sse, n = sum_scalars(ctx, [stats.sse, float(stats.n)], device)
    stats.n = int(n)


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


def shard_path(path: os.PathLike, ctx: DistContext) -> str:
    base = os.fspath(path)
    stem = base[:-3] if base.endswith(".h5") else base
    return f"{stem}.rank{ctx.rank}-of-{ctx.world_size}.h5"


def write_master_store(path: os.PathLike, shard_files: list[str], num_rows: int) -> None:
    """Rank 0: a master feature store whose datasets are HDF5 virtual datasets over the rank shards.

    Sources are named relative to the master's folder, so the set of files can be moved together.
    """
    write_with(path, lambda tmp: _write_master(tmp, shard_files, num_rows), suffix=".h5")  # beside the target


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
