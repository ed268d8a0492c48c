"""Checkpoint files → a flat state dict plus string metadata (SPEC §1), and the public ``save_checkpoint``.

Formats: ``.safetensors`` (metadata read first through ``safe_open``; aliases that
``safetensors.torch.save_model`` dropped for tied weights restored from it) and ``.pt``/``.pth``/``.bin``
state dicts and Lightning ``.ckpt`` files read with ``torch.load(weights_only=True)`` only — a pickle that
needs code execution is refused. The DDP/torch.compile key prefixes are removed in every format.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import safetensors
from safetensors import safe_open

from nrc_audit.errors import CheckpointError
from nrc_audit.io.fingerprint import fingerprint_metadata
from nrc_audit.io import plan
from nrc_audit.io.pickle_scan import check_pt_pickle
from nrc_audit.io.validate import parse_json

_SafetensorError = getattr(safetensors, "SafetensorError", OSError)

ARCH_KEY = "nrc_audit.arch"  # safetensors metadata key holding the JSON architecture spec
KWARGS_KEY = "nrc_audit.model_kwargs"  # JSON kwargs for --model-def callables
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")  # unwrapped in this order
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile
# torch words it "Unsupported global: GLOBAL pkg.Class" or, for blocked modules such as os/posix,
# "Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked"
_UNSAFE_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")
FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt", ".ckpt": "pt"}


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors on the CPU, metadata strings, and where it came from."""

    path: Path
    format: str  # "safetensors" | "pt"
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what loading did (unwrapped containers, prefixes)
    stripped_prefix: str | None = None  # the Lightning module attribute removed from every key ("model.")

    @property
    def arch(self) -> dict[str, Any] | None:
        """The ``nrc_audit.arch`` JSON spec from the metadata, if any."""
        raw = self.metadata.get(ARCH_KEY)
        if raw is None:
            return None
        spec = parse_json(raw, f"{self.path}: metadata {ARCH_KEY!r}", CheckpointError)  # depth-limited
        if not isinstance(spec, dict) or "family" not in spec:
            raise CheckpointError(f"{self.path}: metadata {ARCH_KEY!r} must be a JSON object with a 'family'.")
        bad = [k for k in ("family", "activation", "head_activation") if not isinstance(spec.get(k), (str, type(None)))]
        if bad:
            raise CheckpointError(
                f"{self.path}: metadata {ARCH_KEY!r} has non-string {bad} ({raw}); expected names such as "
                '{"family": "mlp", "activation": "relu"}. Re-save it with nrc_audit.save_checkpoint(..., arch=...).'
            )
        return spec


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a ``.safetensors`` or ``.pt``/``.pth`` state dict.

    Raises:
        CheckpointError: missing file, unknown extension, corrupt file, or a pickle needing code execution.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Pass a .safetensors or .pt/.pth state dict.")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CheckpointError(
            f"{path}: unknown checkpoint extension {path.suffix!r}; expected .safetensors, .pt, .pth, .bin or "
            "a Lightning .ckpt."
        )
    try:  # plan before allocating: header dtypes/indices, zip inflation; then every loaded tensor (io/plan.py)
        (plan.check_safetensors_header if fmt == "safetensors" else plan.check_pt_archive)(path)
        if fmt == "pt":  # weights_only still allocates what the pickle asks for (bytearray(2e9)): read it first
            check_pt_pickle(path)
        ckpt = _load_safetensors(path) if fmt == "safetensors" else _load_pt(path)
        ckpt.state_dict = strip_wrappers(ckpt.state_dict, ckpt.notes)
        if not ckpt.state_dict:
            raise CheckpointError(f"{path}: the checkpoint holds no tensors.")
        plan.check_state_dict(ckpt.state_dict, path)
        plan.refuse_over_memory(f"{path}: its {len(ckpt.state_dict)} tensors (as float32)",
                                sum(t.numel() * 4 for t in ckpt.state_dict.values()), "Audit on a larger machine.")
    except plan.PlanError as exc:  # callers (and the fuzz tests) see one exception type per input file
        raise CheckpointError(str(exc)) from None
    return ckpt


def _load_safetensors(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (_SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}). Re-save it with safetensors.torch.save_file "
            "or nrc_audit.save_checkpoint."
        ) from None
    notes = [f"tied weight {alias!r} restored from {kept!r} (the file's metadata names it: safetensors "
             "save_model drops shared tensors)" for alias, kept in _tied_aliases(metadata, tensors)]  # fmt: skip
    for alias, kept in _tied_aliases(metadata, tensors):
        tensors[alias] = tensors[kept]
    return Checkpoint(path, "safetensors", tensors, metadata, notes)


