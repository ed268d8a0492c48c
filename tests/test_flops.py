"""The thread plan's flop count (engine.flops) against torch's own FlopCounterMode on library models, and the
reason it exists: an audit's start must not import torch._dynamo (≈ 2 s on 2 cores, which any dispatch mode
costs)."""

from __future__ import annotations

import subprocess
import sys

import _tv_ops  # noqa: F401  - torchvision's op schemas, before torchvision / transformers
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, SAMPLES
from nrc_audit.engine.flops import ForwardFlops


def counted(model: nn.Module, *x: torch.Tensor) -> tuple[float, float]:
    """(ours, torch's) flops of one forward."""
    model.eval()
    with torch.no_grad():
        with ForwardFlops() as ours:
            model(*x)
        with FlopCounterMode(display=False) as theirs:
            model(*x)
    return ours.total, float(theirs.get_total_flops())


def _resnet():
    return pytest.importorskip("torchvision").models.resnet18(num_classes=3), (torch.randn(2, 3, 32, 32),)


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, num_labels=2, attn_implementation="eager")  # fmt: skip
    return transformers.BertForSequenceClassification(cfg), (torch.randint(0, 100, (2, 16)),)


CASES = {
    "mlp": lambda: (nn.Sequential(nn.Linear(14, 512), nn.ReLU(), nn.Linear(512, 4)), (torch.randn(8, 14),)),
    "conv1d+conv3d": lambda: (nn.Sequential(nn.Conv3d(2, 4, 3, groups=2), nn.Flatten(2), nn.Conv1d(4, 6, 5)),
                              (torch.randn(2, 2, 6, 6, 6),)),  # fmt: skip
    "conv-transposed": lambda: (nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2), (torch.randn(2, 4, 9, 9),)),
    "multi-head attention": lambda: (nn.MultiheadAttention(32, 4, batch_first=True, kdim=16, vdim=24),
                                     (torch.randn(2, 10, 32), torch.randn(2, 7, 16), torch.randn(2, 7, 24))),  # fmt: skip
    "resnet18 (torchvision)": _resnet,
    "bert, eager attention (transformers)": _bert,
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_count_equals_torchs_flop_counter(case):
    torch.manual_seed(0)
    model, x = CASES[case]()
    ours, theirs = counted(model, *x)
    assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-12)


def test_scaled_dot_product_attention_counts_both_products():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    with ForwardFlops() as ours:
        nn.functional.scaled_dot_product_attention(q, k, v)
    assert ours.total == 2 * (2 * 3 * 5) * 7 * 8 + 2 * (2 * 3 * 5) * 7 * 4  # Q·Kᵀ: (L, E)·(E, S); P·V: (L, S)·(S, Ev)


def test_an_uncounted_function_gives_a_lower_bound_not_an_error():
    lstm = nn.LSTM(16, 32, batch_first=True)  # fused kernel: no formula here (torch's counter has none either)
    with ForwardFlops() as ours:
        lstm(torch.randn(2, 10, 16))
        nn.functional.linear(input=torch.randn(3, 4), weight=torch.randn(5, 4))  # operands by keyword: not counted
    assert ours.total == 0


def test_an_audit_never_imports_torch_dynamo(tmp_path):
    """The whole CLI audit of a sample, thread plan included (auto plan: the flop probe runs)."""
    code = ("import sys, runpy; sys.argv = ['nrc-audit', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('nrc_audit', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'dynamo', 'torch._dynamo' in sys.modules)\n")  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "NRC_AUDIT_THREADS": "auto", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "resnet_wd.safetensors"), str(SAMPLES / "images.h5"),
                           "--scale-uint8", "--no-features", "--no-progress", "--format", "json"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.stdout.strip().endswith("exit 0 dynamo False"), done.stderr[-2000:]
