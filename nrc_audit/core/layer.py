"""The identity of an audited layer, shared by the pass, the feature store and the report."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerInfo:
    """An audited layer: position in execution order, module path, kind, dims and its weight W."""

    index: int
    name: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    in_dim: int  # h (Linear in_features, Conv2d in_channels)
    out_dim: int
    pooled: bool
    weight: torch.Tensor  # Linear (out, h); Conv2d (c_out, c_in, kh, kw); on the CPU, detached