def _tied_aliases(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(dropped name, kept name) pairs: ``safetensors.torch.save_model`` records each tensor it dropped
    because it shares storage with a kept one as the metadata entry ``dropped: kept``."""
    return sorted((k, v) for k, v in metadata.items() if k not in tensors and v in tensors)


def _load_pt(path: Path) -> Checkpoint:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the offending class as "Unsupported global: GLOBAL pkg.Class"; any other unpickling
        # failure (garbage bytes, unknown opcodes) is a damaged or foreign file, not an unsafe one
        found = _UNSAFE_GLOBAL.search(str(exc))
        if found is None:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (its pickle stream is damaged or of an unsupported "
                "kind). Re-save it with torch.save(model.state_dict(), path), or convert to .safetensors."
            ) from None
        raise CheckpointError(
            f"{path}: refused to load — the pickle contains a {found[1]} object, and rebuilding it would execute "
            "code. nrc-audit only reads plain state dicts (torch.load(weights_only=True)). Save "
            "model.state_dict() instead, or convert to .safetensors."
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/… for corrupt zips and truncated files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}).") from None
    notes: list[str] = []
    lightning = isinstance(obj, dict) and "state_dict" in obj and (path.suffix.lower() == ".ckpt" or
                                                                  any(str(k).startswith("pytorch-lightning") for k in obj))
    while isinstance(obj, dict):
        inner = next((k for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        notes.append(f"state dict taken from the checkpoint's {inner!r} entry")
        obj = obj[inner]
    if isinstance(obj, dict):
        plan.check_state_dict({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (name → tensor), possibly inside one of {list(CONTAINER_KEYS)}; "
            f"found {type(obj).__name__}. Save model.state_dict()."
        )
    sd, prefix = _strip_lightning_prefix(obj, notes) if lightning else (obj, None)
    return Checkpoint(path, "pt", sd, {}, notes, prefix)


def _strip_lightning_prefix(sd: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """A LightningModule's state dict names its network by attribute (``model.0.weight``): when every key
    starts with one and the same first component, it is removed, so the keys are the network's own."""
    heads = {k.split(".", 1)[0] for k in sd}
    if len(heads) != 1 or not all("." in k for k in sd):
        return sd, None
    prefix = f"{heads.pop()}."
    if prefix in WRAPPER_PREFIXES:  # DDP/compile prefixes are removed later, with their own note
        return sd, None
    notes.append(f"Lightning checkpoint: removed the LightningModule attribute prefix {prefix!r} from every key")
    return {k[len(prefix):]: v for k, v in sd.items()}, prefix


def strip_wrappers(sd: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes when every key has them."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                notes.append(f"removed the {prefix!r} key prefix")
                changed = True
    return sd


def save_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    arch: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    probe_shape: tuple[int, ...] | None = None,
) -> Path:
    """Save ``model.state_dict()`` as safetensors with its architecture spec in the metadata.

    Args:
        model: any ``nn.Module``.
        path: destination ``.safetensors`` file.
        arch: JSON-serialisable spec, e.g. ``{"family": "mlp", "activation": "relu"}``; stored under
            ``nrc_audit.arch`` so that ``nrc-audit`` rebuilds the model without guessing.
        metadata: extra string → string metadata.
        probe_shape: input shape of the seeded probe batch whose outputs are stored as the fingerprint
            (default: (4, in_features) of the first Linear, (4, c_in, 32, 32) of the first Conv2d). The
            module layout is stored too; nrc-audit checks a rebuilt model against both before auditing.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> save_checkpoint(net, "mlp.safetensors", arch={"family": "mlp", "activation": "relu"})  # doctest: +SKIP
        PosixPath('mlp.safetensors')
    """
    path = Path(path)
    meta = {**fingerprint_metadata(model, probe_shape), **(metadata or {})}
    if arch is not None:
        if "family" not in arch:
            raise ValueError("arch must name a 'family' (e.g. 'mlp' or 'resnet')")
        meta[ARCH_KEY] = json.dumps(arch, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.write_bytes(_safetensors_bytes(tensors, meta))
    return path


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}  # fmt: skip


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding with sorted keys, so equal models give byte-identical files (and SHA-256).

    ``safetensors.torch.save_file`` writes the metadata in hash-map order, which changes between runs.
    Layout: u64 little-endian header size, JSON header (space-padded to 8 bytes), tensor bytes in key order.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(chunks)
