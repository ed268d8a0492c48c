"""The same ResNet as .safetensors and as .pt/.pth containers gives the same report; unsafe or broken files exit 2."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nrc_audit
from fixtures_models import capture, default_names, make_images, make_ref_resnet, targets_from, write_h5
from nrc_audit.cli.app import audit_app
from nrc_audit.config import AuditConfig, DataOptions
from nrc_audit.engine.pipeline import run_audit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """A custom class: pickling an instance needs code execution to load, so nrc-audit must refuse it."""

    def __init__(self) -> None:
        self.weights = torch.zeros(3)


@pytest.fixture(scope="module")
def resnet_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("formats")
    model = make_ref_resnet(seed=5, block="basic", layers=[1, 1], widths=[8, 16])
    images = make_images(128, hw=8, seed=6)
    x = torch.from_numpy(images).float() / 255.0
    all_names, _, _, out = capture(model, x)
    data = write_h5(tmp / "img.h5", X=images, Y=targets_from(out, seed=7))
    sd = model.state_dict()
    reference = nrc_audit.save_checkpoint(model, tmp / "model.safetensors")
    names = default_names(all_names)
    return {"dir": tmp, "model": model, "sd": sd, "data": data, "reference": reference, "names": names}


def _prefixed(sd: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in sd.items())


CONTAINERS = {
    "plain.pth": lambda sd: sd,
    "net.pth": lambda sd: {"net": sd},
    "state_dict.pth": lambda sd: {"state_dict": sd},
    "model_state_dict.pt": lambda sd: {"model_state_dict": sd, "epoch": 12, "optimizer": {"lr": 0.1}},
    "model.pt": lambda sd: {"model": sd},
    "ddp.pth": lambda sd: {"state_dict": _prefixed(sd, "module.")},
    "compiled.pth": lambda sd: _prefixed(sd, "_orig_mod."),
    "ddp_compiled.pth": lambda sd: {"model_state_dict": _prefixed(sd, "module._orig_mod.")},
}
NOTES = {
    "net.pth": "'net' entry",
    "ddp.pth": "removed the 'module.' key prefix",
    "compiled.pth": "removed the '_orig_mod.' key prefix",
    "ddp_compiled.pth": "removed the '_orig_mod.' key prefix",
}


def _audit(ckpt: Path, data: Path) -> nrc_audit.Report:
    return run_audit(AuditConfig(ckpt, data, data=DataOptions(scale_uint8=True), device="cpu", batch_size=50))


def test_every_container_gives_the_safetensors_report(resnet_case: dict) -> None:
    base = _audit(resnet_case["reference"], resnet_case["data"])
    assert [layer.name for layer in base.layers] == resnet_case["names"]
    assert base.model["format"] == "safetensors"
    expected = [layer.__dict__ for layer in base.layers]
    for name, wrap in CONTAINERS.items():
        path = resnet_case["dir"] / name
        torch.save(wrap(resnet_case["sd"]), path)
        report = _audit(path, resnet_case["data"])
        assert report.model["format"] == "pt", name
        assert report.model["architecture"] == base.model["architecture"], name
        assert report.model["num_parameters"] == base.model["num_parameters"]
        assert [layer.__dict__ for layer in report.layers] == expected, name
        assert report.model_mse == base.model_mse
        if name in NOTES:
            assert any(NOTES[name] in a for a in report.model["assumptions"]), (name, report.model["assumptions"])


def test_safetensors_with_arch_metadata_gives_the_same_report(resnet_case: dict) -> None:
    path = nrc_audit.save_checkpoint(resnet_case["model"], resnet_case["dir"] / "meta.safetensors",
                                     arch={"family": "resnet", "stem_stride": 1, "maxpool": False,
                                           "stage_strides": [1, 2]})  # fmt: skip
    base = _audit(resnet_case["reference"], resnet_case["data"])
    report = _audit(path, resnet_case["data"])
    assert [layer.__dict__ for layer in report.layers] == [layer.__dict__ for layer in base.layers]
    assert not any("convention" in a for a in report.model["assumptions"])  # nothing left to assume


def _cli(ckpt: Path, data: Path, tmp: Path) -> object:
    return CliRunner().invoke(audit_app, [str(ckpt), str(data), "--scale-uint8", "--no-progress",
                                          "--features", str(tmp / "f.h5"), "--json", str(tmp / "r.json")])  # fmt: skip


def _assert_usage_error(result, tmp: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    text = " ".join(result.stderr.split())  # undo Rich's line wrapping
    for needle in needles:
        assert needle in text, (needle, text)
    assert not (tmp / "f.h5").exists() and not (tmp / "r.json").exists()


@pytest.mark.parametrize("what", ["custom class", "whole module"])
def test_pickled_objects_are_refused(resnet_case: dict, tmp_path: Path, what: str) -> None:
    path = tmp_path / "evil.pth"
    obj = {"state_dict": resnet_case["sd"], "extra": Payload()} if what == "custom class" else resnet_case["model"]
    torch.save(obj, path)
    result = _cli(path, resnet_case["data"], tmp_path)
    cls = "test_checkpoint_formats.Payload" if what == "custom class" else "fixtures_models.RefResNet"
    _assert_usage_error(result, tmp_path, "refused to load", f"contains a {cls} object", "would execute code",
                        "weights_only=True", "Save model.state_dict()")


def test_non_state_dict_pt_is_refused(resnet_case: dict, tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    _assert_usage_error(_cli(path, resnet_case["data"], tmp_path), tmp_path, "expected a state dict", "found list")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoints_exit_2(resnet_case: dict, tmp_path: Path, fmt: str, damage: str) -> None:
    good = tmp_path / f"good.{fmt}"
    if fmt == "pth":
        torch.save(resnet_case["sd"], good)
    else:
        nrc_audit.save_checkpoint(resnet_case["model"], good)
    raw = good.read_bytes()
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x13\x37not a checkpoint" * 40, "empty": b""}[damage])
    needle = "is not a readable PyTorch checkpoint" if fmt == "pth" else "is not a valid safetensors file"
    _assert_usage_error(_cli(bad, resnet_case["data"], tmp_path), tmp_path, needle)


def test_missing_checkpoint_and_unknown_extension(resnet_case: dict, tmp_path: Path) -> None:
    _assert_usage_error(_cli(tmp_path / "nope.pth", resnet_case["data"], tmp_path), tmp_path, "checkpoint not found")
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    _assert_usage_error(_cli(odd, resnet_case["data"], tmp_path), tmp_path, "unknown checkpoint extension '.onnx'")


def test_json_report_from_pth_validates(resnet_case: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.pth"
    torch.save({"state_dict": _prefixed(resnet_case["sd"], "module.")}, path)
    result = CliRunner().invoke(audit_app, [str(path), str(resnet_case["data"]), "--scale-uint8", "--no-progress",
                                            "--no-features", "--format", "json", "--require-collapsed", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["format"] == "pt"
    assert [layer["name"] for layer in doc["layers"]] == resnet_case["names"]
