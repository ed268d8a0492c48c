"""Checkpoint → ``nn.Module`` (SPEC §1): ``--model-def``, then ``nrc_audit.arch`` metadata, then key detection."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from nrc_audit.config import ModelOptions
from nrc_audit.errors import CheckpointError, Interrupted, ModelDataMismatchError, NrcAuditError
from nrc_audit.io.validate import json_object_of_scalars
from nrc_audit.io.checkpoint import KWARGS_KEY, Checkpoint
from nrc_audit.models import mlp as mlp_family
from nrc_audit.models.base import ResolvedModel, load_strict

DEFAULT_ACTIVATION = "relu"


def resolve_model(ckpt: Checkpoint, opts: ModelOptions) -> ResolvedModel:
    """Build the model the checkpoint describes and load its weights strictly.

    Raises:
        CheckpointError: unknown architecture (the message names ``--model-def``), or keys/shapes that
            do not fit the architecture (all problems listed in one message).
    """
    if opts.model_def:
        resolved = _from_model_def(ckpt, opts)
    else:
        arch = ckpt.arch or {}
        family = arch.get("family")
        builders: dict[str, Callable[[Checkpoint, dict, ModelOptions], ResolvedModel | None]] = {
            "mlp": _build_mlp,
            "resnet": _build_resnet,
        }
        if family is not None and family not in builders:
            raise CheckpointError(
                f"{ckpt.path}: metadata names architecture family {family!r}, which nrc-audit cannot build "
                f"(known: {sorted(builders)}). Pass --model-def module:callable to build it yourself."
            )
        order = [family] if family else list(builders)
        resolved = next((r for f in order if (r := builders[f](ckpt, arch, opts)) is not None), None)
        if resolved is None:
            keys = list(ckpt.state_dict)
            shown = ", ".join(keys[:6]) + (", …" if len(keys) > 6 else "")
            what = f"does not match the {family!r} architecture in its metadata" if family else \
                "matches no known architecture (MLP chain of N.weight keys, torchvision-style ResNet)"
            raise CheckpointError(
                f"{ckpt.path}: the state dict ({len(keys)} tensors: {shown}) {what}. "
                "Pass --model-def path/to/file.py:build_model (or package.module:callable) returning the "
                "nn.Module; its state dict is then loaded strictly."
            )
    resolved.assumptions[:0] = ckpt.notes
    resolved.module.eval()
    return resolved


def _activation(arch: dict, opts: ModelOptions, assumptions: list[str]) -> str:
    name = opts.activation or arch.get("activation")
    if name is None:
        name = DEFAULT_ACTIVATION
        assumptions.append(f"activation {name!r} assumed (not in the checkpoint metadata; set --activation)")
    if name not in mlp_family.ACTIVATIONS:
        raise CheckpointError(
            f"activation {name!r} is unknown; choose one of {sorted(mlp_family.ACTIVATIONS)}."
        )
    return name


def _build_mlp(ckpt: Checkpoint, arch: dict, opts: ModelOptions) -> ResolvedModel | None:
    spec = mlp_family.detect_mlp(ckpt.state_dict)
    if spec is None:
        return None
    assumptions: list[str] = []
    act = _activation(arch, opts, assumptions)
    for a, b in mlp_family.missing_activation_gaps(spec):
        assumptions.append(f"no index is free between Linear {a} and {b}: no activation placed there")
    module = mlp_family.build_mlp(spec, act)
    load_strict(module, ckpt.state_dict, ckpt.path)
    return ResolvedModel(module, spec.describe(act), assumptions)


def _build_resnet(ckpt: Checkpoint, arch: dict, opts: ModelOptions) -> ResolvedModel | None:
    try:
        from nrc_audit.models import resnet
    except ImportError:  # the family is optional until it lands
        return None
    return resnet.resolve(ckpt, arch, opts)


def _from_model_def(ckpt: Checkpoint, opts: ModelOptions) -> ResolvedModel:
    """Call the user's ``file.py:callable`` / ``package.module:callable``. This executes user code."""
    target = opts.model_def or ""
    location, sep, attr = target.rpartition(":")
    if not sep or not location or not attr:
        raise CheckpointError(
            f"--model-def {target!r} is not of the form path/to/file.py:callable or package.module:callable."
        )
    kwargs: dict[str, Any] = {}
    if KWARGS_KEY in ckpt.metadata:
        kwargs.update(json_object_of_scalars(ckpt.metadata[KWARGS_KEY], str(ckpt.path),
                                             f"metadata {KWARGS_KEY!r}", CheckpointError))  # fmt: skip
    kwargs.update(opts.model_kwargs or {})
    factory = getattr(_import_target(location), attr, None)
    if not callable(factory):
        raise CheckpointError(f"--model-def {target!r}: {location} has no callable named {attr!r}.")
    try:
        module = factory(**kwargs)
    except (Interrupted, NrcAuditError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:  # user code is fenced: sys.exit(7) must not become exit 7
        raise CheckpointError(f"--model-def {target!r} raised {user_exception_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"--model-def {target!r} returned {type(module).__name__}, not an nn.Module.")
    load_strict(module, ckpt.state_dict, ckpt.path)
    desc = f"model-def:{target}" + (f"({json.dumps(kwargs, sort_keys=True)})" if kwargs else "")
    return ResolvedModel(module, desc, [f"model built by user code {target!r}"])


def _import_target(location: str) -> Any:
    try:
        if location.endswith(".py"):
            path = Path(location)
            if not path.is_file():
                raise CheckpointError(f"--model-def: file not found: {path}")
            name = f"_nrc_audit_model_def_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None  # a .py path always has a loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(location)
    except (Interrupted, NrcAuditError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:
        raise CheckpointError(f"--model-def: importing {location!r} failed: {user_exception_line(exc)}") from None


def user_exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` for an exception raised by user code (KeyError quotes kept)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else "(no message)"
    return f"{type(exc).__name__}: {first[:300]}"


def user_forward_error(model: object, exc: BaseException, start: int) -> ModelDataMismatchError:
    """The fence around the model's forward (user code under --model-def): which callable raised what."""
    name = f"{type(model).__module__}.{type(model).__qualname__}.forward" if model is not None else "the model's forward"
    return ModelDataMismatchError(f"{name} raised {user_exception_line(exc)} on the batch starting at row {start}. "
                                  "Fix the model code (--model-def) or the data it is given.")
