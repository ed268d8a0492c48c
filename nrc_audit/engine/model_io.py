"""What goes into the model and what comes out of it: output containers and the width check by execution.

* :func:`select_output` reduces whatever ``model(x)`` returns — a tensor, a tuple (first element), a dict or
  a Hugging Face ``ModelOutput`` (``logits``, or the entry named by ``--output-key``) — to one tensor.
* :func:`check_first_layer` runs the model on a probe batch (the data's first rows) and checks the first
  Linear/Conv layer *actually called*, so module declaration order (a head declared before the body, an
  embedding in front of the first Linear) never produces a false width error.
* :func:`prepare_inputs` settles what the data file gives the model before the pass: uint8 X stays integer
  ids when the model's first layer is an embedding; a padding mask in the file is passed to a forward that
  takes ``attention_mask``, or recorded (and warned about) when the model cannot take it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nrc_audit.config import DataOptions
from nrc_audit.core.diagnostics import UNUSED_MASK_NOTE
from nrc_audit.errors import ModelDataMismatchError, OptionsError
from nrc_audit.io.dataset import HDF5Dataset

DEFAULT_OUTPUT_KEY = "logits"
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def select_output(raw: Any, key: str | None = None) -> tuple[torch.Tensor, str]:
    """The audited output tensor of ``model(x)`` and a report note saying how it was read.

    Raises:
        ModelDataMismatchError: the container holds no tensor at ``key`` (the message lists its entries and
            names ``--output-key``), or the model returned something that is not a tensor container.
    """
    if isinstance(raw, torch.Tensor):
        if key is not None:
            raise OptionsError(f"--output-key {key!r} was given, but the model returns a plain tensor; drop the option.")
        return raw, "model output: a tensor"
    if isinstance(raw, Mapping):  # dicts and transformers.ModelOutput (an OrderedDict subclass)
        name = key or DEFAULT_OUTPUT_KEY
        value = raw.get(name)
        if not isinstance(value, torch.Tensor):
            present = [k for k, v in raw.items() if isinstance(v, torch.Tensor)]
            raise ModelDataMismatchError(
                f"the model returns a {type(raw).__name__} without a tensor {name!r}; its tensor entries are "
                f"{present}. Pass --output-key NAME to choose the one holding the regression output."
            )
        return value, f"model output: entry {name!r} of the {type(raw).__name__} the model returns"
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        if key is not None:
            raise OptionsError(f"--output-key {key!r} was given, but the model returns a {type(raw).__name__}; "
                               "its first element is audited. Drop the option.")  # fmt: skip
        return raw[0], f"model output: the first element of the {type(raw).__name__} the model returns"
    raise ModelDataMismatchError(
        f"the model returns a {type(raw).__name__}; nrc-audit reads a tensor, a tuple (first element), a dict or "
        "a ModelOutput (entry 'logits' or --output-key NAME). Wrap the model with --model-def to return the output."
    )


class _Stop(Exception):
    """Raised from the probe hook to end the forward pass after the first weight layer."""


def check_first_layer(model: nn.Module, x: torch.Tensor, extra: dict[str, torch.Tensor],
                      input_shape: tuple[int, ...]) -> None:  # fmt: skip
    """Fail early, with a clear message, when the first layer called on ``x`` cannot take its input.

    ``x`` (B, …) is a probe batch already on the model's device and dtype. A forward that fails before any
    weight layer runs (or for another reason) is left to the pass, which reports it with the row numbers.
    """
    seen: list[tuple[str, nn.Module, torch.Size]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, torch.Tensor):
            seen.append((names.get(id(module), "?"), module, first.shape))
        raise _Stop

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, _WEIGHT_LAYERS)]  # fmt: skip
    try:
        with torch.inference_mode():
            model(x, **extra)
    except _Stop:
        pass
    except (Exception, SystemExit):  # noqa: BLE001 - user code (even sys.exit): reported by the pass, fenced
        return
    finally:
        for h in handles:
            h.remove()
    if seen:
        _check_fit(*seen[0], input_shape)


def _check_fit(name: str, module: nn.Module, shape: torch.Size, input_shape: tuple[int, ...]) -> None:
    if isinstance(module, nn.Linear) and shape[-1] != module.in_features:
        raise ModelDataMismatchError(
            f"the data's samples (shape {input_shape}) reach the first layer the model runs, Linear {name!r}, "
            f"with {shape[-1]} features, but it takes {module.in_features}. Check --x-key, or that the "
            "checkpoint belongs to this dataset."
        )
    if isinstance(module, nn.MultiheadAttention) and shape[-1] != module.embed_dim:
        raise ModelDataMismatchError(
            f"the data's samples (shape {input_shape}) reach the first layer the model runs, MultiheadAttention "
            f"{name!r}, with width {shape[-1]}, but its embed_dim is {module.embed_dim}. Check --x-key."
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(shape) >= 2 and shape[1] != module.in_channels:
        hint = " For (N, H, W, C) data pass --channels-last." if len(shape) == 4 else ""
        raise ModelDataMismatchError(
            f"the images have {shape[1]} channels (shape {input_shape}) but the first conv the model runs, "
            f"{name!r}, takes {module.in_channels}.{hint}"
        )


def probe_batch(ds: HDF5Dataset, device: torch.device, dtype: torch.dtype, rows: int = 2
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The data's first ``rows`` samples as the model sees them: x (B, …) and the extra inputs (``--input-key``)."""
    _, x, _ = next(iter(ds.batches(rows, 0, min(rows, ds.info.num_samples))))
    x = x.to(device, dtype=dtype if x.is_floating_point() else None)
    extra = {k: v.to(device) for k, v in ds.extras(0, len(x)).items()}
    return x, extra


