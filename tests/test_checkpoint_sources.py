"""Checkpoints as training tools write them: Lightning ``.ckpt``, DDP/compile prefixes in safetensors, tied
weights dropped by ``safetensors.torch.save_model``, lazy modules, Hugging Face folders read by transformers'
own loader, and ``--model-def`` builders that load their own weights. Every audit is compared with the dense
float64 reference from hooks on the model's own modules (tests/test_library_models.py), never with the tool."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model
from typer.testing import CliRunner

import _loader_nets as nets
from conftest import write_h5
from test_library_models import audit, check
from nrc_audit.cli.app import audit_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NETS = str(Path(__file__).resolve().parent / "_loader_nets.py")
N = 160


def _mlp_case(tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    model = nets.mlp().double().eval()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, 6))
    y = np.tanh(x[:, :2]) + 0.1 * rng.standard_normal((N, 2))
    return model, write_h5(tmp_path / "d.h5", X=x, Y=y), x, y


def _lightning(sd: dict, prefix: str = "model.") -> dict:
    """What ``Trainer.save_checkpoint`` writes (Lightning 2.x), with plain values only."""
    return {"epoch": 7, "global_step": 350, "pytorch-lightning_version": "2.4.0",
            "state_dict": {prefix + k: v for k, v in sd.items()}, "loops": {"fit_loop": {"epoch_progress": {}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.1)}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01}]}], "lr_schedulers": [],
            "hparams_name": "kwargs", "hyper_parameters": {"width": 16, "lr": 0.01}}  # fmt: skip


def test_lightning_ckpt_audits_the_network_and_keeps_epoch_and_step(tmp_path: Path) -> None:
    from nrc_audit.io.training_position import training_position

    model, data, x, y = _mlp_case(tmp_path)
    torch.save(_lightning(model.state_dict()), tmp_path / "epoch=7-step=350.ckpt")
    ckpt = tmp_path / "epoch=7-step=350.ckpt"
    report = audit(ckpt, data)  # the MLP is found from the keys once the 'model.' attribute is removed
    check(report, model, torch.from_numpy(x), y)
    assert report.model["format"] == "pt"
    assert any("removed the LightningModule attribute prefix 'model.'" in a for a in report.model["assumptions"])
    assert (training_position(ckpt).epoch, training_position(ckpt).step) == (7, 350)  # what trend orders by
    lit = nets.LitLike().double().eval()
    lit.model = model
    for builder, net in (("mlp", model), ("LitLike", lit)):  # the inner network, or the LightningModule's layout
        report = audit(ckpt, data, model_def=f"{NETS}:{builder}")
        check(report, net, torch.from_numpy(x), y)
    assert any("the prefix is kept" in a for a in report.model["assumptions"])


def test_lightning_ckpt_of_a_compiled_ddp_model(tmp_path: Path) -> None:
    model, data, x, y = _mlp_case(tmp_path, seed=1)
    torch.save(_lightning(model.state_dict(), "model._orig_mod."), tmp_path / "last.ckpt")
    notes = audit(tmp_path / "last.ckpt", data).model["assumptions"]
    assert any("'_orig_mod.'" in a for a in notes) and any("'model.'" in a for a in notes)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_removed_in_safetensors_too(tmp_path: Path, prefix: str) -> None:
    model, data, x, y = _mlp_case(tmp_path, seed=2)
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    report = audit(tmp_path / "m.safetensors", data)
    check(report, model, torch.from_numpy(x), y)
    assert any(f"removed the {prefix.split('.')[-2] + '.'!r} key prefix" in a for a in report.model["assumptions"])


def test_ddp_prefix_in_a_sharded_folder(tmp_path: Path) -> None:
    import json

    model, data, x, y = _mlp_case(tmp_path, seed=2)
    sd = {"module." + k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "sharded").mkdir()
    names = sorted(sd)
    for part, keys in (("a.safetensors", names[:3]), ("b.safetensors", names[3:])):
        save_file({k: sd[k] for k in keys}, str(tmp_path / "sharded" / part))
    weight_map = {k: "a.safetensors" if k in names[:3] else "b.safetensors" for k in names}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = audit(tmp_path / "sharded", data)
    check(report, model, torch.from_numpy(x), y)
    assert any("removed the 'module.' key prefix" in a for a in report.model["assumptions"])


def test_tied_weights_dropped_by_save_model_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nets.Tied().double().eval()
    save_model(model, str(tmp_path / "tied.safetensors"))  # drops one of enc.weight / dec.weight
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((N, 8)), rng.standard_normal((N, 2))
    report = audit(tmp_path / "tied.safetensors", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:Tied")
    check(report, model, torch.from_numpy(x), y)
    assert any(a.startswith("tied weight ") for a in report.model["assumptions"])


def test_lazy_modules_are_materialised_by_a_dry_forward(tmp_path: Path) -> None:
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((N, 4, 10)), rng.standard_normal((N, 2))
    model = nets.Lazy()
    model(torch.zeros(1, 4, 10))  # trained: the lazy modules have their shapes
    model = model.double().eval()
    torch.save(model.state_dict(), tmp_path / "lazy.pth")
    report = audit(tmp_path / "lazy.pth", write_h5(tmp_path / "d.h5", X=x, Y=y), model_def=f"{NETS}:lazy")
    check(report, model, torch.from_numpy(x), y)
    assert any("lazy modules materialised" in a for a in report.model["assumptions"])


def test_builder_that_loads_its_own_weights_is_not_overwritten(tmp_path: Path) -> None:
    model, data, x, y = _mlp_case(tmp_path, seed=5)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    blob = {f"{p}{i}": getattr(m, "weight" if p == "w" else "bias") for i, m in enumerate(linears) for p in "wb"}
    torch.save({k: v.detach() for k, v in blob.items()}, tmp_path / "own.pt")  # names that fit no module
    report = audit(tmp_path / "own.pt", data, model_def=f"{NETS}:own_weights")
    check(report, model, torch.from_numpy(x), y)
    assert any("weights loaded by the --model-def callable itself" in a for a in report.model["assumptions"])


def _bert(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=1)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).double().eval()
    model.save_pretrained(tmp_path / "bert")
    return model, tmp_path / "bert"


def _tokens(tmp_path: Path, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, Path]:
    rng = np.random.default_rng(seed)
    ids, y = rng.integers(1, vocab, size=(N, 12)), rng.standard_normal(N)
    return ids, y, write_h5(tmp_path / "t.h5", X=ids, Y=y)


def test_hf_folder_without_model_def_is_built_by_transformers(tmp_path: Path) -> None:
    model, folder = _bert(tmp_path)
    ids, y, data = _tokens(tmp_path, 40, 6)
    report = audit(folder, data)
    check(report, model, torch.from_numpy(ids), y)
    assert report.model["architecture"] == "transformers:BertForSequenceClassification"
    assert any("from_pretrained" in a for a in report.model["assumptions"])


def test_readme_recipe_on_keys_renamed_on_disk(tmp_path: Path) -> None:
    """transformers 5 keeps Mixtral's experts fused in memory and split on disk: only its loader maps them."""
    transformers = pytest.importorskip("transformers", minversion="5")
    torch.manual_seed(7)
    config = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=32, num_labels=1,
                                        pad_token_id=0, experts_implementation="eager")  # fmt: skip
    model = transformers.MixtralForSequenceClassification(config).double().eval()
    model.save_pretrained(tmp_path / "mixtral")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mixtral" / "model.safetensors"), "pt") as fh:
        assert set(fh.keys()) != set(model.state_dict())  # the case: on-disk names are not module names
    ids, y, data = _tokens(tmp_path, 40, 7)
    report = audit(tmp_path / "mixtral", data, model_def=f"{NETS}:mixtral")
    check(report, copy.deepcopy(model), torch.from_numpy(ids), y)
    assert any("transformers' key mapping applied" in a for a in report.model["assumptions"])


def test_hf_folder_whose_weights_do_not_fit_exits_2(tmp_path: Path) -> None:
    model, folder = _bert(tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _, _, data = _tokens(tmp_path, 40, 8)
    result = CliRunner().invoke(audit_app, [str(folder), str(data), "--no-features", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    assert "classifier.weight" in text and "random initialisation" in text
