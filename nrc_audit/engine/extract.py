"""Forward hooks that capture every audited layer's *input* features in one pass (SPEC §2).

No statistics and no files here: :meth:`FeatureExtractor.run` maps a batch to the model output and the
per-layer features ``{name: (B, h)}`` in execution order. Every captured input is first tied to the batch
rows (:mod:`nrc_audit.core.layer`): a probe forward of a few rows of the first batch shows which dim follows
the batch size, so seq-first (T, B, h) and flattened (B·T, h) inputs are read by their rows, and an input
whose rows cannot be told apart is refused by name. Pooling happens in float64 (SPEC §3): ConvNd inputs
(B, c_in, *spatial) are averaged over the spatial dims; Linear inputs (B, T, h) are pooled over the tokens
(``mean`` over the unmasked positions, ``cls`` = position 0, ``last`` = last unmasked position); Linear
inputs with more extra dims are averaged over all of them. Such layers are reported ``pooled``.

``nn.MultiheadAttention`` computes its input projection from a bare parameter and calls ``out_proj``
functionally, so no Linear hook sees either: the input projection is audited through a pre-hook on the
attention module itself (layer ``NAME.in_proj``, self-attention only), ``out_proj`` is listed as skipped.
A module applied several times per forward (shared layers) is audited once per call, ``NAME#1``, ``NAME#2``….
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import replace
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from nrc_audit.core.layer import LayerInfo, RowLayout, find_rows, flattened_order, row_signature, rows_first
from nrc_audit.engine.flops import ForwardFlops
from nrc_audit.engine.layer_kinds import dense_weight, kind_of, row_hint
from nrc_audit.engine.model_io import select_output
from nrc_audit.errors import ModelDataMismatchError, OptionsError

CONV_NDIM = {"conv1d": 3, "conv2d": 4, "conv3d": 5}  # batched input ndim per conv kind
TOKEN_POOLING = ("mean", "cls", "last")
MASK_KWARG = "attention_mask"  # the extra model input that marks the real (non-padding) tokens


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
    """(B, …) module input, rows first → ((B, h) features, whether it was pooled). Pooled features are float64.

    The sums run in float64 (``dtype=torch.float64``), so channels whose mean dwarfs their spread
    (|μ|/σ ~ 1e7 in MobileNets) keep their variance (SPEC §3).
    """
    if kind in CONV_NDIM:
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


def _mha_query(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of a self-attention's packed in-projection: the query, as given ((B, T, E) or (T, B, E))."""
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
    return q


def _layer_input(name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the audited input tensor as the module received it, its own token mask or None)."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_query(module, args, kwargs), None
    first = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(first, PackedSequence):  # (B, T, in) padded, batch-first, with the sequences' lengths
        padded, lengths = pad_packed_sequence(first, batch_first=True)
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # (B, T)
        return padded, mask.to(padded.device)
    if not isinstance(first, torch.Tensor):
        raise OptionsError(f"layer {name!r} was called without a tensor input ({type(first).__name__}); "
                           f"exclude it with --exclude '{name}'.")  # fmt: skip
    return first, None


def _probe_rows(batch: int) -> list[int]:
    """Rows of the first batch for the probe forward: always a count ≠ the batch's (so the row dim shows)."""
    return [0, 1] if batch >= 3 else [0, 1, 0] if batch == 2 else [0, 0]


