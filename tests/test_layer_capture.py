"""Every layer a model runs, read by its rows: seq-first and flattened inputs, HF Conv1D (GPT-2), recurrent
layers, shared layers audited per call (ALBERT), functional calls named in the report, and inputs whose rows
cannot be told apart refused by name.

Each audit is compared with a float64 dense reference built from hooks on the library's own modules, with the
layout of each input written out here by hand (never the tool's output), to 1e-6. Models run in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import _capture_nets
import _tv_ops  # noqa: F401  - torchvision's op schemas, before torchvision / timm / transformers
import nrc_audit
from conftest import write_h5
from fixtures_models import assert_layers_match, dense_reference_weight
from nrc_audit.cli.app import audit_app
from nrc_audit.config import AuditConfig, ModelOptions
from nrc_audit.core.layer import LayerInfo, RowLayout, find_rows, flattened_order, row_signature
from nrc_audit.core.stats import PassStatistics
from nrc_audit.engine.pipeline import run_audit
from nrc_audit.errors import ModelDataMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NETS = str(Path(__file__).resolve().parent / "_capture_nets.py")
N = 160


def seq_first(h: np.ndarray) -> np.ndarray:
    """(T, N, h) → (N, h): the mean over the tokens of each sample."""
    return h.mean(axis=0)


def reference(model: nn.Module, x: torch.Tensor, read: dict | None = None, kwargs: dict | None = None):
    """(layer names per call, {name: (N, h)}, {name: W}, (N, t) output) from hooks on the model's own Linear,
    ConvNd, HF Conv1D, MultiheadAttention and LSTM/GRU modules; ``read[module]`` turns an input that is not
    batch-first into (N, h), the others are (N, h) or averaged over their middle dims."""
    conv1d = getattr(__import__("sys").modules.get("transformers.pytorch_utils"), "Conv1D", ())
    calls: list[tuple[str, np.ndarray, np.ndarray]] = []

    def weight(mod: nn.Module) -> np.ndarray:
        if isinstance(mod, nn.MultiheadAttention):
            return mod.in_proj_weight.detach().double().numpy()
        if isinstance(mod, nn.LSTMCell):
            return mod.weight_ih.detach().double().numpy()
        if isinstance(mod, (nn.LSTM, nn.GRU)):
            ws = [mod.weight_ih_l0] + ([mod.weight_ih_l0_reverse] if mod.bidirectional else [])
            return np.concatenate([w.detach().double().numpy() for w in ws])
        if conv1d and isinstance(mod, conv1d):
            return mod.weight.detach().double().numpy().T  # stored (in, out)
        return dense_reference_weight(mod)

    def hook(module, args, kw, name):
        h = args[0] if args else next(iter(kw.values()))
        if isinstance(h, nn.utils.rnn.PackedSequence):  # the mean over each sequence's own steps
            padded, lengths = nn.utils.rnn.pad_packed_sequence(h, batch_first=True)
            p, n = padded.double().numpy(), lengths.numpy()
            calls.append((name, np.stack([p[i, :n[i]].mean(axis=0) for i in range(len(n))]), weight(module)))
            return
        h = h.detach().double().numpy()
        if name in (read or {}):
            h = read[name](h)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            h = h.mean(axis=tuple(range(2, h.ndim)))
        elif h.ndim > 2:
            h = h.mean(axis=tuple(range(1, h.ndim - 1)))
        calls.append((name, h, weight(module)))

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.LSTMCell) + (
        (conv1d,) if conv1d else ())  # fmt: skip
    skip = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    handles = [m.register_forward_pre_hook(lambda mod, a, k, n=n: hook(mod, a, k, n), with_kwargs=True)
               for n, m in model.named_modules() if isinstance(m, kinds) and n not in skip]  # fmt: skip
    try:
        with torch.no_grad():
            out = model(x, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    out = out if isinstance(out, torch.Tensor) else out["logits"]
    suffix = {n: ".in_proj" if isinstance(m, nn.MultiheadAttention) else ".weight_ih_l0"
              if isinstance(m, (nn.LSTM, nn.GRU)) else ".weight_ih" if isinstance(m, nn.LSTMCell) else ""
              for n, m in model.named_modules()}  # fmt: skip
    count = {n: sum(1 for c in calls if c[0] == n) for n, _, _ in calls}
    seen: dict[str, int] = {}
    names, feats, weights = [], {}, {}
    for n, h, w in calls:
        seen[n] = seen.get(n, 0) + 1
        shown = n + suffix[n] + (f"#{seen[n]}" if count[n] > 1 else "")
        names.append(shown)
        feats[shown], weights[shown] = h, w
    return names, feats, weights, out.double().numpy().reshape(len(x), -1)


def check(report, model, x, y, read=None, kwargs=None) -> list[str]:
    names, feats, weights, out = reference(model, x, read, kwargs)
    y = y.reshape(len(y), -1)
    assert report.model_mse == pytest.approx(float(((out - y) ** 2).mean()), rel=1e-6)
    assert_layers_match(report.layers, names, feats, weights, y, out)
    return names


def data(seed: int, width: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, width))
    y = np.stack([np.tanh(x[:, :3].sum(1)), x[:, 3:6].mean(1)], 1) + 0.1 * rng.standard_normal((N, 2))
    return x, y


def in_memory(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 64):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return nrc_audit.audit(model, [(xt[a:a + batch], yt[a:a + batch]) for a in range(0, len(x), batch)],
                           require_collapsed=0)  # fmt: skip


def build(net: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(_capture_nets, net)().double().eval()


# ----------------------------------------------------------------------------- rows tied to the batch


@pytest.mark.parametrize("batch", [64, 8])  # 8 = T: the rows dim cannot be told by its size
def test_seq_first_transformer_encoder_is_read_by_its_rows(tmp_path: Path, batch: int) -> None:
    model = build("SeqFirstEncoder", 1)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    x, y = data(1)
    cfg = AuditConfig(tmp_path / "m.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), device="cpu", batch_size=batch,
                      model=ModelOptions(model_def=f"{NETS}:SeqFirstEncoder"), features_path=None)  # fmt: skip
    report = run_audit(cfg)
    read = {n: seq_first for n, _ in model.named_modules() if n.startswith("enc.layers.") and n.count(".") == 3}
    names = check(report, model, torch.from_numpy(x), y, read)
    assert "enc.layers.0.self_attn.in_proj" in names and "enc.layers.1.linear2" in names
    notes = report.model["assumptions"]
    assert any("'enc.layers.0.linear1': rows on dim 1 of 3 (seq-first)" in n for n in notes)


def test_seq_first_without_module_knowledge_detected_when_batch_equals_tokens() -> None:
    model = build("SeqFirstPlain", 2)
    x, y = data(2)
    check(in_memory(model, x, y, batch=8), model, torch.from_numpy(x), y, {"mix": seq_first})


@pytest.mark.parametrize("net, order", [("FlatTokens", "(B, c)"), ("FlatTokensTokenMajor", "(c, B)")])
def test_flattened_token_linear_is_reshaped_by_rows(net: str, order: str) -> None:
    model = build(net, 3)
    x, y = data(3)
    c = _capture_nets.T_TOK
    rows = {"(B, c)": lambda h: h.reshape(N, c, -1).mean(axis=1),
            "(c, B)": lambda h: h.reshape(c, N, -1).mean(axis=0)}[order]  # fmt: skip
    report = in_memory(model, x, y, batch=48)  # a last batch of 16 rows checks the layout again
    check(report, model, torch.from_numpy(x), y, {"tok": rows})
    assert report.layers[0].pooled
    assert any(f"'tok': flattened {order} rows (B·8)" in n for n in report.model["assumptions"])


@pytest.mark.parametrize("net, found", [("Pairwise", "dims [0, 1] of its input"),
                                        ("Queries", "no dim of its input follows the batch size")])  # fmt: skip
def test_input_without_one_row_dim_exits_2_naming_the_layer(tmp_path: Path, net: str, found: str) -> None:
    torch.save(build(net, 4).state_dict(), tmp_path / "m.pth")
    x, y = data(4, width=6)
    result = CliRunner().invoke(audit_app, [str(tmp_path / "m.pth"), str(write_h5(tmp_path / "d.h5", X=x, Y=y)),
                                            "--model-def", f"{NETS}:{net}", "--no-features", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    layer = {"Pairwise": "pair", "Queries": "fc"}[net]
    message = " ".join(result.stderr.split())
    assert f"layer '{layer}': {found}" in message and f"--exclude '{layer}'" in message


def test_accumulator_refuses_feature_rows_that_are_not_the_batch_rows() -> None:
    stats = PassStatistics()
    layer = LayerInfo(0, "enc.linear1", "linear", 3, 4, True, torch.zeros(4, 3))
    with pytest.raises(ModelDataMismatchError, match=r"8 target rows came with 8 output rows and feature rows "
                                                     r"\[\('enc.linear1', 5\)\]"):  # fmt: skip
        stats.update([layer], torch.zeros(8, 2), torch.zeros(8, 2), [torch.randn(5, 3)])


def test_find_rows_rule() -> None:
    assert find_rows((12, 64, 16), 64, (12, 2, 16), 2, (0, 1)) == RowLayout(1)
    assert find_rows((512, 16), 64, (16, 16), 2, (0,)) == RowLayout(0, 8)
    assert find_rows((8, 8, 16), 8, None, 2, (0, 1), hint=1) == RowLayout(1)
    assert "ambiguous" in find_rows((8, 8, 16), 8, (2, 2, 16), 2, (0, 1))
    assert "no probe" in find_rows((8, 8, 16), 8, None, 2, (0, 1))


def test_flattened_order_is_read_from_the_probe_values() -> None:
    """Softmax rows (every feature row sums to 1) still tell (B, c) from (c, B); identical rows refuse."""
    tokens = torch.softmax(torch.randn(6, 4, 5, dtype=torch.float64), dim=-1)  # (B, c, h)
    rows, layout = [0, 1], RowLayout(0, 4)
    for order, flat in (("batch", tokens.reshape(24, 5)), ("token", tokens.transpose(0, 1).reshape(24, 5))):
        probe = tokens[rows].reshape(8, 5) if order == "batch" else tokens[rows].transpose(0, 1).reshape(8, 5)
        assert flattened_order(flat, row_signature(probe, 0), layout, rows) == order
    same = tokens[:1].expand(6, 4, 5).reshape(24, 5)  # every row the same: the order cannot be told
    assert flattened_order(same, row_signature(same[:8], 0), layout, rows) is None


# ----------------------------------------------------------------------------- layers that used to vanish


def test_gpt2_conv1d_layers_all_audited_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=2,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    model = transformers.GPT2ForSequenceClassification(config).double().eval()
    rng = np.random.default_rng(5)
    ids, y = rng.integers(1, 40, size=(N, 12)), rng.standard_normal((N, 2))
    xt, yt = torch.from_numpy(ids), torch.from_numpy(y)
    report = nrc_audit.audit(model, [(xt[a:a + 64], yt[a:a + 64]) for a in range(0, N, 64)], require_collapsed=0)
    names = check(report, model, xt, y)
    assert len(names) == 9 and sum(".c_" in n for n in names) == 8  # c_attn, c_proj, c_fc, c_proj per block
    assert [r.out_dim for r in report.layers[:4]] == [48, 16, 64, 16]  # the transposed (in, out) weights


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_layers_audited_on_input_side_weights(cell: str) -> None:
    torch.manual_seed(6)
    model = _capture_nets.Recurrent(cell).double().eval()
    x, y = data(6)
    report = in_memory(model, x, y)
    read = {} if cell == "lstm" else {"rnn": seq_first}
    assert check(report, model, torch.from_numpy(x), y, read) == ["rnn.weight_ih_l0", "head"]
    note = next(n for n in report.model["assumptions"] if n.startswith("layer 'rnn.weight_ih_l0'"))
    assert "weight_hh_l0" in note and "weight_ih_l1" in note and "weight_hh_l1" in note and "not audited" in note
    assert ("weight_ih_l0_reverse" in note) is False and ("both directions stacked" in note) == (cell == "gru")


def test_packed_sequence_pooled_over_its_valid_steps() -> None:
    model = build("Packed", 10)
    x, y = data(10)
    assert check(in_memory(model, x, y), model, torch.from_numpy(x), y) == ["rnn.weight_ih_l0", "head"]


def test_recurrent_cell_audited_once_per_step() -> None:
    model = build("Unrolled", 11)
    x, y = data(11)
    report = in_memory(model, x, y)
    names = check(report, model, torch.from_numpy(x), y)
    assert names == [f"cell.weight_ih#{k}" for k in range(1, 9)] + ["head"]
    assert any(n.startswith("layer 'cell.weight_ih': LSTMCell audited on weight_ih") and "weight_hh" in n
               for n in report.model["assumptions"])  # fmt: skip


def test_albert_shared_layers_audited_per_call() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                       num_labels=2)  # fmt: skip
    model = transformers.AlbertForSequenceClassification(config).double().eval()
    rng = np.random.default_rng(7)
    ids, y = rng.integers(1, 40, size=(N, 12)), rng.standard_normal((N, 2))
    xt, yt = torch.from_numpy(ids), torch.from_numpy(y)
    report = nrc_audit.audit(model, [(xt[a:a + 64], yt[a:a + 64]) for a in range(0, N, 64)], require_collapsed=0)
    names = check(report, model, xt, y)
    query = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query"
    assert [n for n in names if n.startswith(query)] == [f"{query}#{k}" for k in (1, 2, 3)]
    assert len(names) == 1 + 3 * 6 + 2


def test_functional_linear_named_in_assumptions() -> None:
    model = build("FunctionalProj", 8)
    x, y = data(8, width=6)
    report = in_memory(model, x, y)
    assert check(report, model, torch.from_numpy(x), y) == ["inp", "head"]
    assert any(n.startswith("layer 'proj' (Linear) never ran") and "F.linear" in n for n in report.model["assumptions"])


def test_torchvision_swin_functional_attention_named() -> None:
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(9)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
                            num_classes=2).double().eval()  # fmt: skip
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((N, 3, 8, 8)), rng.standard_normal((N, 2))
    report = in_memory(model, x, y)
    check(report, model, torch.from_numpy(x), y)
    never = {n.split("'")[1] for n in report.model["assumptions"] if "never ran" in n}
    assert never == {f"features.{s}.0.attn.{p}" for s in (1, 3) for p in ("qkv", "proj")}
    assert any("relative_position_bias_table" in n and "not audited" in n for n in report.model["assumptions"])
