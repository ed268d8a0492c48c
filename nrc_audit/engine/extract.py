"""Forward hooks that capture every audited layer's *input* features in one pass (SPEC §2).

No statistics and no files here: :meth:`FeatureExtractor.run` maps a batch to the model output and the
per-layer features ``{name: (B, h)}`` in execution order. Conv2d inputs (B, c_in, H, W) are averaged over
the spatial dims; Linear inputs with extra dims (B, …, h) are averaged over them (``pooled``).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from nrc_audit.core.layer import LayerInfo
from nrc_audit.errors import ModelDataMismatchError, OptionsError

KINDS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Conv2d: "conv2d"}


def candidate_layers(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linear/Conv2d modules whose path matches an ``include`` glob (all if empty) and no ``exclude`` glob."""
    found = {}
    for name, mod in model.named_modules():
        if type(mod) not in KINDS and not isinstance(mod, tuple(KINDS)):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        found[name] = mod
    if not found:
        raise OptionsError(
            f"no Linear or Conv2d layer is left to audit (--layers {list(include) or 'all'}, "
            f"--exclude {list(exclude)}). Loosen the patterns; layer names look like 'layers.4' or 'layer4.1.conv2'."
        )
    return found


def _kind(mod: nn.Module) -> str:
    return next(kind for cls, kind in KINDS.items() if isinstance(mod, cls))


def _pool(h: torch.Tensor, kind: str) -> tuple[torch.Tensor, bool]:
    """(B, …) module input → (B, h) features and whether it was averaged over extra dims."""
    if kind == "conv2d":
        if h.ndim == 4:
            return h.mean(dim=(2, 3)), True  # (B, c_in) after global average pool
        return h.reshape(h.shape[0], -1), False  # unbatched conv input is not supported by the audit
    if h.ndim > 2:
        return h.mean(dim=tuple(range(1, h.ndim - 1))), True  # (B, h) averaged over tokens/patches
    return h, False


class FeatureExtractor:
    """Captures the inputs of the given modules during :meth:`run`. Use as a context manager.

    The order of the layers is the execution order of the first batch; every later batch must run the same
    modules in the same order. A module called more than once per forward pass (weight sharing) is refused:
    its calls would mix different features under one name — exclude it with ``--exclude``.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: list[tuple[str, torch.Tensor, bool]] = []
        self.layers: list[LayerInfo] | None = None

    def __enter__(self) -> "FeatureExtractor":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name, _kind(mod))))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str, kind: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            feats, pooled = _pool(inputs[0].detach(), kind)
            self._calls.append((name, feats, pooled))

        return hook

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward one batch. Returns (output (B, …), features [(B, h_ℓ) per layer, in layer order])."""
        self._calls.clear()
        with torch.inference_mode():
            out = self.model(x)
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
            w = mod.weight.detach().to("cpu", torch.float64).clone()
            layers.append(LayerInfo(i, name, _kind(mod), int(feats.shape[1]), int(w.shape[0]), pooled, w))
        return layers
