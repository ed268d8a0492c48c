"""Forward hooks that capture every audited layer's *input* features in one pass (SPEC §2).

No statistics and no files here: :meth:`FeatureExtractor.run` maps a batch to the model output and the
per-layer features ``{name: (B, h)}`` in execution order. Pooling happens in float64 (SPEC §3): ConvNd
inputs (B, c_in, *spatial) are averaged over the spatial dims; Linear inputs (B, T, h) are pooled over the
tokens (``mean`` over the unmasked positions, ``cls`` = position 0, ``last`` = last unmasked position);
Linear inputs with more extra dims are averaged over all of them. Such layers are reported ``pooled``.

``nn.MultiheadAttention`` computes its input projection from a bare parameter and calls ``out_proj``
functionally, so no Linear hook sees either: the input projection is audited through a pre-hook on the
attention module itself (layer ``NAME.in_proj``, self-attention only), ``out_proj`` is listed as skipped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import torch
from torch import nn

from nrc_audit.core.layer import LayerInfo
from nrc_audit.engine.model_io import select_output
from nrc_audit.errors import ModelDataMismatchError, OptionsError

KINDS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d",
                                     nn.Conv3d: "conv3d", nn.MultiheadAttention: "linear"}  # fmt: skip
CONV_NDIM = {"conv1d": 3, "conv2d": 4, "conv3d": 5}  # batched input ndim per conv kind
TOKEN_POOLING = ("mean", "cls", "last")
MASK_KWARG = "attention_mask"  # the extra model input that marks the real (non-padding) tokens
IN_PROJ = ".in_proj"  # suffix of the layer audited through a MultiheadAttention pre-hook


def _is_mha_out_proj(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` Linears of every ``nn.MultiheadAttention`` (called functionally, never hooked)."""
    return {f"{name}.out_proj" if name else "out_proj" for name, mod in model.named_modules()
            if isinstance(mod, nn.MultiheadAttention)}  # fmt: skip


