"""Hugging Face ``save_pretrained`` folders built by transformers' own loader, so that its key renames apply.

transformers 5 keeps some weights under other names in memory than on disk (Mixtral's experts are fused
into one tensor when loaded, and split again by ``save_pretrained``); only ``from_pretrained`` knows the
mapping. It is called on the local folder only (``local_files_only``; a class of the installed transformers,
never remote code), and any weight it
had to leave at its random initialisation, or could not place, is refused: that would audit a network that
was never trained.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from nrc_audit.errors import CheckpointError
from nrc_audit.io.checkpoint import Checkpoint
from nrc_audit.io.hf_layout import HF_CONFIG_KEY
from nrc_audit.models.base import ResolvedModel


def _transformers() -> Any | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _is_pretrained(module: nn.Module) -> bool:
    """Without importing transformers (slow, and only needed when the model is one of its classes)."""
    return _is_pretrained_class(type(module))


def _architecture(ckpt: Checkpoint) -> str | None:
    """The one class name config.json gives under ``architectures`` for a folder, else None."""
    if not Path(ckpt.path).is_dir() or HF_CONFIG_KEY not in ckpt.metadata:
        return None
    names = json.loads(ckpt.metadata[HF_CONFIG_KEY]).get("architectures")
    ok = isinstance(names, list) and len(names) == 1 and isinstance(names[0], str)
    return names[0] if ok else None


def unbuilt_hint(ckpt: Checkpoint) -> str:
    """For the "matches no known architecture" error: a folder naming a transformers class without transformers."""
    name = _architecture(ckpt)
    if name is None or _transformers() is not None:
        return ""
    return f" Its config.json names transformers.{name}: install transformers and nrc-audit builds it from the folder."


def resolve(ckpt: Checkpoint) -> ResolvedModel | None:
    """The model a ``save_pretrained`` folder's ``config.json`` names (``architectures``), loaded by
    ``from_pretrained``; None when this is no such folder, the class is unknown or transformers is absent."""
    folder, name = Path(ckpt.path), _architecture(ckpt)
    transformers = _transformers() if name is not None else None
    if name is None or transformers is None:
        return None
    try:
        cls = getattr(transformers, name, None)
    except Exception as exc:  # noqa: BLE001 - transformers imports model classes lazily; their imports may fail
        raise CheckpointError(f"{folder}: config.json names transformers.{name}, which the installed "
                              f"transformers cannot import ({type(exc).__name__}: {str(exc)[:200]}).") from None
    if not (isinstance(cls, type) and _is_pretrained_class(cls)):
        return None
    module = _from_pretrained(cls, folder)
    return ResolvedModel(module, f"transformers:{name}", [
        f"built by transformers.{name}.from_pretrained from the folder's config.json and weights "
        "(transformers' own key mapping applied)"])  # fmt: skip


def _is_pretrained_class(cls: type) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in cls.__mro__)


def reload(module: nn.Module, folder: Path) -> nn.Module | None:
    """A ``--model-def`` result that is a transformers model, reloaded by ``from_pretrained`` with its own
    config when the folder's keys are not its module names (renamed on disk); None if it is no such model."""
    if not _is_pretrained(module) or not Path(folder).is_dir():
        return None
    return _from_pretrained(type(module), Path(folder), config=module.config)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' logging and progress bars off: what its loader would warn about is reported here."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: type, folder: Path, **kwargs: Any) -> nn.Module:
    try:
        with _quiet():
            module, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a library's loader: its failure is an unusable checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: transformers could not load {cls.__name__} from the folder "
                              f"({type(exc).__name__}: {first[:300]}).") from None  # fmt: skip
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        listed = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items()) or str(info["error_msgs"])
        raise CheckpointError(
            f"{folder}: the weights do not fit transformers.{cls.__name__}: {listed}. Weights left at their random "
            "initialisation would be audited as if trained; check that config.json belongs to these weights."
        )
    return module
