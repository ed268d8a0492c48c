"""ResNets rebuilt from checkpoint keys (SPEC §1) and audited per conv/fc layer (SPEC §2, §4).

Every model is built here by an independent torchvision-style implementation (tests/fixtures_models.py) with
random weights and BatchNorm statistics; the audit sees only the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import nrc_audit
from fixtures_models import (
    assert_layers_match,
    capture,
    default_names,
    make_images,
    make_ref_resnet,
    targets_from,
    write_h5,
)
from nrc_audit.cli.app import audit_app
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.errors import CheckpointError
from nrc_audit.io.checkpoint import Checkpoint
from nrc_audit.models import resnet
from nrc_audit.engine.run import run_audit

N = 128

CASES = {
    "basic": dict(block="basic", layers=[1, 2], widths=[8, 16]),
    "bottleneck": dict(block="bottleneck", layers=[1, 1], widths=[4, 8], stem="imagenet"),
    "mlp_head": dict(block="basic", layers=[1, 1, 1], widths=[8, 8, 16], head_hidden=12),
    "t1": dict(block="basic", layers=[1], widths=[8], t=1),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case(tmp_path: Path, name: str, hw: int = 8, arch: dict | None = None, seed: int = 0, n: int = N) -> dict:
    """Reference model + checkpoint + uint8 images and targets; features captured with our own hooks."""
    model = make_ref_resnet(seed=seed, **CASES[name])
    images = make_images(n, hw=hw, seed=seed + 1)  # (N, 3, hw, hw) uint8
    x = torch.from_numpy(images).to(torch.float32) / 255.0
    names, feats, weights, out = capture(model, x)
    y = targets_from(out, seed=seed + 2)
    if name == "t1":
        y = y[:, 0]
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / f"{name}.safetensors", arch=arch)
    return {"model": model, "ckpt": ckpt, "images": images, "x": x, "y": y, "names": names, "feats": feats,
            "weights": weights, "out": out}  # fmt: skip


def _audit(ckpt: Path, data: Path, **kwargs) -> nrc_audit.Report:
    data_opts = DataOptions(**{k: kwargs.pop(k) for k in ("channels_last", "scale_uint8") if k in kwargs})
    return run_audit(AuditConfig(ckpt, data, data=data_opts, device="cpu", **kwargs))


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 2-stage BasicBlock case, shared by the tests that only read it, with its uint8 (N, C, H, W) data."""
    tmp = tmp_path_factory.mktemp("basic")
    case = _case(tmp, "basic")
    case["data"] = write_h5(tmp / "img.h5", X=case["images"], Y=case["y"])
    return case


# ----------------------------------------------------------------------------- the rebuilt network


@pytest.mark.parametrize("name", sorted(CASES))
def test_rebuilt_resnet_computes_the_same_function(tmp_path: Path, name: str) -> None:
    case = _case(tmp_path, name, hw=16, n=12)
    ckpt = nrc_audit.io.checkpoint.load_checkpoint(case["ckpt"])
    resolved = resnet.resolve(ckpt, {}, ModelOptions())
    assert resolved is not None
    resolved.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(resolved.module(case["x"]), case["model"](case["x"]), rtol=0, atol=0)
    assert resolved.architecture.startswith(f"resnet({CASES[name]['block']}, ")


def test_architecture_description_and_assumptions(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "m.safetensors", "safetensors", make_ref_resnet(**CASES["bottleneck"]).state_dict())
    resolved = resnet.resolve(ckpt, {}, ModelOptions())
    assert resolved.architecture == (
        "resnet(bottleneck, stem=7x7/2+maxpool, stages=[1, 1], widths=[4, 8], head=linear(32→2))"
    )
    text = " | ".join(resolved.assumptions)
    assert "7x7 stem conv: stride 2, a 3x3/2 max-pool" in text and "stage strides [1, 2]" in text
    head = resnet.resolve(Checkpoint(ckpt.path, "pt", make_ref_resnet(**CASES["mlp_head"]).state_dict()), {},
                          ModelOptions())  # fmt: skip
    assert head.architecture.endswith("head=mlp(16-12-2, relu, layernorm))")
    assert any("activation 'relu' between the fc head" in a for a in head.assumptions)


