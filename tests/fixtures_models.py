"""Test helpers for convolutional and custom models: an independent torchvision-style ResNet, feature capture
with our own hooks, image datasets and the comparison of a report against ``tests/reference.py``.

The ResNet here is written after torchvision's ``resnet.py`` and never imports ``nrc_audit.models``: the audit
rebuilds the network from the checkpoint keys alone, and the tests check that it computes the same function.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from reference import cut_margins, reference_metrics, subspaces_comparable

ABS_TOL = 1e-6  # nrc1, nrc2, cka_signal, bound, nrc3/noise_alignment
REL_TOL = 1e-6  # nrc4, nrc4_ratio



# ----------------------------------------------------------------------------- reference ResNet


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # stride on the 3x3 (torchvision v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class RefResNet(nn.Module):
    """torchvision's ResNet with any number of stages/widths, a CIFAR or ImageNet stem and an optional MLP head.

    ``head_hidden`` gives ``fc = Sequential(Linear, LayerNorm, ReLU, Linear)`` (keys fc.0, fc.1, fc.3).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], widths: list[int], in_ch: int = 3, t: int = 2,
                 stem: str = "cifar", head_hidden: int | None = None, stem_stride: int | None = None,
                 maxpool: bool | None = None, stage_strides: list[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        imagenet = stem == "imagenet"
        k = 7 if imagenet else 3
        s = stem_stride if stem_stride is not None else (2 if imagenet else 1)
        self.c = widths[0]
        self.conv1 = nn.Conv2d(in_ch, self.c, kernel_size=k, stride=s, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(self.c)
        self.relu = nn.ReLU(inplace=True)
        use_pool = imagenet if maxpool is None else maxpool
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if use_pool else nn.Identity()
        strides = stage_strides or [1] + [2] * (len(layers) - 1)
        self.stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            name = f"layer{i + 1}"
            setattr(self, name, self._make_layer(block, w, n, strides[i]))
            self.stages.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        feat = widths[-1] * block.expansion
        if head_hidden is None:
            self.fc: nn.Module = nn.Linear(feat, t)
        else:
            self.fc = nn.Sequential(nn.Linear(feat, head_hidden), nn.LayerNorm(head_hidden), nn.ReLU(),
                                    nn.Linear(head_hidden, t))  # fmt: skip

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.c != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.c, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))  # fmt: skip
        layers = [block(self.c, planes, stride, downsample)]
        self.c = planes * block.expansion
        layers += [block(self.c, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def make_ref_resnet(seed: int = 0, block: str = "basic", **kwargs) -> RefResNet:
    """A RefResNet with random weights *and* random BatchNorm statistics/affines (so that loading them matters)."""
    torch.manual_seed(seed)
    net = RefResNet(BasicBlock if block == "basic" else Bottleneck, **kwargs)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.num_batches_tracked.fill_(7)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return net.eval()


# ----------------------------------------------------------------------------- data


def make_images(n: int, c: int = 3, hw: int = 8, seed: int = 0) -> np.ndarray:
    """(N, C, H, W) uint8 images: smooth random patterns plus pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, hw), np.linspace(-1, 1, hw), indexing="ij")
    coef = rng.normal(size=(n, c, 4))
    base = coef[..., 0, None, None] * xx + coef[..., 1, None, None] * yy + coef[..., 2, None, None] * xx * yy
    base = base + coef[..., 3, None, None] + 0.5 * rng.normal(size=(n, c, hw, hw))
    return np.clip(128 + 40 * base, 0, 255).astype(np.uint8)


def targets_from(out: np.ndarray, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    """Targets related to a model's output (N, t) (so every metric is far from trivial), float32 (N, t)."""
    rng = np.random.default_rng(seed)
    y = out + noise * out.std(axis=0, keepdims=True) * rng.normal(size=out.shape)
    return y.astype(np.float32)


def write_h5(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as fh:
        for key, value in arrays.items():
            fh[key] = value
    return path


# ----------------------------------------------------------------------------- features and comparison


def capture(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Inputs of every Linear/Conv2d in execution order, pooled our own way, and the model output.

    Returns:
        (names in execution order, {name: (N, h) float64 features}, {name: weight float64}, output (N, t) float64).
    """
    names: list[str] = []
    feats: dict[str, np.ndarray] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            def hook(module: nn.Module, inputs: tuple, name: str = name) -> None:
                h = inputs[0].detach().double()  # SPEC §3: pool in float64
                if h.ndim >= 3:  # global average pool of a conv input (or token mean): over all middle/spatial dims
                    h = h.mean(dim=tuple(range(2, h.ndim))) if not isinstance(module, nn.Linear) else h.mean(dim=1)
                names.append(name)
                feats[name] = h.numpy().copy()

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(x).double().numpy()
    finally:
        for handle in handles:
            handle.remove()
    weights = {n: dense_reference_weight(m) for n, m in model.named_modules() if n in feats}
    return names, feats, weights, out.reshape(len(out), -1)


def dense_reference_weight(mod: nn.Module) -> np.ndarray:
    """The dense (c_out, c_in, *k) kernel of a (possibly grouped) conv, read off torch's own grouped conv:
    entry [o, i, a, b] is output channel o's response to a unit impulse at input (i, a, b). Linear: W."""
    w = mod.weight.detach().double()
    if isinstance(mod, nn.Linear) or mod.groups == 1:
        return w.numpy()
    c_in, k = mod.in_channels, tuple(w.shape[2:])
    eye = torch.eye(c_in * int(np.prod(k)), dtype=torch.float64).reshape(-1, c_in, *k)  # one impulse per row
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[len(k)]
    resp = conv(eye, w, groups=mod.groups).reshape(len(eye), -1)  # (c_in·∏k, c_out)
    return resp.T.reshape(w.shape[0], c_in, *k).numpy()


def default_names(names: list[str], layers: tuple[str, ...] = (), exclude: tuple[str, ...] = ("*downsample*",)) -> list[str]:
    keep = [n for n in names if not layers or any(fnmatch.fnmatchcase(n, p) for p in layers)]
    return [n for n in keep if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def assert_layers_match(report_layers: list, names: list[str], feats: dict[str, np.ndarray],
                        weights: dict[str, np.ndarray], y: np.ndarray, out: np.ndarray, k: int | None = None,
                        pinv_rtol: float = 1e-3) -> int:  # fmt: skip
    """Compare every SPEC §4 field of the report's layers (objects or dicts) with the dense reference.

    Returns the number of layers where nrc3/noise_alignment were comparable (eigengap rule).
    """
    y = y.reshape(len(y), -1).astype(np.float64)
    k = k or y.shape[1]
    model_mse = float(((out - y) ** 2).mean())
    got_names = [_get(r, "name") for r in report_layers]
    assert got_names == names
    compared = 0
    for row, name in zip(report_layers, names):
        h, w = feats[name], weights[name]
        ref = reference_metrics(h, y, w, k, model_mse, pinv_rtol)
        assert _get(row, "in_dim") == h.shape[1]
        for key in ("nrc1", "nrc2", "cka_signal", "stable_rank_w"):
            assert _get(row, key) == _approx(ref[key], ABS_TOL), (name, key)
        bound = _get(row, "bound")
        assert bound["rhs"] == _approx(ref["bound_rhs"], ABS_TOL), (name, "bound_rhs")
        margin_h, margin_y = cut_margins(h, y, pinv_rtol)
        if margin_y > 1e-6:
            assert bound["lhs"] == _approx(ref["bound_lhs"], ABS_TOL), (name, "bound_lhs")
        if margin_h > 1e-6:
            assert _get(row, "nrc4") == _approx(ref["nrc4"], rel=REL_TOL), (name, "nrc4")
            assert _get(row, "nrc4_ratio") == _approx(ref["nrc4_ratio"], rel=REL_TOL), (name, "nrc4_ratio")
        for key in ("stable_rank", "stable_rank_cov"):
            assert _get(row, key) == _approx(ref[key], rel=1e-6), (name, key)
        if subspaces_comparable(h, w, k):
            compared += 1
            for key in ("nrc3", "noise_alignment"):
                assert _get(row, key) == _approx(ref[key], ABS_TOL), (name, key)
    return compared


def _get(row, key: str):
    return row[key] if isinstance(row, dict) else getattr(row, key)


def _approx(value, abs_tol: float | None = None, rel: float | None = None):
    if value is None:
        return None
    return pytest.approx(value, abs=abs_tol if abs_tol is not None else 0.0, rel=rel if rel is not None else 0.0)
