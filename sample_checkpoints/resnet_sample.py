"""Make the sample ResNet checkpoint and image dataset: ``python sample_checkpoints/resnet_sample.py``.

A synthetic image-regression task: each 3×16×16 uint8 image holds one soft Gaussian blob on a smooth
random background; the t = 2 targets are the blob's (x, y) position, standardised. A tiny CIFAR-style
ResNet (BasicBlock, stages 8-16-32) is trained on it with SGD, momentum 0.9 and weight decay 5e-3 — the
regime in which the paper finds Deep Neural Regression Collapse in the top layers — in about a minute on
one CPU thread, deterministically. Outputs, next to each other:

- ``resnet_wd.safetensors`` — the state dict, metadata ``nrc_audit.arch = {"family": "resnet", …}``;
- ``images.h5`` — ``X`` uint8 (N, 3, 16, 16) and ``Y`` float32 (N, 2).

Audit them with ``nrc-audit sample_checkpoints/resnet_wd.safetensors sample_checkpoints/images.h5 --scale-uint8``.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from nrc_audit import save_checkpoint
from nrc_audit.models.resnet import make_resnet

NUM_IMAGES = 1280
SIZE = 16  # images are 3 × SIZE × SIZE
WIDTHS = (8, 16, 32)
EPOCHS = 60
BATCH = 64
LR = 0.05
WEIGHT_DECAY = 5e-3
MOMENTUM = 0.9


def make_blob_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, S, S) uint8 images with one Gaussian blob each, and the standardised blob centres (N, 2) float32."""
    rng = np.random.default_rng(seed)
    grid = np.arange(SIZE, dtype=np.float64)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")  # (S, S)
    centre = rng.uniform(2.5, SIZE - 3.5, size=(n, 2))  # (N, 2) blob (x, y) in pixels
    radius = rng.uniform(1.5, 2.5, size=(n, 1, 1))
    blob = np.exp(-((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) / (2 * radius**2))
    colour = rng.uniform(0.5, 1.0, size=(n, 3, 1, 1))  # per-channel blob brightness
    slope = rng.uniform(-0.15, 0.15, size=(n, 3, 2))  # smooth background gradient
    background = 0.25 + (slope[..., 0, None, None] * (xx - SIZE / 2) + slope[..., 1, None, None] * (yy - SIZE / 2)) / SIZE
    image = background + colour * blob[:, None]  # (N, 3, S, S) in about [0, 1.3]
    x = np.clip(np.round(image * 190.0), 0, 255).astype(np.uint8)
    y = (centre - centre.mean(axis=0)) / centre.std(axis=0)
    return x, y.astype(np.float32)


def train(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[nn.Module, float]:
    """SGD with momentum and weight decay, cosine learning rate; returns the model (eval mode) and train MSE."""
    torch.manual_seed(seed)
    model = make_resnet("basic", blocks=(1, 1, 1), widths=WIDTHS, in_channels=3, num_outputs=y.shape[1])
    inputs = torch.from_numpy(x).to(torch.float32) / 255.0  # (N, 3, S, S), as audited with --scale-uint8
    targets = torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(inputs), generator=gen).split(BATCH):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(inputs[idx]), targets[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(model(inputs), targets))
    return model, mse


def make_resnet_sample(out_dir: Path, seed: int = 0) -> dict[str, float]:
    """Write ``resnet_wd.safetensors`` and ``images.h5`` into ``out_dir``; returns train MSE and seconds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y = make_blob_images(NUM_IMAGES, seed)
    model, mse = train(x, y, seed)
    arch = {"family": "resnet", "stem_stride": 1, "maxpool": False, "stage_strides": [1, 2, 2]}
    # one metadata key only: safetensors writes several in a random order, and the sample must be byte-stable
    save_checkpoint(model, out_dir / "resnet_wd.safetensors", arch=arch)
    with h5py.File(out_dir / "images.h5", "w") as fh:
        fh.create_dataset("X", data=x, chunks=(256, 3, SIZE, SIZE), compression="gzip", compression_opts=9,
                          shuffle=True)  # fmt: skip
        fh.create_dataset("Y", data=y, compression="gzip", compression_opts=9)
        fh.attrs["description"] = "3x16x16 Gaussian-blob images; Y = standardised blob centre (x, y)"
    return {"train_mse": mse, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    print(make_resnet_sample(Path(__file__).parent))
