"""What identifies a saved network beyond its tensors: a fingerprint and the module layout.

* The **fingerprint** (:data:`FINGERPRINT_KEY`) is the model's output on a seeded probe batch, written by
  ``save_checkpoint``. A model rebuilt from the state dict (auto-detection or arch metadata) must reproduce
  it before the audit runs (:func:`fingerprint_mismatch`), so a different network is never audited silently.
* The **layout** (:data:`LAYOUT_KEY`) lists every leaf module — class and the settings that have no tensors
  (activations, norms without affine parameters, eps) — so the builders need not guess them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

FINGERPRINT_KEY = "nrc_audit.fingerprint"
LAYOUT_KEY = "nrc_audit.layout"
PROBE_ROWS = 4
PROBE_SEED = 0
MAX_VALUES = 1024  # fingerprint values kept (the first ones of the flattened output)
RTOL = 1e-4  # of max |output|: float32 forwards on other BLAS builds differ by ~1e-6 relative
_CONV_PROBE = {nn.Conv1d: (64,), nn.Conv2d: (32, 32), nn.Conv3d: (8, 8, 8)}  # spatial size of a generated probe
# module settings that carry no tensor but change the function (recorded in the layout)
_SETTINGS = ("normalized_shape", "eps", "elementwise_affine", "affine", "track_running_stats", "negative_slope",
             "approximate", "alpha", "beta", "threshold", "start_dim", "end_dim", "p", "dim", "inplace")  # fmt: skip


def probe_input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = PROBE_SEED) -> torch.Tensor:
    """The seeded probe batch, N(0, 1) drawn in float64 on the CPU then cast (reproducible everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


def _first_output(raw: Any) -> torch.Tensor | None:
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, Mapping):
        value = raw.get("logits")
        return value if isinstance(value, torch.Tensor) else None
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        return raw[0]
    return None


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Eval-mode outputs on ``x`` as float64, or None when the model cannot run on it."""
    out, _ = _try_outputs(model, x)
    return out


def _try_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, BaseException | None]:
    """``_outputs`` and, when the forward raised, the exception (user code may even raise SystemExit)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _first_output(model(x))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - no fingerprint for a model that needs other inputs
        return None, exc
    finally:
        model.train(was_training)
    return (None if out is None else out.detach().to("cpu", torch.float64)), None


def _guess_probe_shape(model: nn.Module) -> tuple[int, ...] | None:
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            return (PROBE_ROWS, mod.in_features)
        for cls, spatial in _CONV_PROBE.items():
            if isinstance(mod, cls):
                return (PROBE_ROWS, mod.in_channels, *spatial)
    return None


def make_fingerprint(model: nn.Module, probe_shape: tuple[int, ...] | None = None) -> dict[str, Any] | None:
    """``{"probe_shape", "seed", "output_shape", "outputs"}`` for ``model``, or None when no probe runs.

    Half-precision models are fingerprinted on a float32 copy, as nrc-audit runs them (upcast).
    """
    shape = tuple(probe_shape) if probe_shape is not None else _guess_probe_shape(model)
    if shape is None:
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        model, dtype = copy.deepcopy(model).float(), torch.float32
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = _outputs(model, probe_input(shape, dtype).to(device))
    if out is None:
        return None
    return {"probe_shape": list(shape), "seed": PROBE_SEED, "output_shape": list(out.shape),
            "outputs": [float(v) for v in out.reshape(-1)[:MAX_VALUES]]}  # fmt: skip


def fingerprint_mismatch(model: nn.Module, fingerprint: dict[str, Any]) -> str | None:
    """None when ``model`` reproduces ``fingerprint``; otherwise what differs, in words."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = probe_input(tuple(fingerprint["probe_shape"]), dtype, int(fingerprint.get("seed", PROBE_SEED)))
    out, exc = _try_outputs(model, x)
    if out is None:
        raised = ""
        if exc is not None:
            text = str(exc).strip()
            first = text.splitlines()[0][:300] if text else "(no message)"
            raised = f" ({type(model).__module__}.{type(model).__qualname__}.forward raised {type(exc).__name__}: {first})"
        return f"the rebuilt model does not run on the saved probe batch of shape {tuple(x.shape)}{raised}"
    if list(out.shape) != list(fingerprint["output_shape"]):
        return f"output shape {tuple(out.shape)} on the probe batch, saved {tuple(fingerprint['output_shape'])}"
    ref = torch.tensor(fingerprint["outputs"], dtype=torch.float64)
    got = out.reshape(-1)[: len(ref)]
    scale = float(ref.abs().max()) if len(ref) else 0.0
    diff = float((got - ref).abs().max()) if len(ref) else 0.0
    if diff > RTOL * max(scale, 1e-12) + 1e-7:
        return f"outputs on the probe batch differ from the saved ones by up to {diff:.3g} (outputs up to {scale:.3g})"
    return None


def module_layout(model: nn.Module) -> list[list[Any]]:
    """[[path, class name, {setting: value}], …] for every leaf module, in definition order."""
    rows = []
    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):
            settings = {k: _plain(getattr(mod, k)) for k in _SETTINGS if hasattr(mod, k)}
            if isinstance(mod, nn.LayerNorm):
                settings["bias"] = mod.bias is not None
            rows.append([name, type(mod).__name__, settings])
    return rows


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def fingerprint_metadata(model: nn.Module, probe_shape: tuple[int, ...] | None = None) -> dict[str, str]:
    """The metadata entries ``save_checkpoint`` adds: the layout always, the fingerprint when a probe runs."""
    meta = {LAYOUT_KEY: json.dumps(module_layout(model), sort_keys=True)}
    fp = make_fingerprint(model, probe_shape)
    if fp is not None:
        meta[FINGERPRINT_KEY] = json.dumps(fp, sort_keys=True)
    return meta
