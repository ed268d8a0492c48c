"""Regenerate the sample checkpoints and data set in this folder (deterministic, CPU only).

Run from the repository root::

    python sample_checkpoints/make_samples.py

It writes, next to this file:

- ``data.h5``                 synthetic regression data (keys ``X``, ``Y``, ``test/X``, ``test/Y``);
- ``mlp_wd.safetensors``      ReLU MLP trained WITH weight decay (top layers collapse: the audit gate passes);
- ``mlp_nowd.safetensors``    the same run with weight decay 0 (NRC3 fails in the top layers: the gate fails);
- ``trend/mlp_wd_epoch{E}.safetensors``  the weight-decay run at epochs 20, 60, 100 (collapse setting in).

The setting follows the paper's synthetic experiment (Rangamani & Unal, Deep Neural Regression Collapse,
§4 / PAPER_NOTES.md §4): x ~ N(0, I_20) and targets from a random 2-hidden-layer ReLU network of width
r = 2, mapped linearly to t = 4 outputs (so that part of the target has rank r = 2 < t). A small full-rank
random *linear* term (≈ 10 % of the variance: eigenvalue shares ≈ .63 .27 .06 .04) is added so that every
one of the t target directions carries some learnable signal: with an exactly rank-2 target, NRC3 at
nrc-audit's default rank k = t cannot hold at the last layer (its W has t rows but only r of them are
determined by the data), not even for a perfectly collapsed network. See README.md.

Everything is seeded, single-threaded and uses ``torch.use_deterministic_algorithms(True)``, so two runs
give the same weights (and the same audit numbers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from nrc_audit import save_checkpoint

HERE = Path(__file__).resolve().parent

# ---- data -------------------------------------------------------------------------------------------------
D_IN = 20  # input dimension (paper: d = 20)
T_OUT = 4  # target dimension t
R_HID = 2  # width r of the random target network (intrinsic rank of its part of the target)
N_TRAIN = 3000
N_TEST = 750  # 80/20 split, as in the paper
MINOR_STD = 0.3  # relative std of the small full-rank linear term (see make_data)
DATA_SEED = 14  # both target-net units alive; target eigenvalue shares ≈ .63 .27 .06 .04

# ---- model and training -----------------------------------------------------------------------------------
DEPTH = 6  # number of Linear layers
WIDTH = 64
LR = 0.03
MOMENTUM = 0.9
WEIGHT_DECAY = 3e-3  # the collapsed model; the other model uses 0
EPOCHS = 600
MILESTONES = (EPOCHS // 3, 2 * EPOCHS // 3)  # multi-step LR, ×0.1 at each
GAMMA = 0.1
BATCH = 256
MODEL_SEED = 1  # same initialisation for both models
SHUFFLE_SEED = 2  # same batch order for both models
# Checkpoints of the weight-decay run while collapse sets in (0, 0, then 1 collapsed layer under the
# default thresholds); the run's last epoch is mlp_wd.safetensors itself.
TREND_EPOCHS = (20, 60, 100)


def setup_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, str]]:
    """x ~ N(0, I_20); y = relu(relu(x W1) W2) W3 (rank r) + a small random linear term; standardised.

    The linear term is ``MINOR_STD · std(y_low) · x C`` with C ~ N(0, 1/d): full rank, about 10 % of the
    variance. Mean and std of the standardisation come from the training rows only.
    """
    n = N_TRAIN + N_TEST
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(n, D_IN, generator=g)
    w1 = torch.randn(D_IN, R_HID, generator=g) / D_IN**0.5
    w2 = torch.randn(R_HID, R_HID, generator=g) / R_HID**0.5
    w3 = torch.randn(R_HID, T_OUT, generator=g) / R_HID**0.5
    c = torch.randn(D_IN, T_OUT, generator=g) / D_IN**0.5
    z = torch.relu(torch.relu(x @ w1) @ w2)  # (n, r): 2nd hidden layer of the random width-r ReLU net
    alive = (z[:N_TRAIN] > 0).double().mean(0)
    # a seed with a dead target unit would make the target rank < r: refuse rather than ship it silently
    if not bool(((alive > 0.2) & (alive < 0.8)).all()):
        raise RuntimeError(f"DATA_SEED={DATA_SEED}: target-net units active on {alive.tolist()} of the inputs")
    y_low = z @ w3  # rank r
    y = y_low + MINOR_STD * y_low.std() * (x @ c)
    y = (y - y[:N_TRAIN].mean(0)) / y[:N_TRAIN].std(0)
    ev = torch.linalg.eigvalsh(torch.cov(y[:N_TRAIN].T.double())).flip(0)
    share = ev / ev.sum()
    info = {
        "data_seed": str(DATA_SEED),
        "target_eigen_share": " ".join(f"{v:.4f}" for v in share.tolist()),
        "target_units_active": " ".join(f"{v:.3f}" for v in alive.tolist()),
    }
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], info


def write_h5(path: Path, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
             info: dict[str, str]) -> None:
    with h5py.File(path, "w", track_order=True) as f:
        # track_times=False keeps the file byte-identical between runs
        f.create_dataset("X", data=xtr.numpy().astype(np.float32), track_times=False)
        f.create_dataset("Y", data=ytr.numpy().astype(np.float32), track_times=False)
        grp = f.create_group("test")
        grp.create_dataset("X", data=xte.numpy().astype(np.float32), track_times=False)
        grp.create_dataset("Y", data=yte.numpy().astype(np.float32), track_times=False)
        f.attrs["description"] = (
            f"x ~ N(0, I_{D_IN}); y_low = relu(relu(x W1) W2) W3 (width r={R_HID}); "
            f"y = y_low + {MINOR_STD} std(y_low) x C, C ~ N(0, 1/{D_IN}); standardised with the train "
            f"mean/std; t={T_OUT}; rows 0..{N_TRAIN - 1} of the same draw are X/Y, the rest test/X, test/Y"
        )
        for key, value in info.items():
            f.attrs[key] = value


def make_model() -> torch.nn.Sequential:
    """Bias-free ReLU MLP, He (Kaiming-normal) initialisation: Sequential(Linear, ReLU, …, Linear)."""
    torch.manual_seed(MODEL_SEED)
    dims = [D_IN] + [WIDTH] * (DEPTH - 1) + [T_OUT]
    mods: list[torch.nn.Module] = []
    for i in range(DEPTH):
        lin = torch.nn.Linear(dims[i], dims[i + 1], bias=False)
        torch.nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        mods.append(lin)
        if i < DEPTH - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def mse(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((net(x) - y) ** 2).mean())


def train(weight_decay: float, xtr: torch.Tensor, ytr: torch.Tensor, on_epoch=None) -> torch.nn.Sequential:
    net = make_model()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(MILESTONES), gamma=GAMMA)
    shuffle = torch.Generator().manual_seed(SHUFFLE_SEED)
    for epoch in range(1, EPOCHS + 1):
        perm = torch.randperm(N_TRAIN, generator=shuffle)
        for start in range(0, N_TRAIN, BATCH):
            idx = perm[start:start + BATCH]
            loss = ((net(xtr[idx]) - ytr[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch, net)
    return net


def hyper_params(weight_decay: float) -> dict[str, str]:
    return {
        "dataset": "sample_checkpoints/data.h5 (synthetic, see make_samples.py)",
        "depth": str(DEPTH),
        "width": str(WIDTH),
        "bias": "false",
        "init": "kaiming_normal(relu)",
        "optimizer": "SGD",
        "lr": str(LR),
        "momentum": str(MOMENTUM),
        "weight_decay": str(weight_decay),
        "epochs": str(EPOCHS),
        "lr_milestones": ",".join(map(str, MILESTONES)),
        "lr_gamma": str(GAMMA),
        "batch_size": str(BATCH),
        "loss": "mse",
        "model_seed": str(MODEL_SEED),
        "shuffle_seed": str(SHUFFLE_SEED),
    }


ARCH = {"family": "mlp", "activation": "relu"}


def main() -> None:
    setup_determinism()
    t0 = time.perf_counter()
    xtr, ytr, xte, yte, info = make_data()
    write_h5(HERE / "data.h5", xtr, ytr, xte, yte, info)
    print(f"data.h5: train {tuple(xtr.shape)} -> {tuple(ytr.shape)}, test {tuple(xte.shape)}; "
          f"data seed {info['data_seed']}; target eigenvalue shares {info['target_eigen_share']}")

    trend_dir = HERE / "trend"
    trend_dir.mkdir(exist_ok=True)

    def save_trend(epoch: int, net: torch.nn.Module) -> None:
        if epoch in TREND_EPOCHS:
            meta = hyper_params(WEIGHT_DECAY) | {"epoch": str(epoch),
                                                 "train_mse": f"{mse(net, xtr, ytr):.6g}"}
            save_checkpoint(net, trend_dir / f"mlp_wd_epoch{epoch}.safetensors", arch=ARCH, metadata=meta)

    rows = []
    for name, wd, hook in (("mlp_wd", WEIGHT_DECAY, save_trend), ("mlp_nowd", 0.0, None)):
        t1 = time.perf_counter()
        net = train(wd, xtr, ytr, hook)
        tr, te = mse(net, xtr, ytr), mse(net, xte, yte)
        meta = hyper_params(wd) | {"epoch": str(EPOCHS), "train_mse": f"{tr:.6g}", "test_mse": f"{te:.6g}"}
        save_checkpoint(net, HERE / f"{name}.safetensors", arch=ARCH, metadata=meta)
        rows.append((name, wd, tr, te, time.perf_counter() - t1))

    # the image sample (issue: convolutional networks): a small CIFAR-style ResNet, see resnet_sample.py
    sys.path.insert(0, str(HERE))
    from resnet_sample import make_resnet_sample

    resnet = make_resnet_sample(HERE)
    print(f"resnet_wd.safetensors + images.h5: {resnet}")

    print(f"{'model':<10} {'weight_decay':>12} {'train_mse':>10} {'test_mse':>10} {'time_s':>7}")
    for name, wd, tr, te, secs in rows:
        print(f"{name:<10} {wd:>12g} {tr:>10.4g} {te:>10.4g} {secs:>7.1f}")
    print(f"total {time.perf_counter() - t0:.1f} s; audit with e.g.\n"
          "  nrc-audit sample_checkpoints/mlp_wd.safetensors sample_checkpoints/data.h5 --no-features")


if __name__ == "__main__":
    main()