@pytest.mark.parametrize(
    "arch, ref_kwargs",
    [
        ({"stem_stride": 2, "maxpool": True}, {"stem_stride": 2, "maxpool": True}),
        ({"stage_strides": [1, 1]}, {"stage_strides": [1, 1]}),
        ({"stem_stride": 1, "maxpool": False, "stage_strides": [2, 2]},
         {"stem_stride": 1, "maxpool": False, "stage_strides": [2, 2]}),
    ],
)
def test_metadata_overrides_the_conventions(tmp_path: Path, arch: dict, ref_kwargs: dict) -> None:
    model = make_ref_resnet(block="basic", layers=[1, 1], widths=[8, 16], **ref_kwargs)
    path = nrc_audit.save_checkpoint(model, tmp_path / "m.safetensors", arch={"family": "resnet", **arch})
    ckpt = nrc_audit.io.checkpoint.load_checkpoint(path)
    resolved = resnet.resolve(ckpt, ckpt.arch, ModelOptions())
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(resolved.module.eval()(x), model(x), rtol=0, atol=0)
    assert any("stem conv" in a for a in resolved.assumptions) == ("stem_stride" not in arch)
    assert any("stage strides" in a for a in resolved.assumptions) == ("stage_strides" not in arch)


@pytest.mark.parametrize("block, cifar_stem", [("basic", True), ("bottleneck", False)])
def test_make_resnet_round_trips_through_a_checkpoint(tmp_path: Path, block: str, cifar_stem: bool) -> None:
    torch.manual_seed(0)
    model = resnet.make_resnet(block, blocks=(2, 1), widths=(4, 8), num_outputs=3, cifar_stem=cifar_stem).eval()
    path = nrc_audit.save_checkpoint(model, tmp_path / "m.safetensors")
    resolved = resnet.resolve(nrc_audit.io.checkpoint.load_checkpoint(path), {}, ModelOptions())
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(resolved.module.eval()(x), model(x), rtol=0, atol=0)
    assert model(x).shape == (4, 3)


def test_resnet_metadata_on_other_keys_names_model_def(mlp_case: dict, tmp_path: Path) -> None:
    path = nrc_audit.save_checkpoint(mlp_case["model"], tmp_path / "m.safetensors", arch={"family": "resnet"})
    result = CliRunner().invoke(audit_app, [str(path), str(mlp_case["data"]), "--no-features", "--no-progress"])
    assert result.exit_code == 2
    text = " ".join(result.stderr.split())
    assert "does not match the 'resnet' architecture in its metadata" in text and "--model-def" in text


def test_not_a_resnet_returns_none() -> None:
    sd = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).state_dict()
    assert resnet.resolve(Checkpoint(Path("m.pt"), "pt", dict(sd)), {}, ModelOptions()) is None


@pytest.mark.parametrize(
    "edit, arch, match",
    [
        (lambda sd: [sd.pop(k) for k in list(sd) if ".downsample." in k], {},
         r"layer2\.0 maps 8→16 channels with stride 2 but has no layer2\.0\.downsample\.\* keys"),
        (lambda sd: sd.pop("layer2.0.downsample.0.weight"), {}, r"layer2\.0\.downsample\.0\.weight is missing"),
        (lambda sd: sd.update({"layer1.0.extra.weight": torch.zeros(3)}), {}, r"unexpected keys \['layer1\.0\.extra\.weight'\]"),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("fc.")], {}, r"no usable fc head.*--model-def"),
        (lambda sd: sd.update({"layer3.0.conv1.weight": torch.zeros(16, 16, 3, 3)}), {}, r"layer3 has blocks|layer3\.0\.conv2\.weight is missing"),
        (lambda sd: None, {"stage_strides": [1]}, r"stage_strides=\[1\] must list 2 positive integers"),
        (lambda sd: None, {"maxpool": "yes"}, r"maxpool='yes' must be true or false"),
    ],
)
def test_resnet_key_errors_name_the_problem(edit, arch: dict, match: str) -> None:
    sd = dict(make_ref_resnet(**CASES["basic"]).state_dict())
    edit(sd)
    with pytest.raises(CheckpointError, match=match):
        resnet.resolve(Checkpoint(Path("m.safetensors"), "safetensors", sd), arch, ModelOptions())


def test_strict_loading_lists_every_bad_key() -> None:
    sd = dict(make_ref_resnet(**CASES["basic"]).state_dict())
    sd.pop("layer1.0.bn1.running_var")
    sd["layer2.1.bn2.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"missing keys \['layer1\.0\.bn1\.running_var'\].*mis-shaped keys "
                                              r"\['layer2\.1\.bn2\.weight: checkpoint \(5,\) vs model \(16,\)'\]"):  # fmt: skip
        resnet.resolve(Checkpoint(Path("m.safetensors"), "safetensors", sd), {}, ModelOptions())


# ----------------------------------------------------------------------------- audits against the reference


