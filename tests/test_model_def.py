"""``--model-def``: architectures nrc-audit cannot detect, built by user code (SPEC §1) and audited per layer."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import nrc_audit
from fixtures_models import assert_layers_match, capture, write_h5
from nrc_audit.cli.app import audit_app
from nrc_audit.config import AuditConfig, ModelOptions
from nrc_audit.errors import CheckpointError
from nrc_audit.io.checkpoint import KWARGS_KEY
from nrc_audit.engine.pipeline import run_audit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NETS_SOURCE = textwrap.dedent(
    '''
    """User model definitions (written by the test into tmp_path)."""
    import torch
    from torch import nn

    class TwoBranch(nn.Module):
        """Two Linear stacks in a ModuleDict, concatenated, then a head: neither an MLP chain nor a ResNet."""

        def __init__(self, d_in: int = 6, width: int = 8, t: int = 2) -> None:
            super().__init__()
            self.branches = nn.ModuleDict({
                "deep": nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh()),
                "wide": nn.Sequential(nn.Linear(d_in, 2 * width), nn.GELU()),
            })
            self.head = nn.Linear(3 * width, t)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.cat([self.branches["deep"](x), self.branches["wide"](x)], dim=1)  # (B, 3 width)
            return self.head(z)


    class Shared(nn.Module):
        """Applies the same Linear twice (weight sharing)."""

        def __init__(self, d_in: int = 6, width: int = 8, t: int = 2) -> None:
            super().__init__()
            self.inp = nn.Linear(d_in, width)
            self.shared = nn.Linear(width, width)
            self.out = nn.Linear(width, t)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            h = torch.relu(self.shared(h))
            h = torch.relu(self.shared(h))
            return self.out(h)


    def build(width: int = 8, d_in: int = 6, t: int = 2) -> nn.Module:
        return TwoBranch(d_in, width, t)


    def build_shared(width: int = 8) -> nn.Module:
        return Shared(width=width)


    def not_a_module(**kwargs):
        return {"width": kwargs}
    '''
)
N, D, T = 160, 6, 2


def _load_source(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def case(tmp_path: Path) -> dict:
    """nets.py in tmp_path, a width-16 TwoBranch checkpoint, data and its features from our own hooks."""
    src = tmp_path / "nets.py"
    src.write_text(NETS_SOURCE)
    nets = _load_source(src, "_test_model_def_nets")
    torch.manual_seed(0)
    model = nets.build(width=16).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, D)).astype(np.float32)
    y = np.tanh(x[:, :T] * 1.5 + x[:, 2:4] ** 2).astype(np.float32)
    data = write_h5(tmp_path / "data.h5", X=x, Y=y)
    ckpt = nrc_audit.save_checkpoint(model, tmp_path / "twobranch.safetensors")
    names, feats, weights, out = capture(model, torch.from_numpy(x))
    return {"dir": tmp_path, "src": src, "nets": nets, "model": model, "data": data, "ckpt": ckpt, "x": x, "y": y,
            "names": names, "feats": feats, "weights": weights, "out": out}  # fmt: skip


def _invoke(*args: str):
    return CliRunner().invoke(audit_app, [*args, "--no-progress", "--no-features", "--require-collapsed", "0"])


def _stderr(result) -> str:
    return " ".join(result.stderr.split())  # undo Rich's line wrapping


def test_file_model_def_with_kwargs_matches_reference(case: dict) -> None:
    target = f"{case['src']}:build"
    result = _invoke(str(case["ckpt"]), str(case["data"]), "--model-def", target, "--model-kwargs", '{"width": 16}',
                     "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert case["names"] == ["branches.deep.0", "branches.deep.2", "branches.wide.0", "head"]
    assert_layers_match(doc["layers"], case["names"], case["feats"], case["weights"], case["y"], case["out"])
    assert doc["model"]["architecture"] == f'model-def:{target}({{"width": 16}})'
    assert f"model built by user code {target!r}" in doc["model"]["assumptions"]


def test_package_model_def(case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = case["dir"] / "usernets_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(NETS_SOURCE)
    monkeypatch.syspath_prepend(str(case["dir"]))
    for name in ("usernets_pkg", "usernets_pkg.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    opts = ModelOptions(model_def="usernets_pkg.models:build", model_kwargs={"width": 16})
    report = run_audit(AuditConfig(case["ckpt"], case["data"], model=opts, device="cpu", batch_size=64))
    assert_layers_match(report.layers, case["names"], case["feats"], case["weights"], case["y"], case["out"])
    assert report.model["architecture"] == 'model-def:usernets_pkg.models:build({"width": 16})'


def test_kwargs_from_checkpoint_metadata(case: dict) -> None:
    ckpt = nrc_audit.save_checkpoint(case["model"], case["dir"] / "withkw.safetensors",
                                     metadata={KWARGS_KEY: json.dumps({"width": 16})})  # fmt: skip
    result = _invoke(str(ckpt), str(case["data"]), "--model-def", f"{case['src']}:build", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert_layers_match(doc["layers"], case["names"], case["feats"], case["weights"], case["y"], case["out"])
    # the command line wins over the metadata: width 8 does not fit the width-16 weights
    result = _invoke(str(ckpt), str(case["data"]), "--model-def", f"{case['src']}:build", "--model-kwargs",
                     '{"width": 8}')  # fmt: skip
    assert result.exit_code == 2
    assert "mis-shaped keys ['branches.deep.0.weight: checkpoint (16, 6) vs model (8, 6)'" in _stderr(result)


def test_unknown_architecture_names_model_def(case: dict) -> None:
    result = _invoke(str(case["ckpt"]), str(case["data"]))
    assert result.exit_code == 2
    text = _stderr(result)
    assert "matches no known architecture" in text and "--model-def" in text
    assert "Traceback" not in result.output and result.stdout == ""


def test_strict_loading_lists_every_bad_key(case: dict) -> None:
    sd = dict(case["model"].state_dict())
    sd.pop("head.bias")
    sd.pop("branches.wide.0.bias")
    sd["branches.extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(2, 7)
    ckpt = case["dir"] / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(ckpt))
    opts = ModelOptions(model_def=f"{case['src']}:build", model_kwargs={"width": 16})
    with pytest.raises(CheckpointError, match=r"missing keys \['branches\.wide\.0\.bias', 'head\.bias'\], "
                                              r"unexpected keys \['branches\.extra\.weight'\], mis-shaped keys "
                                              r"\['head\.weight: checkpoint \(2, 7\) vs model \(2, 48\)'\]"):  # fmt: skip
        run_audit(AuditConfig(ckpt, case["data"], model=opts, device="cpu"))
    result = _invoke(str(ckpt), str(case["data"]), "--model-def", f"{case['src']}:build", "--model-kwargs",
                     '{"width": 16}')  # fmt: skip
    assert result.exit_code == 2
    text = _stderr(result)
    for key in ("'head.bias'", "'branches.wide.0.bias'", "'branches.extra.weight'", "head.weight: checkpoint (2, 7)"):
        assert key in text, key


def test_module_run_twice_is_audited_per_call(case: dict) -> None:
    torch.manual_seed(1)
    ckpt = nrc_audit.save_checkpoint(case["nets"].build_shared(width=8), case["dir"] / "shared.safetensors")
    target = f"{case['src']}:build_shared"
    result = _invoke(str(ckpt), str(case["data"]), "--model-def", target, "--format", "json", "--exit-zero")
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["inp", "shared#1", "shared#2", "out"]
    result = _invoke(str(ckpt), str(case["data"]), "--model-def", target, "--exclude", "shared", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["inp", "out"]


@pytest.mark.parametrize(
    "target, kwargs, needle",
    [
        ("{src}", None, "is not of the form path/to/file.py:callable"),
        ("{dir}/missing.py:build", None, "file not found"),
        ("{src}:nothing_here", None, "has no callable named 'nothing_here'"),
        ("{src}:not_a_module", None, "returned dict, not an nn.Module"),
        ("{src}:build", '{"depth": 3}', "raised TypeError"),
        ("no_such_pkg_xyz.mod:build", None, "importing 'no_such_pkg_xyz.mod' failed"),
        ("{src}:build", "[16]", "--model-kwargs must be a JSON object"),
    ],
)
def test_model_def_errors(case: dict, target: str, kwargs: str | None, needle: str) -> None:
    args = [str(case["ckpt"]), str(case["data"]), "--model-def", target.format(src=case["src"], dir=case["dir"])]
    if kwargs is not None:
        args += ["--model-kwargs", kwargs]
    result = _invoke(*args)
    assert result.exit_code == 2
    assert needle in _stderr(result)
    assert "Traceback" not in result.output
