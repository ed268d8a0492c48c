"""``--model-def`` callables for tests/test_library_models.py: tiny library models built from configs (never
downloaded) and small hand-written nets that provoke one failure mode each."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tv_ops  # noqa: E402,F401  - before torchvision/timm/transformers

T_DIM = 2  # regression targets of the vision tests


def timm_convnext() -> nn.Module:
    """timm ConvNeXt: depthwise 7×7 convs, Linear MLPs on channels-last (B, H, W, C) inputs, LayerNorm2d."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(in_chans=3, num_classes=T_DIM, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), drop_path_rate=0.0)


def tv_vit() -> nn.Module:
    """torchvision VisionTransformer: nn.MultiheadAttention (packed in_proj, functional out_proj)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=T_DIM)  # fmt: skip


def bert(config: dict) -> nn.Module:
    """The documented recipe: the config.json next to the weights arrives as ``config``; no wrapper."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig.from_dict(config))


class HeadFirst(nn.Module):
    """Declares its head before its body: definition order ≠ execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 2)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TokenNet(nn.Module):
    """Token ids (B, T=12) → embedding width 16 ≠ T → Linear on (B, T, 16) → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mix = nn.Linear(16, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))).mean(dim=1))


class ConvKinds(nn.Module):
    """Grouped Conv2d (c_in/g = 2), depthwise Conv2d (c_in/g = 1), grouped Conv1d and a Conv3d on (B, 8, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.seq = nn.Conv1d(8, 8, 3, groups=2)
        self.vol = nn.Conv3d(1, 4, 3)
        self.head = nn.Linear(8 + 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.depthwise(torch.relu(self.grouped(x))))  # (B, 8, 6, 6)
        b = torch.relu(self.seq(a.flatten(2)))  # (B, 8, 34)
        c = torch.relu(self.vol(x.unsqueeze(1)))  # (B, 4, 6, 4, 4)
        return self.head(torch.cat([b.mean(dim=2), c.mean(dim=(2, 3, 4))], dim=1))


class LargeMean(nn.Module):
    """Inputs of mean 1e3 and std 1e-3 reach a 1×1 conv (over 8×8 positions) and a Linear on (B, 16, 4) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)
        self.tok = nn.Linear(4, 6)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 4, 8, 8)
        a = self.conv(x).mean(dim=(2, 3)) - self.conv.bias  # the conv sees the data: channel means 1e3
        b = self.tok(x.flatten(2).transpose(1, 2)[:, :16]).mean(dim=1)  # tokens (B, 16, 4) of mean 1e3
        return self.head(torch.cat([a, b], dim=1) - 1e3)


class DictOut(nn.Module):
    """Returns ``{"prediction": (B, 2)}`` — no 'logits' entry."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict:
        return {"prediction": self.fc(x), "aux": x.sum(dim=1)}


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.fc(x), x


class Encoder(nn.Module):
    """nn.TransformerEncoder (batch_first): in eval mode PyTorch's fused fast path would skip every hook."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 24) → tokens (B, 8, 3)
        return self.head(self.enc(self.inp(x.reshape(len(x), 8, 3))).mean(dim=1))


class CrossAttention(nn.Module):
    """MultiheadAttention with a different key/value: its packed in-projection takes two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 24) → query (B, 3, 4), memory (B, 3, 4)
        q, m = x.reshape(len(x), 6, 4).split(3, dim=1)
        return self.head(self.attn(q, m, m, need_weights=False)[0].mean(dim=1))
