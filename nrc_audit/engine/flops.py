"""The forward's multiply-add flops, counted at the torch-function level while one small batch runs.

Only the thread plan reads the count (:func:`nrc_audit.engine.threads.rebalanced`: does the forward or the
float64 fold dominate the pass?). torch's own ``FlopCounterMode`` counts at the dispatcher level, and entering
any dispatch mode imports ``torch._dynamo`` — about 2 s of every audit's start on a 2-core machine, for a
number that decides one thread count. A ``TorchFunctionMode`` does not: it sees ``F.linear``, the
convolutions, the matrix products and ``scaled_dot_product_attention`` as the model calls them, with the same
formulas as torch's counter (2·m·n·k per product; bias, activations and norms not counted).

Functions not listed (einsum, the fused RNN kernels) count 0, and a Python-level torch function is seen
whole, not looked into (``nn.MultiheadAttention``'s has its own formula below), so the total is a lower
bound: a lower forward count can only keep the default plan, never move threads to a forward that does not
need them. ``tests/test_flops.py`` holds it against torch's counter on library models.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _k(a: torch.Tensor) -> int:
    return a.shape[-1] if a.dim() else 1


def _product(args: tuple, out: Any) -> float:  # (…, m, k) @ (…, k, n) → (…, m, n): 2·numel(out)·k
    return 2.0 * out.numel() * _k(args[0])


def _added_product(args: tuple, out: Any) -> float:  # addmm(bias, a, b), baddbmm(bias, a, b)
    return 2.0 * out.numel() * _k(args[1])


def _linear(args: tuple, out: Any) -> float:  # x (…, in), weight (out, in)
    return 2.0 * out.numel() * args[1].shape[-1]


def _conv(args: tuple, out: Any) -> float:  # weight (c_out, c_in/groups, *kernel): each output value is one dot
    return 2.0 * out.numel() * args[1][0].numel()


def _conv_transposed(args: tuple, out: Any) -> float:  # weight (c_in, c_out/groups, *kernel): each input value scatters
    return 2.0 * args[0].numel() * args[1][0].numel()


def _attention(args: tuple, out: Any) -> float:  # q (…, L, E), k (…, S, E), v (…, S, Ev): Q·Kᵀ then P·V
    q, k, v = args[:3]
    return 2.0 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _multi_head_attention(args: tuple, out: Any) -> float:  # query (L, N, E), key (S, N, E_k), value (S, N, E_v); out a pair
    q, k, v = args[:3]
    length, width, seen = q.shape[0], q.shape[-1], k.shape[0]
    batch = q.numel() // (length * width)
    projections = length * width * width + seen * width * (k.shape[-1] + v.shape[-1]) + length * width * width
    return 2.0 * batch * (projections + 2 * length * seen * width)  # in and out projections, Q·Kᵀ and P·V


FORMULAS: dict[Callable, Callable[[tuple, Any], float]] = {
    F.linear: _linear,
    torch.matmul: _product,
    torch.Tensor.matmul: _product,
    torch.Tensor.__matmul__: _product,
    torch.mm: _product,
    torch.Tensor.mm: _product,
    torch.bmm: _product,
    torch.Tensor.bmm: _product,
    torch.addmm: _added_product,
    torch.Tensor.addmm: _added_product,
    torch.baddbmm: _added_product,
    torch.Tensor.baddbmm: _added_product,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    F.conv_transpose1d: _conv_transposed,
    F.conv_transpose2d: _conv_transposed,
    F.conv_transpose3d: _conv_transposed,
    F.scaled_dot_product_attention: _attention,
    F.multi_head_attention_forward: _multi_head_attention,  # nn.MultiheadAttention: one Python function seen whole
}


class ForwardFlops(TorchFunctionMode):
    """``with ForwardFlops() as counted: model(x)``; then ``counted.total`` holds the flops of that forward."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        formula = FORMULAS.get(func)
        if formula is not None:
            try:
                self.total += formula(tuple(args), out)
            except (IndexError, AttributeError, TypeError):  # operands passed by keyword: not counted (a lower bound)
                pass
        return out
