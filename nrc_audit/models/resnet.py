"""torchvision-compatible ResNets rebuilt from state-dict keys and shapes (SPEC §1), without torchvision.

What the keys say: ``conv1``/``bn1`` (stem), ``layerS.B.convJ``/``bnJ`` (stage S, block B; a ``conv3`` in
``layer1.0`` means Bottleneck blocks), ``layerS.B.downsample.0/1`` (1×1 conv + BN shortcut) and ``fc`` (a
Linear, or a small MLP head ``fc.0``, ``fc.1`` LayerNorm, …). Every width, kernel size and group count is read
from the weight shapes. What the keys cannot say follows torchvision, overridable in the ``nrc_audit.arch``
metadata (``{"family": "resnet", "stem_stride": 1, "maxpool": false, "stage_strides": [1, 2, 2]}``):

- a 7×7 stem conv strides 2 and is followed by a 3×3/2 max-pool; a smaller stem (the CIFAR-style 3×3)
  strides 1 with no max-pool;
- the first stage has stride 1, every later stage strides 2 in its first block — on ``conv1`` in a
  BasicBlock, on the 3×3 ``conv2`` in a Bottleneck (torchvision's "v1.5");
- global average pooling before ``fc``; ``head_activation`` (default ``relu``) between the head's Linears.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from nrc_audit.config import ModelOptions
from nrc_audit.errors import CheckpointError
from nrc_audit.io.checkpoint import Checkpoint
from nrc_audit.models import mlp as mlp_family
from nrc_audit.models.base import ResolvedModel, load_strict

BLOCK_CONVS = {"basic": 2, "bottleneck": 3}  # convolutions on a block's main path
STRIDED_CONV = {"basic": 1, "bottleneck": 2}  # which of them carries the stage stride (torchvision v1.5)
IMAGENET_STEM_KERNEL = 7  # a stem this large means stride 2 + max-pool (torchvision); smaller: CIFAR style
DEFAULT_HEAD_ACTIVATION = "relu"
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


@dataclass(frozen=True)
class ConvSpec:
    """One Conv2d: channels, kernel, groups and bias, as read from its weight (out, in/groups, kh, kw)."""

    in_ch: int
    out_ch: int
    kernel: tuple[int, int]
    groups: int = 1
    bias: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """A residual block: its main-path convs (each followed by a norm), stride and optional shortcut conv."""

    convs: tuple[ConvSpec, ...]
    stride: int
    downsample: ConvSpec | None


@dataclass(frozen=True)
class ResNetSpec:
    """Everything needed to rebuild the network. ``head`` is (in, out, bias) for a Linear ``fc``, or the
    MLPSpec of a Sequential head. ``norm`` is (affine, running stats) of every BatchNorm2d, None when absent."""

    block: str  # "basic" | "bottleneck"
    stem: ConvSpec
    stem_stride: int
    maxpool: bool
    stages: tuple[tuple[BlockSpec, ...], ...]
    head: tuple[int, int, bool] | mlp_family.MLPSpec
    head_activation: str = DEFAULT_HEAD_ACTIVATION
    norm: tuple[bool, bool] | None = (True, True)

    def describe(self) -> str:
        kh, kw = self.stem.kernel
        stem = f"{kh}x{kw}/{self.stem_stride}" + ("+maxpool" if self.maxpool else "")
        blocks = [len(stage) for stage in self.stages]
        widths = [stage[0].convs[0].out_ch for stage in self.stages]
        if isinstance(self.head, mlp_family.MLPSpec):
            head = self.head.describe(self.head_activation)
        else:
            head = f"linear({self.head[0]}→{self.head[1]})"
        return f"resnet({self.block}, stem={stem}, stages={blocks}, widths={widths}, head={head})"


# ----------------------------------------------------------------------------- modules


def _conv(spec: ConvSpec, stride: int) -> nn.Conv2d:
    kh, kw = spec.kernel
    return nn.Conv2d(spec.in_ch, spec.out_ch, (kh, kw), stride=stride, padding=(kh // 2, kw // 2),
                     groups=spec.groups, bias=spec.bias)  # fmt: skip


def _norm(norm: tuple[bool, bool] | None, channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    affine, track = norm
    return nn.BatchNorm2d(channels, affine=affine, track_running_stats=track)


class Block(nn.Module):
    """BasicBlock (conv1-conv2) or Bottleneck (conv1-conv2-conv3) with torchvision's names and order."""

    def __init__(self, spec: BlockSpec, kind: str, norm: tuple[bool, bool] | None) -> None:
        super().__init__()
        self.num_convs = len(spec.convs)
        for j, conv in enumerate(spec.convs, start=1):
            stride = spec.stride if j == STRIDED_CONV[kind] else 1
            self.add_module(f"conv{j}", _conv(conv, stride))
            self.add_module(f"bn{j}", _norm(norm, conv.out_ch))
        self.relu = nn.ReLU()
        self.downsample = None
        if spec.downsample is not None:
            self.downsample = nn.Sequential(_conv(spec.downsample, spec.stride), _norm(norm, spec.downsample.out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for j in range(1, self.num_convs + 1):
            out = getattr(self, f"bn{j}")(getattr(self, f"conv{j}")(out))
            if j < self.num_convs:
                out = self.relu(out)
        # torchvision runs the shortcut after the main path: the audit's execution order follows it
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """stem → max-pool? → layer1 … layerS → global average pool → fc; output (B, t)."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.conv1 = _conv(spec.stem, spec.stem_stride)
        self.bn1 = _norm(spec.norm, spec.stem.out_ch)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if spec.maxpool else nn.Identity()
        self.num_stages = len(spec.stages)
        for s, stage in enumerate(spec.stages, start=1):
            self.add_module(f"layer{s}", nn.Sequential(*(Block(b, spec.block, spec.norm) for b in stage)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if isinstance(spec.head, mlp_family.MLPSpec):
            self.fc = mlp_family.build_mlp(spec.head, spec.head_activation)
        else:
            self.fc = nn.Linear(spec.head[0], spec.head[1], bias=spec.head[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, c_0, H', W')
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        x = torch.flatten(self.avgpool(x), 1)  # (B, c_S) after global average pool
        return self.fc(x)  # (B, t)


def build_resnet(spec: ResNetSpec) -> ResNet:
    """A fresh (randomly initialised) ResNet whose state-dict keys are those the spec describes."""
    return ResNet(spec)


def make_resnet(
    block: str = "basic",
    blocks: tuple[int, ...] = (1, 1),
    widths: tuple[int, ...] = (16, 32),
    in_channels: int = 3,
    num_outputs: int = 2,
    cifar_stem: bool = True,
) -> ResNet:
    """A fresh torchvision-style ResNet with a Linear head, e.g. for training small examples.

    Example:
        >>> net = make_resnet("basic", blocks=(1, 1), widths=(8, 16), num_outputs=2)
        >>> net(torch.zeros(4, 3, 16, 16)).shape
        torch.Size([4, 2])
    """
    if block not in BLOCK_CONVS or len(blocks) != len(widths) or not blocks:
        raise ValueError(f"block must be one of {sorted(BLOCK_CONVS)} and blocks/widths two lists of equal length; "
                         f"got {block!r}, {blocks}, {widths}")  # fmt: skip
    expansion = 4 if block == "bottleneck" else 1
    stem_out = widths[0]
    stem = ConvSpec(in_channels, stem_out, (3, 3) if cifar_stem else (7, 7))
    stages: list[tuple[BlockSpec, ...]] = []
    c_in = stem_out
    for s, (n, w) in enumerate(zip(blocks, widths)):
        stage = []
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            c_out = w * expansion
            convs: tuple[ConvSpec, ...]
            if block == "bottleneck":
                convs = (ConvSpec(c_in, w, (1, 1)), ConvSpec(w, w, (3, 3)), ConvSpec(w, c_out, (1, 1)))
            else:
                convs = (ConvSpec(c_in, w, (3, 3)), ConvSpec(w, w, (3, 3)))
            shortcut = ConvSpec(c_in, c_out, (1, 1)) if stride != 1 or c_in != c_out else None
            stage.append(BlockSpec(convs, stride, shortcut))
            c_in = c_out
        stages.append(tuple(stage))
    spec = ResNetSpec(block, stem, 1 if cifar_stem else 2, not cifar_stem, tuple(stages), (c_in, num_outputs, True))
    return build_resnet(spec)


# ----------------------------------------------------------------------------- detection


def looks_like_resnet(sd: dict[str, torch.Tensor]) -> bool:
    """torchvision key names: a 4-D ``conv1.weight`` stem and a ``layer1.0.conv1.weight``."""
    stem = sd.get("conv1.weight")
    return stem is not None and stem.ndim == 4 and "layer1.0.conv1.weight" in sd


def detect_resnet(sd: dict[str, torch.Tensor], arch: dict, head_activation: str | None = None
                  ) -> tuple[ResNetSpec, list[str]] | None:  # fmt: skip
    """Read a :class:`ResNetSpec` from the keys and shapes; None if they do not look like a ResNet.

    Args:
        sd: the state dict (name → tensor).
        arch: the ``nrc_audit.arch`` metadata ({} when absent); may set ``stem_stride``, ``maxpool``,
            ``stage_strides`` and ``head_activation``.
        head_activation: ``--activation``, which wins over the metadata for an MLP head.
    Returns:
        (spec, assumptions) where assumptions lists the conventions used for what the keys cannot say.
    Raises:
        CheckpointError: ResNet keys that cannot form a network (gaps, missing convs, no ``fc``, bad metadata).
    """
    if not looks_like_resnet(sd):
        return None
    assumptions: list[str] = []
    stem_w = sd["conv1.weight"]  # (c_0, c_in, kh, kw)
    stem = ConvSpec(int(stem_w.shape[1]), int(stem_w.shape[0]), (int(stem_w.shape[2]), int(stem_w.shape[3])),
                    bias="conv1.bias" in sd)  # fmt: skip
    imagenet = max(stem.kernel) >= IMAGENET_STEM_KERNEL
    stem_stride = _meta_int(arch, "stem_stride", 2 if imagenet else 1)
    maxpool = _meta_bool(arch, "maxpool", imagenet)
    if "stem_stride" not in arch or "maxpool" not in arch:
        kh, kw = stem.kernel
        assumptions.append(
            f"{kh}x{kw} stem conv: stride {stem_stride}, {'a 3x3/2 max-pool' if maxpool else 'no max-pool'} "
            "(torchvision convention; set stem_stride/maxpool in the nrc_audit.arch metadata to override)"
        )
    counts = _stage_block_counts(sd)
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    strides = _stage_strides(arch, len(counts), assumptions)
    if block == "bottleneck":
        assumptions.append("Bottleneck stride on the 3x3 conv2 (torchvision v1.5)")
    stages, c_in = [], stem.out_ch
    for s, n_blocks in enumerate(counts, start=1):
        stage = []
        for b in range(n_blocks):
            spec = _block_spec(sd, f"layer{s}.{b}", block, c_in, strides[s - 1] if b == 0 else 1)
            stage.append(spec)
            c_in = spec.convs[-1].out_ch
        stages.append(tuple(stage))
    head, act = _head_spec(sd, c_in, arch, head_activation, assumptions)
    norm = None
    if any(k.startswith("bn1.") for k in sd):
        norm = ("bn1.weight" in sd, "bn1.running_mean" in sd)
    return ResNetSpec(block, stem, stem_stride, maxpool, tuple(stages), head, act, norm), assumptions


def _stage_block_counts(sd: dict[str, torch.Tensor]) -> list[int]:
    """Blocks per stage from the ``layerS.B.`` keys; stages 1..S and blocks 0..B−1 must have no gaps."""
    found: dict[int, set[int]] = {}
    for key in sd:
        if m := _BLOCK_KEY.match(key):
            found.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(found)
    if stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(f"ResNet stages {['layer%d' % s for s in stages]} are not numbered layer1, layer2, … "
                              "without gaps; pass --model-def for a custom network.")  # fmt: skip
    counts = []
    for s in stages:
        blocks = sorted(found[s])
        if blocks != list(range(len(blocks))):
            raise CheckpointError(f"ResNet stage layer{s} has blocks {blocks}; expected 0…{len(blocks) - 1} "
                                  "without gaps. Pass --model-def for a custom network.")  # fmt: skip
        counts.append(len(blocks))
    return counts


def _conv_spec(sd: dict[str, torch.Tensor], name: str, c_in: int) -> ConvSpec:
    w = sd.get(f"{name}.weight")
    if w is None or w.ndim != 4:
        found = "missing" if w is None else f"of shape {tuple(w.shape)}"
        raise CheckpointError(
            f"ResNet key {name}.weight is {found}; expected a 4-D conv weight (out, in, kh, kw). "
            "Pass --model-def for a network that is not a torchvision-style ResNet."
        )
    c_out, per_group = int(w.shape[0]), int(w.shape[1])
    groups = c_in // per_group if per_group and c_in % per_group == 0 else 1  # grouped convs (ResNeXt)
    if c_out % groups:
        groups = 1  # not a valid grouping: build it plain and let the strict load report the shape
    return ConvSpec(c_in, c_out, (int(w.shape[2]), int(w.shape[3])), groups, f"{name}.bias" in sd)


def _block_spec(sd: dict[str, torch.Tensor], prefix: str, block: str, c_in: int, stride: int) -> BlockSpec:
    convs, c = [], c_in
    for j in range(1, BLOCK_CONVS[block] + 1):
        conv = _conv_spec(sd, f"{prefix}.conv{j}", c)
        convs.append(conv)
        c = conv.out_ch
    shortcut = None
    if any(key.startswith(f"{prefix}.downsample.") for key in sd):
        shortcut = _conv_spec(sd, f"{prefix}.downsample.0", c_in)
    elif c != c_in or stride != 1:
        raise CheckpointError(
            f"ResNet block {prefix} maps {c_in}→{c} channels with stride {stride} but has no "
            f"{prefix}.downsample.* keys, so its residual cannot be added. If the stage does not stride, set "
            '"stage_strides" in the nrc_audit.arch metadata; otherwise pass --model-def.'
        )
    return BlockSpec(tuple(convs), stride, shortcut)


def _head_spec(sd: dict[str, torch.Tensor], c_in: int, arch: dict, activation: str | None,
               assumptions: list[str]) -> tuple[tuple[int, int, bool] | mlp_family.MLPSpec, str]:  # fmt: skip
    """``fc`` as (in, out, bias) for a Linear, or the MLPSpec of a Sequential head."""
    head_sd = {k[len("fc."):]: v for k, v in sd.items() if k.startswith("fc.")}
    head: tuple[int, int, bool] | mlp_family.MLPSpec | None = None
    act = activation or arch.get("head_activation")
    if "weight" in head_sd and head_sd["weight"].ndim == 2:
        w = head_sd["weight"]
        head, in_dim = (int(w.shape[1]), int(w.shape[0]), "bias" in head_sd), int(w.shape[1])
    elif (spec := mlp_family.detect_mlp(head_sd) if head_sd else None) is not None and not spec.prefix:
        head, in_dim = spec, spec.slots[spec.linear_indices[0]][1]
        if act is None:
            act = DEFAULT_HEAD_ACTIVATION
            assumptions.append(f"activation {act!r} between the fc head's Linear layers assumed "
                               "(set head_activation in the nrc_audit.arch metadata, or --activation)")  # fmt: skip
    if head is None:
        raise CheckpointError(
            "the ResNet has no usable fc head: expected fc.weight (Linear) or an MLP fc.0.weight, fc.3.weight, … "
            f"(found {sorted('fc.' + k for k in head_sd) or 'no fc.* keys'}). Pass --model-def for a custom head."
        )
    if in_dim != c_in:
        raise CheckpointError(f"the fc head takes {in_dim} features but the last ResNet stage outputs {c_in} "
                              "channels. Pass --model-def for a network that is not a torchvision-style ResNet.")  # fmt: skip
    act = act or DEFAULT_HEAD_ACTIVATION
    if act not in mlp_family.ACTIVATIONS:
        raise CheckpointError(f"head activation {act!r} is unknown; choose one of {sorted(mlp_family.ACTIVATIONS)}.")
    return head, act


def _meta_int(arch: dict, key: str, default: int) -> int:
    value = arch.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"nrc_audit.arch metadata {key}={value!r} must be a positive integer.")
    return value


def _meta_bool(arch: dict, key: str, default: bool) -> bool:
    value = arch.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"nrc_audit.arch metadata {key}={value!r} must be true or false.")
    return value


def _stage_strides(arch: dict, num_stages: int, assumptions: list[str]) -> list[int]:
    if "stage_strides" not in arch:
        strides = [1] + [2] * (num_stages - 1)
        assumptions.append(f"stage strides {strides} (torchvision convention; set stage_strides in the "
                           "nrc_audit.arch metadata to override)")  # fmt: skip
        return strides
    strides = arch["stage_strides"]
    if (not isinstance(strides, list) or len(strides) != num_stages
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in strides)):  # fmt: skip
        raise CheckpointError(
            f"nrc_audit.arch metadata stage_strides={strides!r} must list {num_stages} positive integers, "
            "one per stage (layer1 …)."
        )
    return strides


def resolve(ckpt: Checkpoint, arch: dict, opts: ModelOptions) -> ResolvedModel | None:
    """Build the ResNet the checkpoint's keys describe and load its weights strictly; None if not a ResNet.

    Raises:
        CheckpointError: ResNet-like keys that do not form a network, or that do not load strictly.
    """
    found = detect_resnet(ckpt.state_dict, arch, opts.activation)
    if found is None:
        return None
    spec, assumptions = found
    module = build_resnet(spec)
    load_strict(module, ckpt.state_dict, ckpt.path)
    return ResolvedModel(module, spec.describe(), assumptions)