def test_basic_resnet_uint8_scaled_matches_reference(basic: dict) -> None:
    case = basic
    report = _audit(case["ckpt"], case["data"], scale_uint8=True, batch_size=50)
    expected = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                "layer2.1.conv1", "layer2.1.conv2", "fc"]  # fmt: skip
    assert default_names(case["names"]) == expected
    assert "layer2.0.downsample.0" in case["names"]
    compared = assert_layers_match(report.layers, expected, case["feats"], case["weights"], case["y"], case["out"])
    assert compared >= len(expected) - 2
    assert [r.kind for r in report.layers] == ["conv2d"] * 7 + ["linear"]
    assert all(r.pooled for r in report.layers[:-1]) and not report.layers[-1].pooled
    assert report.model["architecture"].startswith("resnet(basic, stem=3x3/1, stages=[1, 2], widths=[8, 16]")
    assert report.model_mse == pytest.approx(float(((case["out"] - case["y"]) ** 2).mean()), rel=1e-6)


def test_bottleneck_float_images_via_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    case = _case(tmp_path, "bottleneck", hw=16, arch={"family": "resnet"})
    data = write_h5(tmp_path / "img.h5", X=case["x"].numpy(), Y=case["y"])
    result = CliRunner().invoke(audit_app, [str(case["ckpt"]), str(data), "--format", "json", "--no-features",
                                            "--no-progress", "--device", "cpu", "--require-collapsed", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    names = default_names(case["names"])
    assert names == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv1",
                     "layer2.0.conv2", "layer2.0.conv3", "fc"]  # fmt: skip
    assert_layers_match(doc["layers"], names, case["feats"], case["weights"], case["y"], case["out"])


def test_mlp_head_channels_last_matches_reference(tmp_path: Path) -> None:
    case = _case(tmp_path, "mlp_head")
    data = write_h5(tmp_path / "img.h5", X=np.ascontiguousarray(case["images"].transpose(0, 2, 3, 1)), Y=case["y"])
    report = _audit(case["ckpt"], data, scale_uint8=True, channels_last=True)
    names = [r.name for r in report.layers]
    assert names[-2:] == ["fc.0", "fc.3"] and "fc.1" not in names
    assert [r.in_dim for r in report.layers[-2:]] == [16, 12]
    assert_layers_match(report.layers, default_names(case["names"]), case["feats"], case["weights"], case["y"],
                        case["out"])  # fmt: skip


def test_single_target_resnet(tmp_path: Path) -> None:
    case = _case(tmp_path, "t1")
    data = write_h5(tmp_path / "img.h5", X=case["images"], Y=case["y"])
    report = _audit(case["ckpt"], data, scale_uint8=True)
    assert report.target.dim == 1
    assert_layers_match(report.layers, default_names(case["names"]), case["feats"], case["weights"], case["y"],
                        case["out"])  # fmt: skip


@pytest.mark.parametrize(
    "layers, exclude, expected",
    [
        (("layer2.*", "fc"), ("*downsample*",), ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1",
                                                 "layer2.1.conv2", "fc"]),
        ((), ("layer1.*", "conv1"), ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0",
                                     "layer2.1.conv1", "layer2.1.conv2", "fc"]),
        (("*.conv2",), ("layer2.1.*",), ["layer1.0.conv2", "layer2.0.conv2"]),
    ],
)
def test_layer_globs(basic: dict, layers: tuple, exclude: tuple, expected: list[str]) -> None:
    case = basic
    report = _audit(case["ckpt"], case["data"], scale_uint8=True, layers=layers, exclude=exclude, batch_size=100)
    assert [r.name for r in report.layers] == expected == default_names(case["names"], layers, exclude)
    assert [r.index for r in report.layers] == list(range(len(expected)))
    assert_layers_match(report.layers, expected, case["feats"], case["weights"], case["y"], case["out"])


def test_layer_globs_via_cli(basic: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    case = basic
    args = [str(case["ckpt"]), str(case["data"]), "--scale-uint8", "--format", "json", "--no-features", "--no-progress",
            "--require-collapsed", "0", "--layers", "layer1.*", "--layers", "fc", "--exclude", "*conv2"]  # fmt: skip
    result = CliRunner().invoke(audit_app, args)
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["layer1.0.conv1", "fc"]
    result = CliRunner().invoke(audit_app, args[:9] + ["--layers", "nothing*"])
    assert result.exit_code == 2
    assert "no Linear or Conv2d layer is left to audit" in result.stderr


def test_wrong_channel_count_is_a_clear_error(basic: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    case = basic
    data = write_h5(tmp_path / "img.h5", X=np.ascontiguousarray(case["images"].transpose(0, 2, 3, 1)), Y=case["y"])
    result = CliRunner().invoke(audit_app, [str(case["ckpt"]), str(data), "--no-features", "--no-progress"])
    assert result.exit_code == 2
    assert "--channels-last" in result.stderr and "Traceback" not in result.output
