"""Hugging Face model cards: a ``model-index`` the Hub's own parser accepts, and a merge into an existing README.md.

The Hub's model-index (https://github.com/huggingface/hub-docs/blob/main/modelcard.md) requires, per result,
``task.type`` (a Hub task id), ``dataset.type`` (a Hub dataset id) and ``dataset.name``; ``source`` needs
both ``name`` and ``url``. nrc-audit knows no public URL of its own, so it writes no ``source``, and it
takes the dataset only from what the user states (``--dataset-id``, ``--dataset-name``): the local HDF5
file name and hash are no Hub dataset and revision (they stay in the markdown section and the JSON report).

Merging changes the front matter by a text splice (front_matter.py): only nrc-audit's own result in the
model-index is replaced or added, and every other byte (BOM, line endings, comments, YAML 1.1 values,
duplicate keys, other results) stays; a card it cannot change that way is refused. The nrc-audit section
of the body lives between two HTML-comment markers and is replaced in place, so running the merge twice
gives the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrc_audit.errors import OptionsError
from nrc_audit.outputs import front_matter
from nrc_audit.outputs.markdown import headline_metrics, to_markdown
from nrc_audit.outputs.records import ReportData as Report

TASK_NAME = "Deep Neural Regression Collapse audit"  # identifies nrc-audit's own eval results when merging
START, END = "<!-- nrc-audit:start -->", "<!-- nrc-audit:end -->"
# Hub task ids (https://huggingface.co/tasks); image regression has none, so non-MLPs default to "other".
DEFAULT_TASK = {"mlp": "tabular-regression"}  # by the architecture's family, e.g. "mlp(20-64-4, relu)" → mlp


@dataclass(frozen=True)
class HubCard:
    """What the user states about the Hub side of the card. ``dataset_id``: a Hub dataset id (``user/name``)."""

    dataset_id: str | None = None
    dataset_name: str | None = None
    task: str | None = None  # None: tabular-regression for MLPs, "other" for other architectures
    model_name: str | None = None  # None: the checkpoint's file stem


def model_index(report: Report, card: HubCard) -> list[dict[str, Any]]:
    """The ``model-index`` value: one model, one result with the headline metrics (undefined ones left out).

    Raises:
        OptionsError: when no ``dataset_id`` is given (the Hub requires a dataset on every result).
    """
    if not card.dataset_id:
        raise OptionsError("--model-index needs --dataset-id: the Hub requires a dataset id on every result "
                           "(e.g. --dataset-id user/my-data); the local HDF5 file is no Hub dataset.")  # fmt: skip
    family = str(report.model.get("architecture", "")).split("(")[0]
    task = card.task or DEFAULT_TASK.get(family, "other")
    metrics = [{"type": m["type"], "name": m["name"], "value": m["value"]}
               for m in headline_metrics(report) if m["value"] is not None]  # fmt: skip
    result = {
        "task": {"type": task, "name": TASK_NAME},
        "dataset": {"type": card.dataset_id, "name": card.dataset_name or card.dataset_id},
        "metrics": metrics,
    }
    return [{"name": card.model_name or Path(report.model["path"]).stem, "results": [result]}]


def _dump(value: Any) -> str:
    return front_matter.dump(value)


def to_model_index(report: Report, card: HubCard) -> str:
    """The ``model-index`` YAML fragment, ready to paste into a card's front matter."""
    return _dump({"model-index": model_index(report, card)})


def split_card(text: str, where: Path | str = "the card") -> tuple[dict[str, Any], str]:
    """(front matter as a dict, body) of a model card; a card without front matter has an empty dict."""
    card = front_matter.split(text, where)
    return front_matter.parse(card, where)[1], card.body


def _is_ours(dataset_id: str) -> Any:
    def same(result: Any) -> bool:
        return (isinstance(result, dict) and isinstance(result.get("task"), dict)
                and result["task"].get("name") == TASK_NAME and isinstance(result.get("dataset"), dict)
                and result["dataset"].get("type") == dataset_id)  # fmt: skip

    return same


def _merge_body(body: str, section: str, newline: str = "\n") -> str:
    block = f"{START}\n{section.rstrip()}\n{END}\n".replace("\n", newline)
    start, end = body.find(START), body.find(END)
    if (start < 0) != (end < 0) or end < start:
        raise OptionsError(f"the card has one nrc-audit marker without the other ({START} … {END}); "
                           "remove the stray marker or add the missing one.")  # fmt: skip
    if start < 0:
        return body.rstrip() + (newline * 2 if body.strip() else "") + block
    tail = body[end + len(END):]
    return body[:start] + block + tail.lstrip("\r\n")


def merge_model_card(existing: str, report: Report, card: HubCard, where: Path | str = "the card") -> str:
    """The card ``existing`` ('' for a new card) with the audit merged in: the model-index result (only with
    ``card.dataset_id``; the front matter is otherwise left byte for byte) and the :func:`to_markdown` section."""
    doc = front_matter.split(existing, where)
    node, _ = front_matter.parse(doc, where)
    if card.dataset_id:
        (entry,) = model_index(report, card)
        result = entry["results"][0]
        front_matter.splice_result(doc, node, entry["name"], result, _is_ours(card.dataset_id), where)
        if not doc.opening:
            doc.opening, doc.closing = "---" + doc.newline, "---" + doc.newline
        _check_spliced(doc, result, where)
    doc.body = _merge_body(doc.body, to_markdown(report), doc.newline)
    return doc.text()


def _check_spliced(doc: front_matter.Card, result: dict[str, Any], where: Path | str) -> None:
    """The spliced front matter must parse and hold our result exactly once (else: refuse, never write)."""
    _, values = front_matter.parse(doc, where)
    found = [r for e in values.get("model-index") or [] if isinstance(e, dict)
             for r in e.get("results") or [] if r == result]  # fmt: skip
    if len(found) != 1:
        raise front_matter.unsafe("the merged front matter would not hold the new result exactly once")


def check_card(path: Path, dataset_id: str | None = None) -> None:
    """Fail before the pass when an existing card cannot be merged into (unreadable, bad front matter, a
    model-index that cannot be changed in place): the merge is tried on a placeholder result."""
    if not path.exists():
        return
    try:
        text = path.read_bytes().decode("utf-8")  # not read_text: its newline translation would hide CRLF
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionsError(f"--model-card {path}: cannot read the existing card ({exc}).") from None
    doc = front_matter.split(text, path)
    node, _ = front_matter.parse(doc, path)
    _merge_body(doc.body, "")
    if dataset_id:
        placeholder = {"task": {"type": "other", "name": TASK_NAME}, "dataset": {"type": dataset_id}, "metrics": []}
        front_matter.splice_result(doc, node, path.stem, placeholder, _is_ours(dataset_id), path)