class FeatureExtractor:
    """Captures the inputs of the given modules during :meth:`run`. Use as a context manager.

    The order of the layers is the execution order of the first batch; every later batch must run the same
    modules in the same order, with their rows on the same dims.

    Args:
        modules: {layer name: module} from :func:`candidate_layers`.
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
        # (layer, call number, (B, h), pooled, index of the earlier call that read the same input or None)
        self._calls: list[tuple[str, int, torch.Tensor, bool, int | None]] = []
        self._inputs: list[tuple[tuple | None, weakref.ref]] = []  # this forward's raw inputs, per call
        self._mask: torch.Tensor | None = None
        self._batch = 0
        self._probe: list[tuple[str, tuple[int, ...], dict[int, torch.Tensor]]] | None = None  # per call of the probe
        self._probe_at: list[int] = []
        self._probing = False
        self._layouts: list[tuple[str, int, RowLayout]] = []  # per call of the first batch: (layer, ndim, rows)
        self._hints = _row_hints(model, modules)
        self._stack = contextlib.ExitStack()
        self.layers: list[LayerInfo] | None = None

    def __enter__(self) -> "FeatureExtractor":
        fastpath = getattr(torch.backends, "mha", None)
        if fastpath is not None and hasattr(fastpath, "set_fastpath_enabled"):
            # the fused Transformer fast path runs whole encoder layers in one kernel: no Linear hook fires
            self._stack.callback(fastpath.set_fastpath_enabled, fastpath.get_fastpath_enabled())
            fastpath.set_fastpath_enabled(False)
        for name, mod in self.modules.items():
            hook = self._make_hook(name, kind_of(mod) or "linear")
            self._handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.close()

    def _make_hook(self, name: str, kind: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h, mask = _layer_input(name, module, args, kwargs)
            if kind in CONV_NDIM and h.ndim != CONV_NDIM[kind]:
                raise OptionsError(
                    f"a {kind} layer received an input of shape {tuple(h.shape)}; nrc-audit needs batched inputs "
                    f"({CONV_NDIM[kind]}-D). Wrap the model with --model-def so that it is called on batches."
                )
            if self._probing:
                assert self._probe is not None
                b2 = len(self._probe_at)  # a dim of b2·c entries (c > 1) may be flattened rows: keep its order
                axes = range(1) if kind in CONV_NDIM else range(h.ndim - 1)
                signatures = {d: row_signature(h, d) for d in axes if h.shape[d] > b2 and h.shape[d] % b2 == 0}
                self._probe.append((name, tuple(h.shape), signatures))
                return
            rows = self._rows(len(self._calls), name, kind, h.detach())
            i = len(self._calls)
            key = (kind, h.data_ptr(), tuple(h.shape), tuple(h.stride()), h.dtype, h.device) if mask is None else None
            source = self._shared_source(key)
            self._inputs.append((key, weakref.ref(h)))
            known = self.layers is not None and i < len(self.layers)
            expected = self.layers[i].shares_input_with if self.layers is not None and known else source
            if source is not None and source == expected and known:
                feats, pooled = self._calls[source][2], self._calls[source][3]  # checked equal on the first batch
            else:
                h = rows_first(h.detach(), rows, self._batch)
                if kind in CONV_NDIM and rows.per_row > 1:
                    h = h.movedim(1, 2).flatten(2, 3)  # (B, c, C, L, …) → (B, C, c·L, …): c joins the averaged dims
                feats, pooled = pool(h, kind, self.token_pooling, mask if mask is not None else self._mask)
                # equal values or no sharing: memory changed in place between two reads is not the same input
                same = expected is not None and torch.equal(feats, self._calls[expected][2])
                source = expected if same else None
            number = 1 + sum(1 for c in self._calls if c[0] == name)
            self._calls.append((name, number, feats, pooled, source))

        return hook

    def _shared_source(self, key: tuple | None) -> int | None:
        """The first call of this forward that read the very same tensor: same memory, shape, strides, dtype and
        layer kind, and that tensor still alive (a freed one's memory may hold a new tensor), else None."""
        if key is None:  # an input with its own token mask (a PackedSequence): pooled its own way
            return None
        for j, (other, ref) in enumerate(self._inputs):
            if other == key and ref() is not None:
                src = self._calls[j][4]
                return j if src is None else src
        return None

    def _rows(self, i: int, name: str, kind: str, h: torch.Tensor) -> RowLayout:
        """Where call ``i`` (layer ``name``) keeps the batch rows: learnt on the first batch, checked after."""
        shape, batch = tuple(h.shape), self._batch
        if i < len(self._layouts):
            first_name, ndim, rows = self._layouts[i]
            if first_name != name:
                raise ModelDataMismatchError(
                    f"the model ran layer {name!r} as call {i + 1} of this batch but {first_name!r} on the first "
                    "one; nrc-audit needs the same layers in the same order on every batch (no data-dependent "
                    "control flow)."
                )
            if len(shape) != ndim or shape[rows.axis] != batch * rows.per_row:
                raise ModelDataMismatchError(
                    f"layer {name!r} received an input of shape {shape} for a batch of {batch} rows; on the first "
                    f"batch its dim {rows.axis} held the rows ({rows.per_row} per sample). nrc-audit needs each "
                    "layer's rows on the same dim in every batch."
                )
            return rows
        axes = (0,) if kind in CONV_NDIM else tuple(range(h.ndim - 1))
        probe = self._probe[i] if self._probe is not None and i < len(self._probe) else None
        probe = probe if probe is not None and probe[0] == name else None
        found = find_rows(shape, batch, probe[1] if probe else None, len(self._probe_at), axes, self._hints.get(name))
        if isinstance(found, RowLayout) and found.per_row > 1:
            signature = probe[2].get(found.axis) if probe else None
            major = flattened_order(h, signature, found, self._probe_at) if signature is not None else None
            found = replace(found, major=major) if major else (
                f"its input (shape {shape}) flattens {found.per_row} entries per sample into dim {found.axis}, and "
                "the probe could not tell whether they are ordered (B, c) or (c, B)")  # fmt: skip
        if isinstance(found, str):
            raise ModelDataMismatchError(
                f"layer {name!r}: {found}. nrc-audit pairs every feature row with its target row and does not "
                f"guess; exclude the layer with --exclude '{name}', or wrap the model (--model-def) so that it "
                "receives batch-first inputs."
            )
        self._layouts.append((name, h.ndim, found))
        return found

    def _run_probe(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        """Forward a few rows of the first batch, recording each call's input shape (nothing is pooled)."""
        self._probe_at, self._probe, self._probing = _probe_rows(len(x)), [], True
        idx = torch.as_tensor(self._probe_at, device=x.device)
        try:
            with torch.inference_mode():
                self.model(x[idx], **{k: v[idx] for k, v in extra.items()})
        except (Exception, SystemExit):  # noqa: BLE001 - a model that cannot run these rows: shapes alone decide
            self._probe = None
        finally:
            self._probing = False

    def run(self, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Forward one batch, ``model(x, **extra)``. Returns (output tensor (B, …), features [(B, h_ℓ)
        per layer, in layer order]); a tuple/dict/ModelOutput output is reduced by :func:`select_output`."""
        extra = extra or {}
        if self.layers is None and self._probe is None:
            self._run_probe(x, extra)
        self._mask, self._batch = extra.get(MASK_KWARG), len(x)
        self._calls.clear()
        try:
            with torch.inference_mode():
                raw = self.model(x, **extra)
        finally:
            self._mask = None
            self._inputs.clear()
        out, self.output_note = select_output(raw, self.output_key)
        calls, self._calls = self._calls, []
        if self.layers is None:
            self.layers = self._fix_layers(calls)
        expected = [layer.name for layer in self.layers]
        names = _call_names([(c[0], c[1]) for c in calls])
        if names != expected:
            raise ModelDataMismatchError(
                f"the model ran layers {names} on this batch but {expected} on the first one; nrc-audit needs the "
                "same layers in the same order on every batch (no data-dependent control flow)."
            )
        shares = [c[4] for c in calls]
        if shares != [layer.shares_input_with for layer in self.layers]:
            raise ModelDataMismatchError(
                f"the layers that read one input tensor changed from the first batch ({_share_text(self.layers)}) "
                "to this one; nrc-audit needs the same data flow on every batch (no data-dependent control flow)."
            )
        return out, [c[2] for c in calls]

    def flops_per_row(self, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> float | None:
        """The forward's flops per row, counted (:mod:`nrc_audit.engine.flops`) on the first 8 rows of a batch
        that has just run; None when they cannot be counted (a model that cannot run 8 rows, or a counter
        error). The features of this extra forward are discarded."""
        rows = min(8, len(x))
        try:
            with ForwardFlops() as counter:
                self.run(x[:rows], {k: v[:rows] for k, v in (extra or {}).items()})
            return counter.total / rows
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

    def coverage_notes(self) -> list[str]:
        """Report assumptions, after the first batch: inputs read by a row dim other than 0 or flattened, and
        the selected layers whose hook never fired (never called, or their weight used functionally)."""
        notes = [f"layer {layer.name!r}: {how}" for layer, (_, ndim, rows) in zip(self.layers or [], self._layouts)
                 if (how := rows.describe(ndim))]  # fmt: skip
        fired = {name for name, _, _ in self._layouts}
        for name, mod in self.modules.items():
            if name not in fired:
                notes.append(f"layer {name!r} ({type(mod).__name__}) never ran during the forward pass: not audited "
                             "(a module the model does not call, or whose weight it uses through a functional call "
                             "such as F.linear, which no hook sees)")  # fmt: skip
        return notes

    def _fix_layers(self, calls: list[tuple[str, int, torch.Tensor, bool, int | None]]) -> list[LayerInfo]:
        if not calls:
            raise ModelDataMismatchError("none of the selected layers ran during the forward pass.")
        weights = {name: dense_weight(self.modules[name]) for name in dict.fromkeys(c[0] for c in calls)}
        names = _call_names([(c[0], c[1]) for c in calls])
        return [LayerInfo(i, shown, kind_of(self.modules[name]) or "linear", int(feats.shape[1]),
                          int(weights[name].shape[0]), pooled, weights[name], source)
                for i, (shown, (name, _, feats, pooled, source)) in enumerate(zip(names, calls))]  # fmt: skip


def _share_text(layers: list[LayerInfo]) -> str:
    pairs = [f"{layer.name!r} reads the input of {layers[layer.shares_input_with].name!r}"
             for layer in layers if layer.shares_input_with is not None]  # fmt: skip
    return "; ".join(pairs) or "none shared"


def _call_names(calls: list[tuple[str, int]]) -> list[str]:
    """Layer names per call: the module's own name, or ``NAME#k`` for the k-th call of a module run repeatedly."""
    counts = Counter(name for name, _ in calls)
    return [name if counts[name] == 1 else f"{name}#{k}" for name, k in calls]


def _row_hints(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, int]:
    """The row dim each audited module declares (``batch_first``), own or its transformer layer's."""
    ids = {id(m): n for n, m in model.named_modules()}
    hints = {}
    for layer, mod in modules.items():
        path = ids.get(id(mod), "")
        parts = path.split(".") if path else []
        parents = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1)]  # nearest first
        hint = row_hint(mod, parents)
        if hint is not None:
            hints[layer] = hint
    return hints
