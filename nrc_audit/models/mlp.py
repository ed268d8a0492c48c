"""MLP auto-detection from state-dict keys and shapes (SPEC §1).

A state dict is an MLP when all its keys are ``P.i.weight``/``P.i.bias`` (any prefix P, possibly empty,
any index step) for a chain of 2-D weights whose shapes chain, optionally with LayerNorm or BatchNorm1d
parameters at indices between them. Free indices between two Linears hold the activation (the first free
slot) and identities (dropout and the like); free indices before the first Linear hold a Flatten.
"""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from nrc_audit.errors import CheckpointError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
_KEY = re.compile(r"^(?:(?P<prefix>.+)\.)?(?P<index>\d+)\.(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)$")


@dataclass(frozen=True)
class MLPSpec:
    """What the keys say: the container prefix and, per index, ('linear', in, out, bias) or ('layernorm'|'batchnorm', dim)."""

    prefix: str
    slots: dict[int, tuple]

    @property
    def linear_indices(self) -> list[int]:
        return sorted(i for i, s in self.slots.items() if s[0] == "linear")

    def describe(self, activation: str) -> str:
        dims = [self.slots[i][1] for i in self.linear_indices] + [self.slots[self.linear_indices[-1]][2]]
        norms = sorted({s[0] for s in self.slots.values() if s[0] != "linear"})
        extra = f", {'+'.join(norms)}" if norms else ""
        return f"mlp({'-'.join(map(str, dims))}, {activation}{extra})"


