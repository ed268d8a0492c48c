"""Checkpoint → ``nn.Module`` (SPEC §1): ``--model-def``, then ``nrc_audit.arch`` metadata, then a Hugging Face
folder through transformers' loader, then key detection.

A ``--model-def`` callable with a ``checkpoint_path`` parameter loads its weights itself: it receives the
checkpoint's path and the file's tensors are not loaded over its result. Lazy modules (``nn.LazyLinear`` …)
are materialised by one dry forward on the data (the caller's ``dry_run``) before the state dict is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from nrc_audit.config import ModelOptions
from nrc_audit.errors import CheckpointError, Interrupted, ModelDataMismatchError, NrcAuditError
from nrc_audit.io.validate import json_object_of_scalars
from nrc_audit.io.checkpoint import KWARGS_KEY, Checkpoint
from nrc_audit.io.fingerprint import FINGERPRINT_KEY, LAYOUT_KEY, fingerprint_mismatch
from nrc_audit.io.hf_layout import HF_CONFIG_KEY
from nrc_audit.models import hf
from nrc_audit.models import mlp as mlp_family
from nrc_audit.models.base import ResolvedModel, load_strict

DEFAULT_ACTIVATION = "relu"
NORMS = (None, "layernorm", "batchnorm")  # values of the arch metadata's "norm"
INFERRED_NOTE = ("architecture inferred from the state dict's keys and the arch metadata; the checkpoint has no "
                 "fingerprint to verify it against (re-save it with nrc_audit.save_checkpoint)")  # fmt: skip
VERIFIED_NOTE = "architecture verified against the checkpoint's fingerprint (outputs on a seeded probe batch)"
_UPCAST = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
LOADS_WEIGHTS_PARAM = "checkpoint_path"  # a --model-def callable taking it loads its own weights
DryRun = Callable[[nn.Module], None]  # one forward on a batch of the data, to materialise lazy modules


def inferred_architecture_warning(assumptions: list[str]) -> str | None:
    """The report-level warning for a model whose architecture was inferred, not verified; else None.

    Takes ``report.model.assumptions`` (so it works on re-analysed reports too).
    """
    if INFERRED_NOTE not in assumptions:
        return None
    return ("architecture inferred: the checkpoint carries no fingerprint, so nrc-audit could not check that "
            "the rebuilt network is the one that was trained (modules without parameters — activations, norms "
            "without affine parameters — leave no trace in a state dict). See model.assumptions; re-save with "
            "nrc_audit.save_checkpoint or pass --model-def.")  # fmt: skip


def resolve_model(ckpt: Checkpoint, opts: ModelOptions, dry_run: DryRun | None = None) -> ResolvedModel:
    """Build the model the checkpoint describes and load its weights strictly.

    ``dry_run(module)`` runs a lazy ``--model-def`` model once on the data before its weights are loaded.

    Raises:
        CheckpointError: unknown architecture (the message names ``--model-def``), or keys/shapes that
            do not fit the architecture (all problems listed in one message).
    """
    if opts.model_def:
        resolved = _from_model_def(ckpt, opts, dry_run)
    elif (from_hf := hf.resolve(ckpt)) is not None:  # built from config.json: nothing inferred from keys
        resolved = from_hf
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
        _check_fields(ckpt, arch)
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
                "nn.Module; its state dict is then loaded strictly." + hf.unbuilt_hint(ckpt)
            )
    resolved.assumptions[:0] = ckpt.notes
    resolved.module.eval()
    upcast = sorted({_UPCAST[v.dtype] for v in resolved.module.state_dict().values() if v.dtype in _UPCAST}
                    | {_UPCAST[v.dtype] for v in ckpt.state_dict.values() if v.dtype in _UPCAST})
    if upcast:  # CPU kernels and exact statistics want float32 at least
        resolved.module.float()
        resolved.assumptions.append(f"{'/'.join(upcast)} weights run upcast: compute dtype float32")
    _verify(ckpt, resolved, from_user_code=bool(opts.model_def), described=resolved.architecture.startswith("transformers:"))
    return resolved


def _verify(ckpt: Checkpoint, resolved: ResolvedModel, from_user_code: bool, described: bool = False) -> None:
    """Check the rebuilt model against the stored fingerprint; note an unverifiable inferred architecture.

    Raises:
        CheckpointError: the model does not reproduce the fingerprint (names the likely cause and the fix).
    """
    raw = ckpt.metadata.get(FINGERPRINT_KEY)
    if raw is None:
        if not (from_user_code or described):  # ``described``: a config names the architecture
            resolved.assumptions.append(INFERRED_NOTE)
        return
    try:
        fingerprint = json.loads(raw)
        what = fingerprint_mismatch(resolved.module, fingerprint)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.path}: metadata {FINGERPRINT_KEY!r} is damaged ({type(exc).__name__}: {exc}); "
                              "re-save the model with nrc_audit.save_checkpoint.") from None  # fmt: skip
    if what is not None:
        cause = ("the --model-def callable builds a different network (other activations, norms or kwargs)"
                 if from_user_code else
                 "a module without parameters (activation, norm without affine parameters, dropout position) that "
                 "the state dict cannot show; set 'activation'/'norm' in the nrc_audit.arch metadata, --activation, "
                 "or pass --model-def")  # fmt: skip
        raise CheckpointError(
            f"{ckpt.path}: the rebuilt model ({resolved.architecture}) is not the network that was saved: {what}. "
            f"Likely cause: {cause}."
        )
    resolved.assumptions.append(VERIFIED_NOTE)


# Every arch-metadata field a builder honours; anything else would be silently ignored, so it is refused.
ARCH_FIELDS = {
    "mlp": {"family", "activation", "norm"},
    "resnet": {"family", "stem_stride", "maxpool", "stage_strides", "head_activation", "activation", "norm"},
}
_RESNET_FIXED = {"activation": ("relu",), "norm": (None, "batchnorm")}  # what the ResNet builder always builds


def _check_fields(ckpt: Checkpoint, arch: dict) -> None:
    family = arch.get("family")
    if family not in ARCH_FIELDS:
        return
    unknown = sorted(set(arch) - ARCH_FIELDS[family])
    fixed = [f"{k}={arch[k]!r}" for k, ok in _RESNET_FIXED.items() if family == "resnet" and k in arch and arch[k] not in ok]
    if unknown or fixed:
        what = f"fields {unknown}" if unknown else f"{', '.join(fixed)}"
        raise CheckpointError(
            f"{ckpt.path}: the nrc_audit.arch metadata has {what}, which the {family!r} builder cannot honour "
            f"(it understands {sorted(ARCH_FIELDS[family])}; a ResNet is built with ReLU and BatchNorm). Auditing "
            "without them would audit a different network: pass --model-def to build the model yourself."
        )


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


def _layout_name(module: nn.Module) -> str:
    """``mlp(20-64-64-4, relu)``: the widths, then the other module kinds in order of first use (norms, activations)."""
    leaves = [m for m in module.modules() if not list(m.children())]
    linears = [m for m in leaves if isinstance(m, nn.Linear)]
    dims = [linears[0].in_features] + [m.out_features for m in linears] if linears else []
    others = list(dict.fromkeys(type(m).__name__.lower() for m in leaves if not isinstance(m, nn.Linear)))
    return f"mlp({', '.join(['-'.join(map(str, dims)), *others])})"


def _build_mlp(ckpt: Checkpoint, arch: dict, opts: ModelOptions) -> ResolvedModel | None:
    spec = mlp_family.detect_mlp(ckpt.state_dict)
    layout = _layout(ckpt)
    if layout is not None and not opts.activation:
        module = mlp_family.build_from_layout(spec, layout, ckpt.state_dict)
        if module is not None:
            load_strict(module, ckpt.state_dict, ckpt.path)
            return ResolvedModel(module, _layout_name(module), ["MLP built from the module layout stored by save_checkpoint"])
    if spec is None:
        return None
    assumptions: list[str] = []
    act = _activation(arch, opts, assumptions)
    norm = _norm(arch, spec, ckpt, assumptions)
    for a, b in mlp_family.missing_activation_gaps(spec):
        assumptions.append(f"no index is free between Linear {a} and {b}: no activation placed there")
    module = mlp_family.build_mlp(spec, act, norm)
    load_strict(module, ckpt.state_dict, ckpt.path)
    return ResolvedModel(module, spec.describe(act) + (", layernorm without affine" if norm else ""), assumptions)


def _layout(ckpt: Checkpoint) -> list | None:
    raw = ckpt.metadata.get(LAYOUT_KEY)
    if raw is None:
        return None
    try:
        layout = json.loads(raw)
    except ValueError:
        layout = None
    if not isinstance(layout, list) or not all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
                                               and isinstance(r[1], str) and isinstance(r[2], dict) for r in layout):
        raise CheckpointError(f"{ckpt.path}: metadata {LAYOUT_KEY!r} is damaged; re-save with nrc_audit.save_checkpoint.")
    return layout


def _norm(arch: dict, spec: mlp_family.MLPSpec, ckpt: Checkpoint, assumptions: list[str]) -> str | None:
    """The norm to place without keys (``"layernorm"``), or None; every guess is written to ``assumptions``."""
    norm = arch.get("norm")
    if norm not in NORMS:
        raise CheckpointError(f"{ckpt.path}: nrc_audit.arch metadata norm={norm!r} is unknown; use one of {list(NORMS)}.")
    has_norm_keys = any(s[0] != "linear" for s in spec.slots.values())
    if has_norm_keys or len(spec.linear_indices) < 2:
        return None
    if norm is None:
        if "norm" not in arch:
            assumptions.append("no normalisation layers assumed: none has parameters in the state dict (a norm "
                               "without affine parameters leaves no keys; set 'norm' in the nrc_audit.arch metadata)")  # fmt: skip
        return None
    if norm == "batchnorm":
        raise CheckpointError(f"{ckpt.path}: the arch metadata says norm='batchnorm' but the state dict has no "
                              "BatchNorm keys (running_mean/var). Re-save the model, or pass --model-def.")  # fmt: skip
    tight = [(a, b) for a, b, free in mlp_family.free_slots(spec) if free < 2]
    if tight:
        raise CheckpointError(f"{ckpt.path}: the arch metadata says norm='layernorm' (no keys: no affine parameters), "
                              f"but between Linear layers {tight} there is no room for a norm and an activation. "
                              "Pass --model-def to build the model yourself.")  # fmt: skip
    assumptions.append("LayerNorm without affine parameters (eps 1e-5) placed before the activation after each "
                       "hidden Linear, as the arch metadata's norm='layernorm' says; the order is assumed")  # fmt: skip
    return norm


def _build_resnet(ckpt: Checkpoint, arch: dict, opts: ModelOptions) -> ResolvedModel | None:
    try:
        from nrc_audit.models import resnet
    except ImportError:  # the family is optional until it lands
        return None
    return resnet.resolve(ckpt, arch, opts)


def _from_model_def(ckpt: Checkpoint, opts: ModelOptions, dry_run: DryRun | None) -> ResolvedModel:
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
    shown = dict(kwargs)
    if HF_CONFIG_KEY in ckpt.metadata and "config" not in kwargs and _accepts(factory, "config"):
        kwargs["config"] = json.loads(ckpt.metadata[HF_CONFIG_KEY])  # config.json next to the weights
    loads_weights = _accepts(factory, LOADS_WEIGHTS_PARAM)
    if loads_weights:
        kwargs[LOADS_WEIGHTS_PARAM] = str(ckpt.path)
    module = _fenced(target, lambda: factory(**kwargs))
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"--model-def {target!r} returned {type(module).__name__}, not an nn.Module.")
    notes = [f"model built by user code {target!r}"] + (["config= read from config.json"] if "config" in kwargs and "config" not in shown else [])
    if loads_weights:
        notes.append(f"weights loaded by the --model-def callable itself (it takes {LOADS_WEIGHTS_PARAM}=); the "
                     "checkpoint's tensors were not loaded over them")  # fmt: skip
    else:
        module = _load_into(module, ckpt, target, dry_run, notes)
    desc = f"model-def:{target}" + (f"({json.dumps(shown, sort_keys=True)})" if shown else "")
    return ResolvedModel(module, desc, notes)


def _fenced(target: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (Interrupted, NrcAuditError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:  # user code is fenced: sys.exit(7) must not become exit 7
        raise CheckpointError(f"--model-def {target!r} raised {user_exception_line(exc)}") from None


def _has_lazy(module: nn.Module) -> bool:
    return any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in module.modules())


def _load_into(module: nn.Module, ckpt: Checkpoint, target: str, dry_run: DryRun | None,
               notes: list[str]) -> nn.Module:  # fmt: skip
    """Load the checkpoint strictly into the user's module: lazy modules materialised first, a Lightning
    attribute prefix put back when the module keeps it, a transformers model reloaded by its own loader
    when the folder's keys are renamed on disk."""
    if _has_lazy(module):
        if dry_run is None:
            raise CheckpointError(f"--model-def {target!r} returned a model with lazy modules (nn.LazyLinear …), "
                                  "which only a forward on data can shape; build it with fixed sizes.")  # fmt: skip
        _fenced(target, lambda: dry_run(module))
        if _has_lazy(module):
            raise CheckpointError(f"--model-def {target!r}: a forward on the data's first rows left lazy modules "
                                  "unshaped (never called); build them with fixed sizes.")  # fmt: skip
        notes.append("lazy modules materialised by one forward on the data's first rows before loading the weights")
    sd, own = ckpt.state_dict, set(module.state_dict())
    prefix = ckpt.stripped_prefix
    if prefix and set(sd) != own and {prefix + k for k in sd} == own:
        sd = {prefix + k: v for k, v in sd.items()}  # the callable returned the LightningModule itself
        notes.append(f"the model keeps the Lightning attribute {prefix!r}: the prefix is kept in its keys")
    if set(sd) != own and (reloaded := hf.reload(module, Path(ckpt.path))) is not None:
        notes.append(f"weights loaded by transformers' {type(module).__name__}.from_pretrained with the callable's "
                     "config (the folder's keys are not the module's names: transformers' key mapping applied)")
        return reloaded
    load_strict(module, sd, ckpt.path)
    return module


def _accepts(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params


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