def _first_leaf(model: nn.Module, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> nn.Module | None:
    """The first module without children that the forward calls on ``x`` (None when the forward fails first)."""
    seen: list[nn.Module] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(module)
        raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(x, **extra)
    except _Stop:
        pass
    except (Exception, SystemExit):  # noqa: BLE001 - user code: its failure is reported by the pass
        pass
    finally:
        for h in handles:
            h.remove()
    return seen[0] if seen else None


def _takes_keyword(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def prepare_inputs(model: nn.Module, ds: HDF5Dataset, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Settle the model's inputs from the data file, run the width check, and return the report notes.

    Raises:
        ModelDataMismatchError: the first layer the model runs cannot take the data (:func:`check_first_layer`).
    """
    notes: list[str] = []
    if ds.info.x_kind == "uint8":
        x, extra = probe_batch(ds, device, dtype)
        if isinstance(_first_leaf(model, x.long(), extra), _EMBEDDINGS):
            ds.keep_integer_ids()
    for key in ds.unused_masks():
        if _takes_keyword(model, "attention_mask"):
            ds.add_input("attention_mask", key)
            notes.append(f"attention mask: the data file's {key!r} passed as attention_mask= (the model's forward "
                         "takes one); it also masks token pooling")  # fmt: skip
        else:
            notes.append(f"{UNUSED_MASK_NOTE}: the data file holds {key!r}, but the model's forward takes no "
                         "attention_mask, so padded positions were fed and pooled as real tokens")  # fmt: skip
    check_first_layer(model, *probe_batch(ds, device, dtype), ds.info.input_shape)
    return ds.notes + notes


def lazy_dry_run(path: Path, opts: DataOptions) -> Callable[[nn.Module], None]:
    """The forward that shapes a model's lazy modules: the data's first rows, on the CPU, in float32."""

    def run(module: nn.Module) -> None:
        with HDF5Dataset(path, opts) as ds, torch.no_grad():
            x, extra = probe_batch(ds, torch.device("cpu"), torch.float32)
            module(x, **extra)

    return run


def check_output(out: torch.Tensor, t: int) -> torch.Tensor:
    """Model output must be (B, t), or (B,) when t = 1; returns (B, t)."""
    if out.ndim == 1 and t == 1:
        return out.unsqueeze(1)
    if out.ndim != 2 or out.shape[1] != t:
        raise ModelDataMismatchError(
            f"the model's output has shape {tuple(out.shape)} per batch, but the targets have {t} columns; "
            f"expected (B, {t}). Is this a regression model for these targets (check --y-key)?"
        )
    return out


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