def detect_mlp(sd: dict[str, torch.Tensor]) -> MLPSpec | None:
    """Return the MLP described by the state dict, or None if the keys/shapes are not an MLP chain."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        m = _KEY.match(key)
        if m is None:
            return None
        groups.setdefault(m["prefix"] or "", {}).setdefault(int(m["index"]), {})[m["param"]] = value
    if len(groups) != 1:
        return None
    (prefix, by_index), = groups.items()
    slots: dict[int, tuple] = {}
    prev_out: int | None = None
    for i in sorted(by_index):
        params = by_index[i]
        w = params.get("weight")
        if w is None or set(params) - ({"weight", "bias"} if w.ndim == 2 else set(params)):
            return None
        key = f"{prefix + '.' if prefix else ''}{i}.weight"
        if w.ndim == 2:
            if prev_out is not None and w.shape[1] != prev_out:
                raise _chain_error(key, f"has shape {tuple(w.shape)}: it takes {w.shape[1]} inputs, but the layer "
                                        f"before it gives {prev_out}")  # fmt: skip
            if "bias" in params and tuple(params["bias"].shape) != (w.shape[0],):
                raise _chain_error(key, f"has {w.shape[0]} outputs but its bias has shape {tuple(params['bias'].shape)}")
            slots[i] = ("linear", int(w.shape[1]), int(w.shape[0]), "bias" in params)
            prev_out = int(w.shape[0])
        elif w.ndim == 1 and prev_out is not None:
            if w.shape[0] != prev_out:
                raise _chain_error(key, f"is a {w.shape[0]}-wide norm after a layer with {prev_out} outputs")
            kind = "batchnorm" if "running_mean" in params else "layernorm"
            slots[i] = (kind, prev_out, "bias" in params)
        else:
            return None
    spec = MLPSpec(prefix, slots)
    return spec if spec.linear_indices else None


def _chain_error(key: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"the state dict has the keys of an MLP (P.N.weight), but {key} {what}. The weights do not form a "
        "chain; check that the checkpoint is complete, or pass --model-def to build the model yourself."
    )


def build_mlp(spec: MLPSpec, activation: str, norm: str | None = None) -> nn.Module:
    """An ``nn.Module`` whose state-dict keys are exactly those the spec was detected from.

    ``norm="layernorm"`` (arch metadata) puts a LayerNorm without affine parameters (so without keys) in
    the first free slot after each hidden Linear, before the activation (``needs_norm_slots`` checks room).
    """
    act_cls = ACTIVATIONS[activation]
    linears = spec.linear_indices
    first, last = linears[0], linears[-1]
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    pending_activation = pending_norm = False
    width = 0
    for i in range(max(spec.slots) + 1):
        slot = spec.slots.get(i)
        if slot is None:
            if i < first:
                mods[str(i)] = nn.Flatten()
            elif pending_norm:
                mods[str(i)] = nn.LayerNorm(width, elementwise_affine=False)
                pending_norm = False
            elif pending_activation:
                mods[str(i)] = act_cls()
                pending_activation = False
            else:
                mods[str(i)] = nn.Identity()
        elif slot[0] == "linear":
            mods[str(i)] = nn.Linear(slot[1], slot[2], bias=slot[3])
            pending_activation = i != last
            pending_norm, width = pending_activation and norm == "layernorm", slot[2]
        elif slot[0] == "batchnorm":
            mods[str(i)] = nn.BatchNorm1d(slot[1], affine=slot[2])
        else:
            mods[str(i)] = nn.LayerNorm(slot[1], elementwise_affine=True, bias=slot[2])
    body: nn.Module = nn.Sequential(mods)
    return _nest(body, spec.prefix)


def free_slots(spec: MLPSpec) -> list[tuple[int, int, int]]:
    """(a, b, free indices between them) for consecutive Linear indices a, b."""
    lin = spec.linear_indices
    return [(a, b, sum(j not in spec.slots for j in range(a + 1, b))) for a, b in zip(lin, lin[1:])]


def missing_activation_gaps(spec: MLPSpec) -> list[tuple[int, int]]:
    """Pairs of consecutive Linear indices with no free slot for an activation between them."""
    lin = spec.linear_indices
    gaps = []
    for a, b in zip(lin, lin[1:]):
        if all(j in spec.slots for j in range(a + 1, b)):
            gaps.append((a, b))
    return gaps


def _nest(body: nn.Module, prefix: str) -> nn.Module:
    """Wrap ``body`` in empty containers so its keys carry ``prefix`` (e.g. 'model.layers')."""
    if not prefix:
        return body
    root = nn.Module()
    node = root
    parts = prefix.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], body)
    return _Forward(root, prefix)


class _Forward(nn.Module):
    """Calls the nested Sequential so that a prefixed MLP is still a callable model with the same keys."""

    def __init__(self, root: nn.Module, prefix: str) -> None:
        super().__init__()
        for name, child in root.named_children():
            self.add_module(name, child)
        self._path = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self._path)(x)


# ----------------------------------------------------------------------------- from a saved layout

_LAYOUT_CLASSES: dict[str, type[nn.Module]] = {
    **{cls.__name__: cls for cls in ACTIVATIONS.values()},
    "Dropout": nn.Dropout, "Identity": nn.Identity, "Flatten": nn.Flatten,
}  # parameter-free modules a layout may name; Linear and the norms are sized from the state dict


def build_from_layout(spec: MLPSpec | None, layout: list, sd: dict[str, torch.Tensor]) -> nn.Module | None:
    """The MLP exactly as ``save_checkpoint`` recorded it (``nrc_audit.layout``), or None when the layout
    is not one Sequential chain ``P.0, P.1, …`` of modules this builder knows."""
    prefix = spec.prefix if spec is not None else _layout_prefix(layout)
    if prefix is None:
        return None
    head = f"{prefix}." if prefix else ""
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for row in layout:
        name, cls_name, settings = row
        index = name[len(head):] if name.startswith(head) else ""
        if not index.isdigit():
            return None
        mod = _layout_module(cls_name, settings, sd, f"{head}{index}")
        if mod is None:
            return None
        mods[index] = mod
    if not mods or sorted(map(int, mods)) != list(range(len(mods))):
        return None
    return _nest(nn.Sequential(OrderedDict(sorted(mods.items(), key=lambda kv: int(kv[0])))), prefix)


def _layout_prefix(layout: list) -> str | None:
    prefixes = {row[0].rpartition(".")[0] for row in layout if isinstance(row, list) and row and isinstance(row[0], str)}
    return prefixes.pop() if len(prefixes) == 1 else None


def _layout_module(cls_name: str, s: dict, sd: dict[str, torch.Tensor], key: str) -> nn.Module | None:
    if cls_name == "Linear":
        w = sd.get(f"{key}.weight")
        return None if w is None or w.ndim != 2 else nn.Linear(w.shape[1], w.shape[0], bias=f"{key}.bias" in sd)
    if cls_name == "LayerNorm":
        return nn.LayerNorm(s["normalized_shape"], eps=s.get("eps", 1e-5), elementwise_affine=s.get("elementwise_affine", True),
                            bias=s.get("bias", True))  # fmt: skip
    if cls_name == "BatchNorm1d":
        ref = sd.get(f"{key}.running_mean", sd.get(f"{key}.weight"))
        if ref is None:
            return None
        return nn.BatchNorm1d(ref.shape[0], eps=s.get("eps", 1e-5), affine=s.get("affine", True),
                              track_running_stats=s.get("track_running_stats", True))  # fmt: skip
    cls = _LAYOUT_CLASSES.get(cls_name)
    if cls is None:
        return None
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in s.items() if k in accepted and k != "inplace"})
