"""Hugging Face model cards: a ``model-index`` the Hub's own parser accepts, and a merge into an existing README.md.

The Hub's model-index (https://github.com/huggingface/hub-docs/blob/main/modelcard.md) requires, per result,
``task.type`` (a Hub task id), ``dataset.type`` (a Hub dataset id) and ``dataset.name``; ``source`` needs
both ``name`` and ``url``. nrc-audit knows no public URL of its own, so it writes no ``source``, and it
takes the dataset only from what the user states (``--dataset-id``, ``--dataset-name``): the local HDF5
file name and hash are no Hub dataset and revision (they stay in the markdown section and the JSON report).

Merging keeps every other front-matter key and every other eval result; the nrc-audit section of the body
lives between two HTML-comment markers and is replaced in place, so running the merge twice gives the
same file. PyYAML (a dependency) reads and writes the front matter; comments in it are not preserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrc_audit.errors import OptionsError
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


def _yaml() -> Any:
    import yaml  # a declared dependency; imported here so that --help stays fast

    return yaml


def _dump(value: Any) -> str:
    return str(_yaml().safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000))


def to_model_index(report: Report, card: HubCard) -> str:
    """The ``model-index`` YAML fragment, ready to paste into a card's front matter."""
    return _dump({"model-index": model_index(report, card)})


def split_card(text: str, where: Path | str = "the card") -> tuple[dict[str, Any], str]:
    """(front matter as a dict, body) of a model card; a card without front matter has an empty dict."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return {}, text
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            try:
                meta = _yaml().safe_load("".join(lines[1:i])) or {}
            except _yaml().YAMLError as exc:
                raise OptionsError(f"{where}: the YAML front matter does not parse ({exc}); fix it first.") from None
            if not isinstance(meta, dict):
                raise OptionsError(f"{where}: the front matter is a {type(meta).__name__}, expected a mapping.")
            return meta, "".join(lines[i + 1:])
    raise OptionsError(f"{where}: the front matter opened by '---' on line 1 is never closed; add a '---' line.")


def _merge_results(meta: dict[str, Any], new: list[dict[str, Any]]) -> None:
    """Put ``new``'s result into ``meta['model-index']``: other entries and results kept, an earlier
    nrc-audit result on the same dataset replaced."""
    entries = meta.get("model-index")
    if not isinstance(entries, list) or not entries:
        meta["model-index"] = new
        return
    entry = next((e for e in entries if isinstance(e, dict) and e.get("name") == new[0]["name"]), None)
    if entry is None:  # the card describes one model under another name: add our result to it
        entry = entries[0] if len(entries) == 1 and isinstance(entries[0], dict) else None
    if entry is None:
        entries.append(new[0])
        return
    ours = new[0]["results"][0]

    def same(result: Any) -> bool:
        return (isinstance(result, dict) and (result.get("task") or {}).get("name") == TASK_NAME
                and (result.get("dataset") or {}).get("type") == ours["dataset"]["type"])  # fmt: skip

    results = [r for r in entry.get("results") or [] if not same(r)]
    entry["results"] = results + [ours]


def _merge_body(body: str, section: str) -> str:
    block = f"{START}\n{section.rstrip()}\n{END}\n"
    start, end = body.find(START), body.find(END)
    if (start < 0) != (end < 0) or end < start:
        raise OptionsError(f"the card has one nrc-audit marker without the other ({START} … {END}); "
                           "remove the stray marker or add the missing one.")  # fmt: skip
    if start < 0:
        return body.rstrip() + ("\n\n" if body.strip() else "") + block
    tail = body[end + len(END):]
    return body[:start] + block + tail.lstrip("\n")


def merge_model_card(existing: str, report: Report, card: HubCard, where: Path | str = "the card") -> str:
    """The card ``existing`` ('' for a new card) with the audit merged in: the model-index result (only with
    ``card.dataset_id``; the front matter is otherwise left as it is) and the :func:`to_markdown` section."""
    meta, body = split_card(existing, where)
    if card.dataset_id:
        _merge_results(meta, model_index(report, card))
    text = _merge_body(body, to_markdown(report))
    return (f"---\n{_dump(meta)}---\n" if meta else "") + text


def check_card(path: Path) -> None:
    """Fail before the pass when an existing card cannot be merged into (unreadable, bad front matter)."""
    if not path.exists():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionsError(f"--model-card {path}: cannot read the existing card ({exc}).") from None
    split_card(text, path)
    _merge_body(split_card(text, path)[1], "")
