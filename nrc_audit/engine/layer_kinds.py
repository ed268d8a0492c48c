"""Which modules are audited as weight layers, on which weight, and what the audit names as left out.

=========================================  =========  ===========================================================
module                                     layer      weight W audited (input side)
=========================================  =========  ===========================================================
``nn.Linear``                              ``NAME``   ``weight`` (out, h)
``nn.Conv1d/2d/3d`` (grouped too)          ``NAME``   the dense (c_out, c_in, *k) kernel (block-diagonal if grouped)
HF ``transformers.pytorch_utils.Conv1D``   ``NAME``   ``weight.T``: Conv1D stores a Linear's weight as (in, out)
``nn.MultiheadAttention`` (self-attn.)     ``NAME.in_proj``   the packed ``in_proj_weight`` (3E, E)
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``      ``NAME.weight_ih_l0``  ``weight_ih_l0`` (gates·H, in), both
                                                      directions stacked; input pooled over time
``nn.LSTMCell`` / ``GRUCell`` / ``RNNCell``  ``NAME.weight_ih``  ``weight_ih`` (gates·H, in), once per call (step)
=========================================  =========  ===========================================================

Left out, and said so in the report's ``model.assumptions`` (:func:`skipped_layers`): the attention's
``out_proj`` (called functionally), separate q/k/v projections, a recurrent layer's hidden-side weights and
its layers above the first (their inputs are hidden states no hook sees), and any other module parameter of
two or more dims that no audited layer reads (embedding tables aside: a lookup, not a map of features).
"""

from __future__ import annotations

import fnmatch
import sys

import torch
from torch import nn

from nrc_audit.errors import OptionsError

KINDS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d",
                                     nn.Conv3d: "conv3d", nn.MultiheadAttention: "linear",
                                     nn.RNNBase: "linear", nn.RNNCellBase: "linear"}  # fmt: skip
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
LOOKUPS = (nn.Embedding, nn.EmbeddingBag)  # tables indexed by ids: no input features to audit
IN_PROJ = ".in_proj"  # suffix of the layer audited through a MultiheadAttention pre-hook
IH_L0 = ".weight_ih_l0"  # suffix of the layer audited on a recurrent module's first input-side weight
IH = ".weight_ih"  # suffix of the layer audited on a recurrent cell's input-side weight


