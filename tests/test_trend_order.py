"""Trend follows training order as the checkpoints record it, and histories keep one run per file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import nrc_audit
from conftest import SAMPLES, make_mlp, make_xy
from nrc_audit.cli.commands import trend_app
from nrc_audit.errors import OptionsError
from nrc_audit.io.training_position import TrainingPosition, training_position
from nrc_audit.outputs.history import HistoryWriter, load_run, read_records
from nrc_audit.outputs.trend import training_order

runner = CliRunner()


def _state():
    return {"0.weight": torch.zeros(2, 3)}


def test_position_from_safetensors_metadata(tmp_path):
    save_file(_state(), str(tmp_path / "a.safetensors"), metadata={"epoch": "7", "global_step": "350"})
    save_file(_state(), str(tmp_path / "b.safetensors"), metadata={"step": "12"})
    save_file(_state(), str(tmp_path / "c.safetensors"), metadata={"epoch": "last"})  # not a number
    assert training_position(tmp_path / "a.safetensors") == TrainingPosition(350, 7.0, "safetensors metadata")
    assert training_position(tmp_path / "b.safetensors") == TrainingPosition(12, None, "safetensors metadata")
    assert training_position(tmp_path / "c.safetensors") == TrainingPosition()


def test_position_from_a_lightning_ckpt_and_an_hf_checkpoint_folder(tmp_path):
    # a Lightning checkpoint is a torch pickle with epoch / global_step next to the state dict
    torch.save({"epoch": 4, "global_step": 40, "state_dict": _state(), "pytorch-lightning_version": "2.6"},
               tmp_path / "last.ckpt")  # fmt: skip
    assert training_position(tmp_path / "last.ckpt") == TrainingPosition(40, 4.0, "checkpoint dict")
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    save_file(_state(), str(folder / "model.safetensors"), metadata={"epoch": "99"})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 900, "epoch": 3.0, "log_history": []}))
    expected = TrainingPosition(900, 3.0, "trainer_state.json")
    assert training_position(folder) == expected == training_position(folder / "model.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    assert training_position(tmp_path / "junk.ckpt") == TrainingPosition()


def test_training_order_prefers_stored_positions_to_names(tmp_path):
    # names say a < b < c; the stored steps say c < a < b
    for name, step in (("ckpt_1", 300), ("ckpt_2", 500), ("ckpt_3", 100)):
        save_file(_state(), str(tmp_path / f"{name}.safetensors"), metadata={"global_step": str(step)})
    paths = sorted(tmp_path.glob("*.safetensors"))
    ordered, how, positions = training_order(paths)
    assert [p.stem for p in ordered] == ["ckpt_3", "ckpt_1", "ckpt_2"] and how == "by step stored in the checkpoints"
    assert [p.step for p in positions] == [100, 300, 500]
    save_file(_state(), str(tmp_path / "ckpt_0.safetensors"))  # one without a position: names decide
    ordered, how, _ = training_order(sorted(tmp_path.glob("*.safetensors")))
    assert [p.stem for p in ordered] == ["ckpt_0", "ckpt_1", "ckpt_2", "ckpt_3"] and how.startswith("by file name")


def test_trend_on_the_shipped_run_orders_by_epoch_metadata_and_gates_epoch_600(tmp_path):
    # mlp_wd.safetensors (epoch 600, the collapsed end of the run) has no number in its name: by name it
    # came first and the gate judged epoch 100; its metadata puts it last
    files = [SAMPLES / "mlp_wd.safetensors", *sorted((SAMPLES / "trend").glob("*.safetensors"))]
    out = tmp_path / "trend.json"
    result = runner.invoke(trend_app, [*map(str, files), "--data", str(SAMPLES / "data.h5"), "--limit", "600",
                                       "--no-progress", "--require-collapsed", "3", "--json", str(out)])  # fmt: skip
    assert "order (by epoch stored in the checkpoints): mlp_wd_epoch20 (epoch 20), mlp_wd_epoch60 (epoch 60), " \
           "mlp_wd_epoch100 (epoch 100), mlp_wd (epoch 600)" in " ".join(result.stderr.split())  # fmt: skip
    assert json.loads(out.read_text())["labels"] == ["mlp_wd_epoch20", "mlp_wd_epoch60", "mlp_wd_epoch100", "mlp_wd"]
    assert "gate on the last checkpoint (mlp_wd," in result.stderr and result.exit_code == 0, result.stderr


# ---------------------------------------------------------------------------------------------- histories


@pytest.fixture(scope="module")
def two_reports():
    x, y = map(torch.from_numpy, make_xy(200, 6, 2, seed=3))
    model = make_mlp([6, 16, 2], seed=2)
    first = nrc_audit.audit(model, [(x, y)], require_collapsed=0)
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    return first, nrc_audit.audit(model, [(x, y)], require_collapsed=0)


def test_a_new_run_never_appends_to_an_old_runs_history(tmp_path, two_reports):
    path = tmp_path / "h.jsonl"
    first = HistoryWriter(path, "monitor")
    first.append(two_reports[0], epoch=0, step=10)
    with pytest.raises(OptionsError, match=r"already holds 1 audit record\(s\) of run .*if_exists='overwrite'"):
        HistoryWriter(path, "monitor")
    resumed = HistoryWriter(path, "monitor", if_exists="resume")  # training resumed: the same run goes on
    resumed.append(two_reports[1], epoch=1, step=20)
    assert resumed.run_id == first.run_id and len(read_records(path)) == 2
    fresh = HistoryWriter(path, "monitor", if_exists="overwrite")
    assert len(read_records(path)) == 2  # nothing is lost before the new run's first audit
    fresh.append(two_reports[1], epoch=0, step=5)
    records = read_records(path)
    assert [(r.run_id, r.step) for r in records] == [(fresh.run_id, 5)] and fresh.run_id != first.run_id


def test_history_of_several_runs_needs_a_run_id_and_is_read_in_step_order(tmp_path, two_reports):
    path = tmp_path / "h.jsonl"
    writer = HistoryWriter(path, "lightning")
    writer.append(two_reports[1], epoch=2, step=200)
    writer.append(two_reports[0], epoch=1, step=100)  # written out of order (e.g. a late validation audit)
    records, order = load_run(path)
    assert order == "step" and [r.step for r in records] == [100, 200]
    with open(path, "a") as fh:  # another run's record copied in by hand
        fh.write(json.dumps({"label": "epoch 0", "run_id": "other", "report": two_reports[0].to_dict()}) + "\n")
    with pytest.raises(OptionsError, match=r"holds 2 runs \(.*: 2 record\(s\), other: 1 record\(s\)\); pass --run"):
        load_run(path)
    assert len(load_run(path, "other")[0]) == 1
    result = runner.invoke(trend_app, [str(path), "--run", writer.run_id, "--require-collapsed", "0"])
    assert result.exit_code == 0, result.stderr
    assert "order (by step): epoch 1, epoch 2" in result.stderr
    unknown = runner.invoke(trend_app, [str(path), "--run", "nope"])
    assert unknown.exit_code == 2 and "holds no records of run 'nope'" in unknown.stderr
    mixed = tmp_path / "copy.jsonl"
    shutil.copy(path, mixed)
    assert runner.invoke(trend_app, [str(mixed)]).exit_code == 2
