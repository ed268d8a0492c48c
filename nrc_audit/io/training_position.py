"""Where in training a checkpoint was saved, read from the checkpoint itself (never from its file name).

Sources, first found wins:

- a Hugging Face ``checkpoint-N/`` folder (or a file inside one): ``trainer_state.json``'s ``global_step`` and
  ``epoch``;
- ``.safetensors``: ``__metadata__`` entries ``global_step`` / ``step`` and ``epoch`` (header only, no tensor read);
- Lightning ``.ckpt`` and ``.pt``/``.pth``/``.bin`` dicts: top-level ``global_step`` / ``step`` and ``epoch``,
  read with ``torch.load(weights_only=True)`` (memory-mapped: the tensors are not read).

A checkpoint whose position cannot be read gets ``None`` fields: ordering then falls back to the file names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


TRAINER_STATE = "trainer_state.json"  # written by transformers.Trainer into every checkpoint-N folder
STATE_MAX_BYTES = 64 << 20  # a trainer state is KiBs to a few MiBs (its log history); larger is not one
STEP_KEYS = ("global_step", "step")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


@dataclass(frozen=True)
class TrainingPosition:
    """A checkpoint's place in its run: optimiser ``step`` and ``epoch`` (either may be unknown), and where
    they were read (``"trainer_state.json"``, ``"safetensors metadata"``, ``"checkpoint dict"``)."""

    step: int | None = None
    epoch: float | None = None
    source: str | None = None


def training_position(path: Path) -> TrainingPosition:
    """The training position stored in (or beside) the checkpoint ``path``; empty when none is stored.

    Example:
        >>> training_position(Path("run/checkpoint-500"))          # doctest: +SKIP
        TrainingPosition(step=500, epoch=2.0, source='trainer_state.json')
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / TRAINER_STATE).is_file():
        found = _from_mapping(_read_trainer_state(folder / TRAINER_STATE), TRAINER_STATE)
        if found.step is not None or found.epoch is not None:
            return found
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        return training_position(weights) if weights is not None else TrainingPosition()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _from_mapping(_safetensors_metadata(path), "safetensors metadata")
    if suffix in _PICKLE_SUFFIXES:
        return _from_mapping(_checkpoint_dict(path), "checkpoint dict")
    return TrainingPosition()


def _from_mapping(raw: Mapping[str, Any], source: str) -> TrainingPosition:
    step = next((s for s in (_number(raw.get(k)) for k in STEP_KEYS) if s is not None), None)
    epoch = _number(raw.get("epoch"))
    if step is None and epoch is None:
        return TrainingPosition()
    return TrainingPosition(None if step is None else int(step), epoch, source)


def _number(value: Any) -> float | None:
    """An int/float, or a string holding one (safetensors metadata values are strings); else None."""
    if isinstance(value, bool):
        return None
    if hasattr(value, "numel") and value.numel() == 1:  # a one-element tensor (torch is not imported here)
        value = value.item()
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _read_trainer_state(path: Path) -> Mapping[str, Any]:
    try:
        if path.stat().st_size > STATE_MAX_BYTES:
            return {}
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _safetensors_metadata(path: Path) -> Mapping[str, Any]:
    from safetensors import safe_open  # the header only: tensors are read on demand, and none is asked for

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # a damaged file has no readable position; the audit itself reports the damage
        return {}


def _checkpoint_dict(path: Path) -> Mapping[str, Any]:
    import torch

    from nrc_audit.errors import PlanError
    from nrc_audit.io import plan  # imports torch: kept out of the module so that history reading stays light

    try:
        plan.check_pt_archive(path)  # a crafted archive must not inflate here either
    except PlanError:
        return {}
    for mmap in (True, False):  # mmap needs torch's zip format; legacy pickles load without it
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # unsafe or damaged pickles: no position (the audit refuses them with the reason)
            continue
        return obj if isinstance(obj, dict) else {}
    return {}