def hf_conv1d() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded (a model using it has imported it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def kind_of(mod: nn.Module) -> str | None:
    """The audited kind of a module ("linear", "conv1d", …), or None when it is no weight layer."""
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(mod, conv1d):
        return "linear"
    if isinstance(mod, nn.RNNBase) and mod.mode not in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        return None
    return next((kind for cls, kind in KINDS.items() if isinstance(mod, cls)), None)


def layer_name(name: str, mod: nn.Module) -> str:
    """The audited layer's name: the module path, with a suffix where one weight of several is audited."""
    suffixes = {nn.MultiheadAttention: IN_PROJ, nn.RNNBase: IH_L0, nn.RNNCellBase: IH}
    suffix = next((s for cls, s in suffixes.items() if isinstance(mod, cls)), "")
    return f"{name}{suffix}" if name else suffix.lstrip(".")


def row_hint(mod: nn.Module, parents: list[nn.Module]) -> int | None:
    """The dim a module declares for its rows (``batch_first``), its own or its transformer layer's."""
    for m in [mod, *parents]:
        attn = m if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) else getattr(m, "self_attn", None)
        if isinstance(m, (nn.MultiheadAttention, nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return 0 if getattr(attn, "batch_first", True) else 1
    return None


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The layer's weight as the equivalent dense matrix/kernel, float64 on the CPU.

    Linear (out, h); ConvNd (c_out, c_in, *k). A grouped conv's (c_out, c_in/g, *k) kernel becomes the
    block-diagonal (c_out, c_in, *k) kernel of the dense conv computing the same map (zeros between groups);
    MultiheadAttention gives its packed input projection (3E, E); HF Conv1D its (in, out) weight transposed;
    a recurrent module ``weight_ih_l0`` (gates·H, in), with ``weight_ih_l0_reverse`` stacked below it.
    """
    cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    if isinstance(mod, nn.MultiheadAttention):
        return cpu(mod.in_proj_weight).clone()
    if isinstance(mod, nn.RNNBase):
        parts = [mod.weight_ih_l0] + ([mod.weight_ih_l0_reverse] if mod.bidirectional else [])
        return torch.cat([cpu(p) for p in parts], dim=0)  # (directions·gates·H, in)
    if isinstance(mod, nn.RNNCellBase):
        return cpu(mod.weight_ih).clone()  # (gates·H, in)
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(mod, conv1d):
        return cpu(mod.weight).T.clone()  # (nf, nx): out × in, as a Linear's
    w = cpu(mod.weight)
    groups = int(getattr(mod, "groups", 1))
    if groups == 1:
        return w.clone()
    c_out, c_in_g = w.shape[:2]
    out_g = c_out // groups
    dense = w.new_zeros((c_out, c_in_g * groups, *w.shape[2:]))
    for g in range(groups):
        dense[g * out_g:(g + 1) * out_g, g * c_in_g:(g + 1) * c_in_g] = w[g * out_g:(g + 1) * out_g]
    return dense


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _mha_out_projs(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` Linears of every ``nn.MultiheadAttention`` (called functionally, never hooked)."""
    return {f"{name}.out_proj" if name else "out_proj" for name, mod in model.named_modules()
            if isinstance(mod, nn.MultiheadAttention)}  # fmt: skip


def candidate_layers(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """The weight layers of the table above, by layer name, that match an ``include`` glob (all if empty)
    and no ``exclude`` glob."""
    found = {}
    unhookable = _mha_out_projs(model)
    for name, mod in model.named_modules():
        if kind_of(mod) is None or name in unhookable:
            continue
        if isinstance(mod, nn.MultiheadAttention) and not mod._qkv_same_embed_dim:
            continue  # separate q/k/v weights take different inputs: not one layer
        if selected(layer_name(name, mod), include, exclude):
            found[layer_name(name, mod)] = mod
    if not found:
        raise OptionsError(
            f"no Linear or Conv2d layer is left to audit (nor Conv1d/Conv3d) (--layers {list(include) or 'all'}, "
            f"--exclude {list(exclude)}). Loosen the patterns; layer names look like 'layers.4' or 'layer4.1.conv2'."
        )
    return found


def _rnn_note(name: str, mod: nn.RNNBase | nn.RNNCellBase) -> str:
    if isinstance(mod, nn.RNNCellBase):
        audited, how, left = "weight_ih", "its input at each call", ["weight_hh"]
    else:
        audited, how = "weight_ih_l0", f"input pooled over time{', both directions stacked' if mod.bidirectional else ''}"
        left = [p for p, _ in mod.named_parameters() if p.startswith("weight_") and not p.startswith("weight_ih_l0")]
    return (f"layer {layer_name(name, mod)!r}: {type(mod).__name__} audited on {audited} ({how}); not audited: "
            f"{left} (their inputs are hidden states, which no hook sees)")  # fmt: skip


def _foreign_note(name: str, mod: nn.Module) -> str | None:
    """A note for a module of no audited kind that holds ≥ 2-D parameters of its own."""
    if kind_of(mod) is not None or isinstance(mod, LOOKUPS):
        return None
    params = [f"{p} {tuple(t.shape)}" for p, t in mod.named_parameters(recurse=False) if t.ndim >= 2]
    if not params:
        return None
    return (f"module {name or '(root)'!r} ({type(mod).__name__}) holds weights {params} that no audited layer "
            "reads (not a Linear/Conv call nrc-audit hooks): not audited")  # fmt: skip


def skipped_layers(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """Report notes for the weights that the selection wants but the audit cannot read (stated, never silent)."""
    notes = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            out_proj = f"{name}.out_proj" if name else "out_proj"
            if selected(out_proj, include, exclude):
                notes.append(f"layer {out_proj!r} skipped: nn.MultiheadAttention calls its out_proj functionally, "
                             "so no hook sees its input")  # fmt: skip
            if not mod._qkv_same_embed_dim and selected(layer_name(name, mod), include, exclude):
                notes.append(f"layer {layer_name(name, mod)} skipped: separate q/k/v projection weights "
                             "(kdim/vdim ≠ embed_dim)")  # fmt: skip
        elif isinstance(mod, RECURRENT) and kind_of(mod) and selected(layer_name(name, mod), include, exclude):
            notes.append(_rnn_note(name, mod))
        elif selected(name, include, exclude):
            notes.extend(n for n in [_foreign_note(name, mod)] if n)
    return notes
