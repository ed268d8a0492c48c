"""Small nets for tests/test_layer_capture.py, each feeding its layers a layout or a layer kind that used to be
read wrongly or dropped: seq-first encoders, flattened tokens, recurrent layers, functional calls, inputs
without a row dim. Usable as ``--model-def`` callables (classes without arguments)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

T_TOK = 8  # tokens per sample: x (B, 24) is read as (B, 8, 3)


class SeqFirstEncoder(nn.Module):
    """nn.TransformerEncoder with the default batch_first=False: its linears receive (T, B, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 24)
        tokens = self.inp(x.reshape(len(x), T_TOK, 3)).transpose(0, 1)  # (T, B, 16)
        return self.head(self.enc(tokens).mean(dim=0))


class SeqFirstPlain(nn.Module):
    """A Linear on a (T, B, 3) permutation the module itself does not declare (detected by the probe)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(len(x), T_TOK, 3).transpose(0, 1)  # (T, B, 3)
        return self.head(torch.tanh(self.mix(seq)).mean(dim=0))


class FlatTokens(nn.Module):
    """A Linear on tokens flattened to (B·T, 3), batch-major, or token-major ((T·B, 3)) with ``token_major``."""

    token_major = False

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(3, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = len(x)
        seq = x.reshape(b, T_TOK, 3)
        if self.token_major:
            h = torch.tanh(self.tok(seq.transpose(0, 1).reshape(T_TOK * b, 3))).reshape(T_TOK, b, 12).mean(dim=0)
        else:
            h = torch.tanh(self.tok(seq.reshape(b * T_TOK, 3))).reshape(b, T_TOK, 12).mean(dim=1)
        return self.head(h)


class FlatTokensTokenMajor(FlatTokens):
    token_major = True


class Recurrent(nn.Module):
    """A 2-layer recurrent net (LSTM batch-first, or a bidirectional seq-first GRU) and a Linear head."""

    def __init__(self, cell: str = "lstm") -> None:
        super().__init__()
        self.batch_first = cell == "lstm"
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(3, 6, num_layers=2, batch_first=self.batch_first, bidirectional=cell != "lstm")
        self.head = nn.Linear(6 * (1 + self.rnn.bidirectional), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(len(x), T_TOK, 3)
        out, _ = self.rnn(seq if self.batch_first else seq.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


class Packed(nn.Module):
    """A GRU fed a PackedSequence of per-sample lengths 1…8 (taken from the data), read at its last state."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x[:, 0].abs() * 4).long().clamp(1, T_TOK).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x.reshape(len(x), T_TOK, 3), lengths, batch_first=True,
                                                   enforce_sorted=False)  # fmt: skip
        return self.head(self.rnn(packed)[1][-1])


class Unrolled(nn.Module):
    """An LSTMCell stepped over the 8 tokens: one module, 8 calls per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(len(x), 6)
        for step in x.reshape(len(x), T_TOK, 3).unbind(dim=1):
            h, c = self.cell(step, (h, c))
        return self.head(h)


class FunctionalProj(nn.Module):
    """Uses its ``proj`` Linear's weight through F.linear, as torchvision's Swin does: no hook on proj fires."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.proj = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.head(torch.relu(F.linear(h, self.proj.weight, self.proj.bias)))


class Pairwise(nn.Module):
    """A Linear on (B, B, 6) products of every pair of rows: two dims follow the batch, none is the row dim."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pair(x[:, None, :] * x[None, :, :]).mean(dim=1))


class Queries(nn.Module):
    """A Linear on learned queries (5, 6) that do not depend on the batch at all."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(5, 6))
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc(self.queries).mean(dim=0))
