"""What every architecture builder returns, and the strict state-dict loading they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nrc_audit.errors import CheckpointError


@dataclass
class ResolvedModel:
    """A model ready for extraction, and what had to be assumed to build it."""

    module: nn.Module
    architecture: str
    assumptions: list[str] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with every missing, unexpected and mis-shaped key in one message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and own[k].shape != sd[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"mis-shaped keys {shapes}")  # a quoted list: no '[name…]' for Rich to read as markup
        raise CheckpointError(
            f"{path}: the state dict does not fit the model: {', '.join(parts)}. Check that the checkpoint "
            "and the architecture (--model-def, or the nrc_audit.arch metadata) belong together."
        )
    module.to(_compute_dtype(sd))
    module.load_state_dict(sd, strict=True)


def _compute_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """float64 checkpoints run in float64 (exact features); everything else in float32."""
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    return torch.float64 if dtypes == {torch.float64} else torch.float32
