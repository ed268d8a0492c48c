"""``--model-def`` callables for tests/test_checkpoint_sources.py and tests/test_data_sources.py: small nets
that checkpoints and data files as users have them must reach intact (tiny, built from configs, offline)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tv_ops  # noqa: E402,F401  - before torchvision/timm/transformers


def mlp() -> nn.Sequential:
    """6 → 16 → 16 → 2 with ReLU (what auto-detection assumes): what a LightningModule keeps as ``self.model``."""
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


class LitLike(nn.Module):
    """The LightningModule's own layout: the network under ``model``, a loss without parameters beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = mlp()
        self.loss = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight matrix (``dec.weight is enc.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8, bias=False)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class Lazy(nn.Module):
    """Input width left to the first forward (``nn.LazyLinear``, ``nn.LazyConv1d``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.LazyConv1d(6, 3)
        self.fc = nn.LazyLinear(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 4, 10)
        return self.head(torch.tanh(self.fc(torch.relu(self.conv(x)).flatten(1))))


def lazy() -> nn.Module:
    return Lazy()


def own_weights(checkpoint_path: str) -> nn.Module:
    """A builder that loads its own weights from names of its own (``w0``, ``b0``, …), which are no module's."""
    net = mlp()
    blob = torch.load(checkpoint_path, weights_only=True)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, layer in enumerate(linears):
            layer.weight.copy_(blob[f"w{i}"])
            layer.bias.copy_(blob[f"b{i}"])
    return net.double()


def mixtral(config: dict) -> nn.Module:
    """The README recipe for a transformers-5 model whose on-disk keys are not its module names."""
    from transformers import MixtralConfig, MixtralForSequenceClassification

    return MixtralForSequenceClassification(MixtralConfig.from_dict(config, experts_implementation="eager"))


class SeqLinear(nn.Module):
    """(B, T, d=5) token features → Linear per token → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(5, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(x)).mean(dim=1))


class Signal1d(nn.Module):
    """(B, C=3, L=16) signals → Conv1d → mean over L → head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 5)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=2))


class TokenNet(nn.Module):
    """Token ids (B, T=10) of a 200-word vocabulary → embedding → Linear on (B, T, 16) → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(200, 16)
        self.mix = nn.Linear(16, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))).mean(dim=1))


class MaskFree(nn.Module):
    """Token ids → embedding → mean → head, with a forward that takes no attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(dim=1))


def Tied1() -> nn.Module:  # noqa: N802 - named like the class it varies
    """:class:`Tied` with one regression output (a pandas Series target)."""
    model = Tied()
    model.head = nn.Linear(8, 1)
    return model
