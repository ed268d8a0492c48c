"""The transformers callback: a token model returning a ModelOutput, trained by the HF Trainer on CPU; the
NRC scalars in trainer.state.log_history and in the Trainer's TensorBoard events equal a direct
``nrc_audit.audit`` of the same weights on the same probe set (attention mask included)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import _tv_ops  # noqa: F401  (before transformers imports torchvision)
import nrc_audit
from nrc_audit.cli.commands import trend_app
from nrc_audit.integrations.common import scalars

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

runner = CliRunner()
BATCH, VOCAB, T = 32, 20, 6


class _TokenRegressor(nn.Module):
    """Embedding → Linear on every token → masked mean → head, returning a ModelOutput like HF models."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.relu(self.mix(self.embed(input_ids)))  # (B, T, 12): the head's input is pooled below
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 12)
        logits = self.head(pooled)
        loss = None if labels is None else nn.functional.mse_loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _data(n: int = 192, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[: n // 2, T // 2:] = 0  # half the rows are padded: the mask must matter
    value = (ids.float() * mask).sum(1) / mask.sum(1)
    y = torch.stack([value, value ** 0.5], 1)
    return ids, mask, (y - y.mean(0)) / y.std(0)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids, mask, y) -> None:
        self.ids, self.mask, self.y = ids, mask, y

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


class _Snapshots(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.weights: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        assert model.training
        self.weights.append(copy.deepcopy(model.state_dict()))


def test_trainer_callback_logs_what_a_direct_audit_finds(tmp_path, one_torch_thread):
    from nrc_audit.integrations.transformers import NRCTrainerCallback

    ids, mask, y = _data()
    history = tmp_path / "nrc.jsonl"
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=2, learning_rate=1e-2,
                                          per_device_train_batch_size=32, logging_strategy="epoch", save_strategy="no",
                                          report_to=["tensorboard"], use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0, seed=0)  # fmt: skip
    trainer = transformers.Trainer(model=_TokenRegressor(), args=args, train_dataset=_Rows(ids, mask, y))
    snaps = _Snapshots()
    trainer.add_callback(NRCTrainerCallback((ids, y, {"attention_mask": mask}), history=history, batch_size=BATCH,
                                            trainer=trainer))  # fmt: skip
    trainer.add_callback(snaps)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "nrc/collapsed_layers" in entry]
    assert [entry["epoch"] for entry in logged] == [1.0, 2.0] and len(snaps.weights) == 2
    references = []
    for entry, weights in zip(logged, snaps.weights):
        model = _TokenRegressor()
        model.load_state_dict(weights)
        batches = [(ids[a:a + BATCH], y[a:a + BATCH], {"attention_mask": mask[a:a + BATCH]})
                   for a in range(0, len(ids), BATCH)]  # fmt: skip
        references.append(nrc_audit.audit(model, batches))
        expected = scalars(references[-1])
        assert {"nrc/mix/nrc3", "nrc/head/nrc1"} <= set(expected)
        for tag, value in expected.items():
            assert math.isclose(entry[tag], value, rel_tol=1e-12, abs_tol=1e-12), tag
    pooled = {layer.name: layer.pooled for layer in references[-1].layers}
    assert pooled == {"mix": True, "head": False}  # mix's input is (B, T, 12) tokens, pooled under the mask

    # the Trainer's own epoch logs still happen, and its TensorBoard writer received ours (float32 events,
    # under the train/ prefix HF gives every training log)
    assert [entry["epoch"] for entry in trainer.state.log_history if "loss" in entry] == [1.0, 2.0]
    run_dirs = [p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(run_dirs[0]))
    events.Reload()
    for tag, value in scalars(references[-1]).items():
        assert math.isclose(events.Scalars("train/" + tag)[-1].value, value, rel_tol=1e-6, abs_tol=1e-6), tag

    out = tmp_path / "trend.json"
    result = runner.invoke(trend_app, [str(history), "--require-collapsed", "0", "--json", str(out)])
    assert result.exit_code == 0 and "order (by step): epoch 1, epoch 2" in result.stderr, result.stderr
    for doc, ref in zip(json.loads(out.read_text())["reports"], references):
        assert [layer["nrc3"] for layer in doc["layers"]] == [layer.nrc3 for layer in ref.layers]