def _selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def candidate_layers(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linear/ConvNd modules (and MultiheadAttention input projections, as ``NAME.in_proj``) whose path
    matches an ``include`` glob (all if empty) and no ``exclude`` glob."""
    found = {}
    unhookable = _is_mha_out_proj(model)
    for name, mod in model.named_modules():
        if not isinstance(mod, tuple(KINDS)) or name in unhookable:
            continue
        if isinstance(mod, nn.MultiheadAttention):
            if not mod._qkv_same_embed_dim:  # separate q/k/v weights take different inputs: not one layer
                continue
            name = f"{name}{IN_PROJ}" if name else IN_PROJ.lstrip(".")
        if _selected(name, include, exclude):
            found[name] = mod
    if not found:
        raise OptionsError(
            f"no Linear or Conv2d layer is left to audit (nor Conv1d/Conv3d) (--layers {list(include) or 'all'}, "
            f"--exclude {list(exclude)}). Loosen the patterns; layer names look like 'layers.4' or 'layer4.1.conv2'."
        )
    return found


def skipped_layers(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """Report notes for weight layers that the selection wants but no hook can see (stated, never silent)."""
    notes = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        out_proj = f"{name}.out_proj" if name else "out_proj"
        if _selected(out_proj, include, exclude):
            notes.append(f"layer {out_proj!r} skipped: nn.MultiheadAttention calls its out_proj functionally, "
                         "so no hook sees its input")  # fmt: skip
        if not mod._qkv_same_embed_dim and _selected(f"{name}{IN_PROJ}", include, exclude):
            notes.append(f"layer {name}{IN_PROJ} skipped: separate q/k/v projection weights (kdim/vdim ≠ embed_dim)")
    return notes


def _kind(mod: nn.Module) -> str:
    return next(kind for cls, kind in KINDS.items() if isinstance(mod, cls))


def _token_pool(h: torch.Tensor, pooling: str, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, h) → (B, h) in float64; ``mask`` (B, T), nonzero at real tokens, or None (all real)."""
    if pooling == "cls":
        return h[:, 0].to(torch.float64)
    if mask is None:
        if pooling == "last":
            return h[:, -1].to(torch.float64)
        return torch.sum(h, dim=1, dtype=torch.float64) / h.shape[1]
    m = (mask != 0).to(torch.float64)  # (B, T)
    if pooling == "last":
        t = h.shape[1]
        idx = (t - 1) - torch.argmax(torch.flip(m, dims=(1,)), dim=1)  # last real position of each row, (B,)
        return h[torch.arange(h.shape[0], device=h.device), idx].to(torch.float64)
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # a row without real tokens pools to 0, not NaN
    return torch.einsum("bth,bt->bh", h.to(torch.float64), m) / count


def pool(h: torch.Tensor, kind: str, pooling: str = "mean", mask: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """(B, …) module input → ((B, h) features, whether it was pooled). Pooled features are float64.

    The sums run in float64 (``dtype=torch.float64``), so channels whose mean dwarfs their spread
    (|μ|/σ ~ 1e7 in MobileNets) keep their variance (SPEC §3).
    """
    if kind in CONV_NDIM:
        if h.ndim != CONV_NDIM[kind]:
            raise OptionsError(
                f"a {kind} layer received an input of shape {tuple(h.shape)}; nrc-audit needs batched inputs "
                f"({CONV_NDIM[kind]}-D). Wrap the model with --model-def so that it is called on batches."
            )
        dims = tuple(range(2, h.ndim))
        return torch.sum(h, dim=dims, dtype=torch.float64) / h[0, 0].numel(), True  # (B, c_in) global average
    if h.ndim == 2:
        return h, False
    if h.ndim == 3:  # (B, T, h): the mask applies when it has one entry per token of this input
        fits = mask is not None and tuple(mask.shape) == tuple(h.shape[:2])
        return _token_pool(h, pooling, mask if fits else None), True  # (B, h) over the tokens
    dims = tuple(range(1, h.ndim - 1))
    count = h[0, ..., 0].numel()
    return torch.sum(h, dim=dims, dtype=torch.float64) / count, True  # (B, h) averaged over all extra dims


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The layer's weight as the equivalent dense matrix/kernel, float64 on the CPU.

    Linear (out, h); ConvNd (c_out, c_in, *k). A grouped conv's (c_out, c_in/g, *k) kernel becomes the
    block-diagonal (c_out, c_in, *k) kernel of the dense conv computing the same map (zeros between groups);
    MultiheadAttention gives its packed input projection (3E, E).
    """
    if isinstance(mod, nn.MultiheadAttention):
        return mod.in_proj_weight.detach().to("cpu", torch.float64).clone()
    w = mod.weight.detach().to("cpu", torch.float64)
    groups = int(getattr(mod, "groups", 1))
    if groups == 1:
        return w.clone()
    c_out, c_in_g = w.shape[:2]
    out_g = c_out // groups
    dense = w.new_zeros((c_out, c_in_g * groups, *w.shape[2:]))
    for g in range(groups):
        dense[g * out_g:(g + 1) * out_g, g * c_in_g:(g + 1) * c_in_g] = w[g * out_g:(g + 1) * out_g]
    return dense


def _mha_query(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of a self-attention's packed in-projection: the query, (B, T, E)."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise OptionsError("a MultiheadAttention was called without query/key/value tensors; exclude it with "
                           "--exclude '*in_proj'.")  # fmt: skip
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)  # for mypy
    if not (q is k and k is v) and not (torch.equal(q, k) and torch.equal(k, v)):
        raise OptionsError(
            "a MultiheadAttention is called with different query/key/value (cross-attention); its packed "
            "input projection takes several inputs and cannot be audited as one layer. Exclude it with "
            "--exclude '*in_proj'."
        )
    return q if module.batch_first or q.ndim != 3 else q.transpose(0, 1)  # (B, T, E)


class FeatureExtractor:
    """Captures the inputs of the given modules during :meth:`run`. Use as a context manager.

    The order of the layers is the execution order of the first batch; every later batch must run the same
    modules in the same order. A module called more than once per forward pass (weight sharing) is refused:
    its calls would mix different features under one name — exclude it with ``--exclude``.

    Args:
        token_pooling: how Linear inputs (B, T, h) become (B, h): ``mean`` | ``cls`` | ``last``.
        output_key: the entry of a dict / ModelOutput model output to audit (None: ``logits``).
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], token_pooling: str = "mean",
                 output_key: str | None = None) -> None:  # fmt: skip
        if token_pooling not in TOKEN_POOLING:
            raise OptionsError(f"--token-pooling {token_pooling!r} is unknown; use one of {list(TOKEN_POOLING)}.")
        self.model = model
        self.modules = modules
        self.token_pooling = token_pooling
        self.output_key = output_key
        self.output_note: str | None = None  # how the output container was read (for the report)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: list[tuple[str, torch.Tensor, bool]] = []
        self._mask: torch.Tensor | None = None
        self._stack = contextlib.ExitStack()
        self.layers: list[LayerInfo] | None = None

    def __enter__(self) -> "FeatureExtractor":
        fastpath = getattr(torch.backends, "mha", None)
        if fastpath is not None and hasattr(fastpath, "set_fastpath_enabled"):
            # the fused Transformer fast path runs whole encoder layers in one kernel: no Linear hook fires
            self._stack.callback(fastpath.set_fastpath_enabled, fastpath.get_fastpath_enabled())
            fastpath.set_fastpath_enabled(False)
        for name, mod in self.modules.items():
            if isinstance(mod, nn.MultiheadAttention):
                hook = self._make_mha_hook(name)
                self._handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name, _kind(mod))))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.close()

    def _make_hook(self, name: str, kind: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            feats, pooled = pool(inputs[0].detach(), kind, self.token_pooling, self._mask)
            self._calls.append((name, feats, pooled))

        return hook

    def _make_mha_hook(self, name: str):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            feats, pooled = pool(_mha_query(module, args, kwargs).detach(), "linear", self.token_pooling, self._mask)
            self._calls.append((name, feats, pooled))

        return hook

    def run(self, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Forward one batch, ``model(x, **extra)``. Returns (output tensor (B, …), features [(B, h_ℓ)
        per layer, in layer order]); a tuple/dict/ModelOutput output is reduced by :func:`select_output`."""
        extra = extra or {}
        self._mask = extra.get(MASK_KWARG)
        self._calls.clear()
        try:
            with torch.inference_mode():
                raw = self.model(x, **extra)
        finally:
            self._mask = None
        out, self.output_note = select_output(raw, self.output_key)
        calls, self._calls = self._calls, []
        names = [c[0] for c in calls]
        if self.layers is None:
            self.layers = self._fix_layers(calls)
        expected = [layer.name for layer in self.layers]
        if names != expected:
            raise ModelDataMismatchError(
                f"the model ran layers {names} on this batch but {expected} on the first one; nrc-audit needs the "
                "same layers in the same order on every batch (no data-dependent control flow)."
            )
        return out, [c[1] for c in calls]

    def flops_per_row(self, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> float | None:
        """The forward's flops per row, counted by torch's FlopCounterMode on the first 8 rows of a batch
        that has just run; None when they cannot be counted (a model that cannot run 8 rows, or a counter
        error). The features of this extra forward are discarded."""
        rows = min(8, len(x))
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                self.run(x[:rows], {k: v[:rows] for k, v in (extra or {}).items()})
            return counter.get_total_flops() / rows
        except (Exception, SystemExit):  # only a thread plan depends on it: keep the default
            return None

    def pooling_note(self) -> str | None:
        """The report assumption describing token pooling, when some Linear layer was pooled."""
        linear_pooled = any(layer.pooled and layer.kind == "linear" for layer in self.layers or [])
        if not linear_pooled:
            return None
        how = {"mean": "averaged over the tokens", "cls": "taken at token 0 ([CLS])",
               "last": "taken at the last token"}[self.token_pooling]  # fmt: skip
        masked = " (masked positions left out, mask from the 'attention_mask' input)" if self.token_pooling != "cls" else ""
        return f"token pooling {self.token_pooling!r}: Linear inputs (B, T, h) {how}{masked}"

    def _fix_layers(self, calls: list[tuple[str, torch.Tensor, bool]]) -> list[LayerInfo]:
        seen: set[str] = set()
        for name, _, _ in calls:
            if name in seen:
                raise OptionsError(
                    f"module {name!r} runs more than once per forward pass (shared weights); its calls would mix "
                    f"different features under one name. Exclude it with --exclude '{name}'."
                )
            seen.add(name)
        if not calls:
            raise ModelDataMismatchError("none of the selected layers ran during the forward pass.")
        layers = []
        for i, (name, feats, pooled) in enumerate(calls):
            mod = self.modules[name]
            w = dense_weight(mod)
            layers.append(LayerInfo(i, name, _kind(mod), int(feats.shape[1]), int(w.shape[0]), pooled, w))
        return layers

