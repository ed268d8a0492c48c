"""MLP auto-detection from state-dict keys and shapes (SPEC §1).

A state dict is an MLP when all its keys are ``P.i.weight``/``P.i.bias`` (any prefix P, possibly empty,
any index step) for a chain of 2-D weights whose shapes chain, optionally with LayerNorm or BatchNorm1d
parameters at indices between them. Free indices between two Linears hold the activation (the first free
slot) and identities (dropout and the like); free indices before the first Linear hold a Flatten.
"""

from __future__ import annotations

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


def build_mlp(spec: MLPSpec, activation: str) -> nn.Module:
    """An ``nn.Module`` whose state-dict keys are exactly those the spec was detected from."""
    act_cls = ACTIVATIONS[activation]
    linears = spec.linear_indices
    first, last = linears[0], linears[-1]
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    pending_activation = False
    for i in range(max(spec.slots) + 1):
        slot = spec.slots.get(i)
        if slot is None:
            if i < first:
                mods[str(i)] = nn.Flatten()
            elif pending_activation:
                mods[str(i)] = act_cls()
                pending_activation = False
            else:
                mods[str(i)] = nn.Identity()
        elif slot[0] == "linear":
            mods[str(i)] = nn.Linear(slot[1], slot[2], bias=slot[3])
            pending_activation = i != last
        elif slot[0] == "batchnorm":
            mods[str(i)] = nn.BatchNorm1d(slot[1], affine=slot[2])
        else:
            mods[str(i)] = nn.LayerNorm(slot[1], elementwise_affine=True, bias=slot[2])
    body: nn.Module = nn.Sequential(mods)
    return _nest(body, spec.prefix)


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
