"""Models as users have them: torchvision, timm and Hugging Face regressors, and the nets that used to be
audited wrongly (issue 13). Every audit is compared with a dense float64 reference built from hooks on the
library's own modules (pooling done here, in numpy float64) to 1e-6.

Float32 forward rounding aside: a float32 conv/matmul may round differently for a batch of 64 (the audit)
and of N (the reference), and a near-singular Σ_H amplifies that in NRC4. So the library models run in
float64 (checkpoint and data), where nrc-audit computes in float64 too; the pooling test keeps float32 on
purpose, auditing only layers whose inputs are the data themselves. Layers are restricted where the dense
reference's SVD of a 512-channel 3×3 kernel would take seconds, and to layers narrower than N (wider
ones fit the targets exactly, NRC4 ≈ 1e-16, which a relative comparison cannot judge)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import _tv_ops  # noqa: F401  - torchvision's op schemas, before torchvision / timm / transformers
import nrc_audit
from conftest import write_h5
from fixtures_models import assert_layers_match, default_names, dense_reference_weight
from nrc_audit.cli.app import audit_app
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.engine.run import run_audit
from nrc_audit.models.architecture import INFERRED_NOTE, VERIFIED_NOTE, inferred_architecture_warning

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NETS = str(Path(__file__).resolve().parent / "_library_nets.py")
N = 160


def reference(model: nn.Module, x: torch.Tensor, kwargs: dict | None = None, mask: np.ndarray | None = None,
              pooling: str = "mean", output_key: str = "logits"):  # fmt: skip
    """(names, {name: (N, h) float64}, {name: dense weight}, (N, t) output) from hooks on the model's own
    Linear / ConvNd / MultiheadAttention modules, pooled here in numpy float64."""
    names, feats, weights = [], {}, {}

    def keep(name: str, h: np.ndarray, w: np.ndarray) -> None:
        names.append(name)
        feats[name], weights[name] = h, w

    def pool_tokens(h: np.ndarray) -> np.ndarray:  # (N, T, h) → (N, h)
        if pooling == "cls":
            return h[:, 0]
        m = np.ones(h.shape[:2]) if mask is None or mask.shape != h.shape[:2] else (mask != 0).astype(np.float64)
        if pooling == "last":
            return h[np.arange(len(h)), [np.nonzero(row)[0][-1] for row in m]]
        return (h * m[:, :, None]).sum(axis=1) / m.sum(axis=1, keepdims=True)

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            def mha_hook(module, args, kw, name=name):
                q = args[0] if args else kw["query"]
                q = q if module.batch_first else q.transpose(0, 1)
                keep(f"{name}.in_proj", pool_tokens(q.detach().double().numpy()),
                     module.in_proj_weight.detach().double().numpy())  # fmt: skip

            handles.append(mod.register_forward_pre_hook(mha_hook, with_kwargs=True))
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            def hook(module, args, name=name):
                h = args[0].detach().double().numpy()
                if not isinstance(module, nn.Linear):
                    h = h.mean(axis=tuple(range(2, h.ndim)))
                elif h.ndim == 3:
                    h = pool_tokens(h)
                elif h.ndim > 3:
                    h = h.mean(axis=tuple(range(1, h.ndim - 1)))
                keep(name, h, dense_reference_weight(module))

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(x, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        out = out[output_key] if isinstance(out, dict) else out[0]
    return names, feats, weights, out.double().numpy().reshape(len(x), -1)


def audit(ckpt: Path, data: Path, *, model_def: str | None = None, input_keys=(), pooling: str = "mean",
          output_key: str | None = None, layers=()):  # fmt: skip
    cfg = AuditConfig(ckpt, data, data=DataOptions(input_keys=tuple(input_keys)),
                      model=ModelOptions(model_def=model_def, output_key=output_key, token_pooling=pooling),
                      layers=tuple(layers), device="cpu", batch_size=64, features_path=None)  # fmt: skip
    return run_audit(cfg)


def check(report, model, x, y, kwargs=None, mask=None, pooling="mean", output_key="logits", layers=()):
    names, feats, weights, out = reference(model, x, kwargs, mask, pooling, output_key)
    keep = default_names(names, layers)
    assert report.model_mse == pytest.approx(float(((out - y.reshape(len(y), -1)) ** 2).mean()), rel=1e-6)
    assert_layers_match(report.layers, keep, feats, weights, y, out)
    return keep


def images(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float64 inputs (N, *shape) and 2 targets that depend on them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape))
    y = np.stack([x.mean(axis=tuple(range(1, x.ndim))), np.tanh(x.reshape(n, -1)[:, :5].sum(1))], 1)
    return x, y + 0.1 * rng.standard_normal(y.shape)


# ----------------------------------------------------------------------------- torchvision and timm


def test_torchvision_resnet18_auto_detected(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=2).double().eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    x, y = images(N, (3, 16, 16))
    layers = ("conv1", "layer1.*", "layer2.0.conv1")  # in_dim < N: wider layers fit y exactly (NRC4 ≈ 0)
    report = audit(tmp_path / "r18.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), layers=layers)
    assert len(check(report, model, torch.from_numpy(x), y, layers=layers)) == len(report.layers) == 6
    assert INFERRED_NOTE in report.model["assumptions"]  # a plain torch.save: nothing to verify against
    assert "architecture inferred" in inferred_architecture_warning(report.model["assumptions"])


def test_resnext_style_grouped_bottleneck(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    model = tv.models.ResNet(tv.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=2, groups=4,
                             width_per_group=8).double().eval()  # resnext50_32x4d's block, tiny
    nrc_audit.save_checkpoint(model, tmp_path / "rx.safetensors", arch={"family": "resnet"}, probe_shape=(2, 3, 16, 16))
    x, y = images(N, (3, 16, 16), seed=1)
    layers = ("layer1.*", "layer2.0.conv2")
    report = audit(tmp_path / "rx.safetensors", write_h5(tmp_path / "d.h5", X=x, Y=y), layers=layers)
    check(report, model, torch.from_numpy(x), y, layers=layers)
    assert VERIFIED_NOTE in report.model["assumptions"]
    assert any(r.name.endswith("conv2") for r in report.layers)  # the grouped 3×3 convs are audited


def test_timm_convnext_via_model_def(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    import _library_nets

    torch.manual_seed(2)
    model = _library_nets.timm_convnext().double().eval()
    torch.save(model.state_dict(), tmp_path / "cnx.pth")
    x, y = images(N, (3, 32, 32), seed=2)
    report = audit(tmp_path / "cnx.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:timm_convnext")
    names = check(report, model, torch.from_numpy(x), y)
    assert any("conv_dw" in n for n in names) and any("mlp.fc1" in n for n in names)  # depthwise + (B,H,W,C) Linear


def test_torchvision_vit_via_model_def_audits_attention(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    import _library_nets

    torch.manual_seed(3)
    model = _library_nets.tv_vit().double().eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    x, y = images(N, (3, 16, 16), seed=3)
    report = audit(tmp_path / "vit.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:tv_vit")
    names = check(report, model, torch.from_numpy(x), y)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in names
    skipped = [a for a in report.model["assumptions"] if "out_proj" in a and "skipped" in a]
    assert len(skipped) == 2  # one per MultiheadAttention: never silently missing


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_bert_regression_from_sharded_save_pretrained_with_mask(tmp_path: Path, pooling: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=1)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).double().eval()
    model.save_pretrained(tmp_path / "bert", max_shard_size="20KB")
    assert (tmp_path / "bert" / "model.safetensors.index.json").is_file()
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 40, size=(N, 12))
    lengths = rng.integers(3, 13, size=N)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    y = rng.standard_normal(N)
    data = write_h5(tmp_path / "d.h5", X=ids * mask, Y=y, mask=mask)
    result = CliRunner().invoke(audit_app, [str(tmp_path / "bert"), str(data), "--model-def", f"{NETS}:bert",
                                            "--input-key", "attention_mask=mask", "--token-pooling", pooling,
                                            "--json", str(tmp_path / "r.json"), "--no-features", "--device", "cpu",
                                            "--no-progress", "--exit-zero", "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    x = torch.from_numpy(ids * mask)
    names, feats, weights, out = reference(model, x, {"attention_mask": torch.from_numpy(mask)}, mask, pooling)
    assert report["model_mse"] == pytest.approx(float(((out[:, 0] - y) ** 2).mean()), rel=1e-6)
    assert_layers_match(report["layers"], names, feats, weights, y, out)
    notes = report["model"]["assumptions"]
    assert any("entry 'logits'" in a for a in notes) and any(f"token pooling {pooling!r}" in a for a in notes)
    assert any("shards" in a for a in notes) and any("config.json" in a for a in notes)


# ----------------------------------------------------------------------------- order, pooling, convs


@pytest.mark.parametrize("net, shape", [("HeadFirst", (16,)), ("TokenNet", (12,))])
def test_width_check_follows_execution_order(tmp_path: Path, net: str, shape: tuple) -> None:
    import _library_nets

    torch.manual_seed(5)
    model = getattr(_library_nets, net)().double().eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    rng = np.random.default_rng(5)
    x = rng.integers(0, 20, size=(N, *shape)) if net == "TokenNet" else rng.standard_normal((N, *shape))
    y = rng.standard_normal((N, 2))
    report = audit(tmp_path / "m.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:{net}")
    check(report, model, torch.from_numpy(x), y)


def test_wrong_width_found_at_first_executed_layer(tmp_path: Path) -> None:
    import _library_nets

    torch.save(_library_nets.HeadFirst().state_dict(), tmp_path / "m.pth")
    x, y = np.zeros((20, 9), np.float32), np.random.default_rng(0).standard_normal((20, 2))
    result = CliRunner().invoke(audit_app, [str(tmp_path / "m.pth"), str(write_h5(tmp_path / "d.h5", X=x, Y=y)),
                                            "--model-def", f"{NETS}:HeadFirst", "--no-features", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Linear 'body.0', with 9 features, but it takes 16" in " ".join(result.stderr.split())


def test_large_mean_pooled_in_float64(tmp_path: Path) -> None:
    """Channels / tokens of mean 1e3 and std 1e-3: float32 pooling would lose them (issue 13)."""
    import _library_nets

    torch.manual_seed(6)
    model = _library_nets.LargeMean().eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    rng = np.random.default_rng(6)
    x = (1e3 + 1e-3 * rng.standard_normal((N, 4, 8, 8))).astype(np.float32)
    y = rng.standard_normal((N, 2)).astype(np.float32)
    layers = ("conv", "tok")  # inputs = the float32 data itself: no forward rounding in what is compared
    report = audit(tmp_path / "m.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:LargeMean",
                   layers=layers)  # fmt: skip
    names, feats, weights, out = reference(model, torch.from_numpy(x))
    assert_layers_match(report.layers, list(layers), feats, weights, y, out)
    assert [r.pooled for r in report.layers] == [True, True]


def test_grouped_depthwise_conv1d_conv3d_match_block_diagonal_reference(tmp_path: Path) -> None:
    import _library_nets

    torch.manual_seed(7)
    model = _library_nets.ConvKinds().double().eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    x, y = images(N, (8, 6, 6), seed=7)
    report = audit(tmp_path / "m.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:ConvKinds")
    check(report, model, torch.from_numpy(x), y)
    assert [r.kind for r in report.layers] == ["conv2d", "conv2d", "conv1d", "conv3d", "linear"]
    assert all(r.nrc3 is not None for r in report.layers[:2])  # c_in/g = 2 = k and 1 < k: both measured


# ----------------------------------------------------------------------------- containers


def test_output_containers(tmp_path: Path) -> None:
    import _library_nets

    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((N, 6)), rng.standard_normal((N, 2))
    data = write_h5(tmp_path / "d.h5", X=x, Y=y)
    for net in ("DictOut", "TupleOut"):
        torch.manual_seed(8)
        model = getattr(_library_nets, net)().double().eval()
        torch.save(model.state_dict(), tmp_path / f"{net}.pth")
        report = audit(tmp_path / f"{net}.pth", data, model_def=f"{NETS}:{net}",
                       output_key="prediction" if net == "DictOut" else None)  # fmt: skip
        check(report, model, torch.from_numpy(x), y, output_key="prediction")
        assert any(a.startswith("model output: ") for a in report.model["assumptions"])
    result = CliRunner().invoke(audit_app, [str(tmp_path / "DictOut.pth"), str(data), "--model-def", f"{NETS}:DictOut",
                                            "--no-features", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "without a tensor 'logits'" in result.stderr and "--output-key" in result.stderr


# ----------------------------------------------------------------------------- no silent wrong network


def _nonaffine_mlp() -> nn.Sequential:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16, elementwise_affine=False), nn.ReLU(), nn.Linear(16, 16),
                         nn.LayerNorm(16, elementwise_affine=False), nn.ReLU(), nn.Linear(16, 2)).eval()  # fmt: skip


def _mlp_data(tmp_path: Path, model: nn.Module) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((N, 6)).astype(np.float32)
    with torch.no_grad():
        y = (model(torch.from_numpy(x)) + 0.3 * torch.randn(N, 2)).numpy()
    return write_h5(tmp_path / "d.h5", X=x, Y=y), x, y


def test_nonaffine_layernorm_mlp_saved_with_save_checkpoint_audits_exactly(tmp_path: Path) -> None:
    model = _nonaffine_mlp()
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "ln.safetensors", arch={"family": "mlp", "activation": "relu"})
    data, x, y = _mlp_data(tmp_path, model)
    report = audit(ckpt, data)
    check(report, model, torch.from_numpy(x), y)
    assert VERIFIED_NOTE in report.model["assumptions"]
    assert inferred_architecture_warning(report.model["assumptions"]) is None


def test_arch_norm_field_is_honoured_without_layout(tmp_path: Path) -> None:
    model = _nonaffine_mlp()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ln.safetensors"),
              metadata={"nrc_audit.arch": json.dumps({"family": "mlp", "activation": "relu", "norm": "layernorm"})})
    data, x, y = _mlp_data(tmp_path, model)
    report = audit(tmp_path / "ln.safetensors", data)
    check(report, model, torch.from_numpy(x), y)
    assert any("LayerNorm without affine parameters" in a for a in report.model["assumptions"])
    assert INFERRED_NOTE in report.model["assumptions"]


def test_fingerprint_mismatch_exits_2(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = _nonaffine_mlp()
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "ln.safetensors", arch={"family": "mlp", "activation": "relu"})
    with safe_open(str(ckpt), "pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "nrc_audit.layout"}  # layout lost, fingerprint kept
    save_file(dict(model.state_dict()), str(tmp_path / "bad.safetensors"), metadata=meta)
    data, _, _ = _mlp_data(tmp_path, model)
    result = CliRunner().invoke(audit_app, [str(tmp_path / "bad.safetensors"), str(data), "--no-features", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "is not the network that was saved" in message and "--model-def" in message and "norm" in message


def test_no_fingerprint_lists_every_assumption(tmp_path: Path) -> None:
    model = _nonaffine_mlp()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    data, _, _ = _mlp_data(tmp_path, model)
    notes = audit(tmp_path / "plain.safetensors", data).model["assumptions"]
    assert any("activation 'relu' assumed" in a for a in notes)
    assert any("no normalisation layers assumed" in a for a in notes)
    assert INFERRED_NOTE in notes and "architecture inferred" in inferred_architecture_warning(notes)


def test_half_precision_checkpoint_states_upcast(tmp_path: Path) -> None:
    model = _nonaffine_mlp()
    ckpt = nrc_audit.save_checkpoint(model.half(), tmp_path / "h.safetensors", arch={"family": "mlp", "activation": "relu"})
    data, _, _ = _mlp_data(tmp_path, model.float())
    notes = audit(ckpt, data).model["assumptions"]
    assert "float16 weights run upcast: compute dtype float32" in notes and VERIFIED_NOTE in notes


def test_transformer_encoder_layers_all_seen(tmp_path: Path) -> None:
    """The fused fast path is off during the pass: linear1/linear2 and the attention input projection appear."""
    import _library_nets

    torch.manual_seed(10)
    model = _library_nets.Encoder().double().eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((N, 24)), rng.standard_normal((N, 2))
    report = audit(tmp_path / "m.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:Encoder")
    names = check(report, model, torch.from_numpy(x), y)
    assert {"enc.layers.0.self_attn.in_proj", "enc.layers.1.linear1", "enc.layers.1.linear2"} <= set(names)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the pass


def test_arch_field_the_builder_cannot_honour_exits_2(tmp_path: Path) -> None:
    model = _nonaffine_mlp()
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "m.safetensors", arch={"family": "mlp", "dropout_first": True})
    data, _, _ = _mlp_data(tmp_path, model)
    result = CliRunner().invoke(audit_app, [str(ckpt), str(data), "--no-features", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "fields ['dropout_first'], which the 'mlp' builder cannot honour" in " ".join(result.stderr.split())


def test_cross_attention_exits_2_naming_exclude(tmp_path: Path) -> None:
    import _library_nets

    torch.save(_library_nets.CrossAttention().state_dict(), tmp_path / "m.pth")
    rng = np.random.default_rng(11)
    data = write_h5(tmp_path / "d.h5", X=rng.standard_normal((40, 24)).astype(np.float32), Y=rng.standard_normal((40, 2)))
    args = [str(tmp_path / "m.pth"), str(data), "--model-def", f"{NETS}:CrossAttention", "--no-features", "--no-progress"]
    result = CliRunner().invoke(audit_app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cross-attention" in result.stderr and "--exclude '*in_proj'" in " ".join(result.stderr.split())
    assert CliRunner().invoke(audit_app, [*args, "--exclude", "*in_proj", "--exit-zero"]).exit_code == 0


def test_hf_layouts_plain_folder_and_broken_index(tmp_path: Path) -> None:
    from nrc_audit.errors import CheckpointError
    from nrc_audit.io.hf_layout import load_model_files

    sd = {k: v.contiguous() for k, v in _nonaffine_mlp().state_dict().items()}
    (tmp_path / "plain").mkdir()
    save_file(sd, str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "plain" / "config.json").write_text('{"hidden": 16}')
    ckpt = load_model_files(tmp_path / "plain")
    assert set(ckpt.state_dict) == set(sd) and json.loads(ckpt.metadata["nrc_audit.hf_config"]) == {"hidden": 16}
    (tmp_path / "sharded").mkdir()
    save_file({"0.weight": sd["0.weight"]}, str(tmp_path / "sharded" / "a.safetensors"))
    index = {"weight_map": {"0.weight": "a.safetensors", "3.weight": "b.safetensors"}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shards \['b.safetensors'\] are missing"):
        load_model_files(tmp_path / "sharded")
    index["weight_map"]["3.weight"] = "../plain/model.safetensors"
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not plain file names"):
        load_model_files(tmp_path / "sharded")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_python_api_takes_extra_inputs_output_key_and_token_pooling(pooling: str) -> None:
    """nrc_audit.audit() on a BERT regression head in memory, batches (x, y, {'attention_mask': m}): the
    same masked pooling as the CLI, against the float64 reference from hooks on BERT's own modules."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=1)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).double().eval()
    rng = np.random.default_rng(5)
    lengths = rng.integers(3, 13, size=N)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 40, size=(N, 12)) * mask
    y = rng.standard_normal(N)
    x, m, yt = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y)
    batches = [(x[a:a + 50], yt[a:a + 50], {"attention_mask": m[a:a + 50]}) for a in range(0, N, 50)]
    report = nrc_audit.audit(model, batches, require_collapsed=0, output_key="logits", token_pooling=pooling)
    names, feats, weights, out = reference(model, x, {"attention_mask": m}, mask, pooling)
    assert report.model_mse == pytest.approx(float(((out[:, 0] - y) ** 2).mean()), rel=1e-6)
    assert_layers_match(report.layers, names, feats, weights, y, out)
    notes = report.model["assumptions"]
    assert any("entry 'logits'" in a for a in notes) and any(f"token pooling {pooling!r}" in a for a in notes)


def test_python_api_refuses_extra_inputs_of_the_wrong_length() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(10, 4), torch.randn(10, 2)
    with pytest.raises(nrc_audit.errors.DatasetError, match=r"extra input 'attention_mask' has shape \(9,\); it needs 10 rows"):
        nrc_audit.audit(net, [(x, y, {"attention_mask": torch.ones(9)})], require_collapsed=0)
    with pytest.raises(nrc_audit.errors.DatasetError, match="the third element must be a dict of keyword inputs"):
        nrc_audit.audit(net, [(x, y, torch.ones(10))], require_collapsed=0)
