"""Hugging Face layouts on top of :func:`load_checkpoint`: ``save_pretrained`` folders, sharded weights
(``model.safetensors.index.json`` + shards) and a ``config.json`` next to the weights.

The config is kept as JSON text in the checkpoint's metadata (:data:`HF_CONFIG_KEY`); ``--model-def``
callables with a ``config`` parameter receive it as a dict (see the README recipe).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nrc_audit.errors import CheckpointError
from nrc_audit.io.checkpoint import Checkpoint, load_checkpoint, sha256_file, strip_wrappers

HF_CONFIG_KEY = "nrc_audit.hf_config"  # metadata entry holding config.json's text
CONFIG_NAME = "config.json"
CONFIG_MAX_BYTES = 16 << 20  # a config is a few KiB; anything this large is not one
# A save_pretrained folder's weights, in the order transformers itself prefers them.
FOLDER_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                  "pytorch_model.bin")  # fmt: skip


def load_model_files(path: Path) -> Checkpoint:
    """A checkpoint file, a sharded index (``*.index.json``) or a ``save_pretrained`` folder → one Checkpoint.

    Raises:
        CheckpointError: a folder without weights, an index naming missing shards or leaving keys out,
            a key found in two shards, or an unreadable ``config.json``.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in FOLDER_WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"checkpoint not found: {path} is a folder without weights; expected one of {list(FOLDER_WEIGHTS)} (a save_pretrained "
                "folder), or pass the checkpoint file itself."
            )
    else:
        weights = path
    ckpt = _load_index(weights) if weights.name.endswith(".index.json") else load_checkpoint(weights)
    ckpt.path = path
    config = weights.parent / CONFIG_NAME
    if config.is_file():
        ckpt.metadata[HF_CONFIG_KEY] = _read_config(config)
        ckpt.notes.append(f"{CONFIG_NAME} found next to the weights (passed to --model-def callables as config=)")
    return ckpt


def _read_config(path: Path) -> str:
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise CheckpointError(f"{path} is over {CONFIG_MAX_BYTES >> 20} MiB; that is not a model config.")
    try:
        text = path.read_text(encoding="utf-8")
        if not isinstance(json.loads(text), dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON object ({exc}); fix or remove it.") from None
    return text


def _load_index(index: Path) -> Checkpoint:
    """Sharded weights: every shard named in the index's ``weight_map``, merged into one state dict."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index} is not a shard index ({type(exc).__name__}: {exc}); expected {{\"weight_map\": {{key: file}}}} "
            "as written by save_pretrained."
        ) from None
    folder = index.parent.resolve()
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]
    if bad:
        raise CheckpointError(f"{index}: shards {bad} are missing or not plain file names in {folder}.")
    merged: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    notes: list[str] = []
    fmt = "safetensors"
    for shard in shards:
        part = load_checkpoint(folder / shard)
        twice = sorted(set(part.state_dict) & set(merged))
        if twice:
            raise CheckpointError(f"{index}: keys {twice} appear in more than one shard.")
        merged.update(part.state_dict)
        metadata.update(part.metadata)
        notes.extend(n for n in part.notes if n not in notes)  # e.g. a prefix removed in every shard
        fmt = part.format
    listed = set(strip_wrappers(dict.fromkeys(weight_map), []))  # named as the shards were read
    missing = sorted(listed - set(merged))
    if missing:
        raise CheckpointError(f"{index}: the index lists keys {missing} that no shard holds.")
    return Checkpoint(index, fmt, merged, metadata, [f"weights merged from {len(shards)} shards of {index.name}", *notes])


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a folder: the hash of its files' names and SHA-256s, in name order."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{item.name}\0{sha256_file(item)}\n".encode())
    return digest.hexdigest()
