"""Training histories: one audit per JSON line, written during training, read back by ``nrc-audit trend``.

Format ``nrc-audit-history/1`` (JSON Lines), one record per audit, in the order written::

    {"schema": "nrc-audit-history/1", "run_id": "20261202T174501-5f0c2a", "source": "lightning",
     "label": "epoch 3", "epoch": 3, "step": 120, "time": "2026-12-02T17:45:01Z", "report": {...}}

``report`` is the full ``nrc-audit-report/1`` document; ``epoch``/``step`` may be null. Every writer
(:class:`CollapseMonitor`, the Lightning and transformers callbacks) stamps its records with the run id of
the run that wrote them, and a new run never appends to a file that already holds records: it refuses
(``if_exists="refuse"``, the default), starts the file over (``"overwrite"``) or continues the run recorded
last (``"resume"``, for training resumed from a checkpoint). Records of the older ``{"label", "report"}``
form (no run id) still read.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrc_audit.errors import OptionsError
from nrc_audit.io.validate import check_report, parse_json, read_document
from nrc_audit.outputs.report import Report

SCHEMA = "nrc-audit-history/1"
IF_EXISTS = ("refuse", "overwrite", "resume")
HISTORY_DOCUMENT = ("a JSON-lines history written by CollapseMonitor or the Lightning / transformers callbacks "
                    "(a few KB per audit)")


@dataclass(frozen=True)
class HistoryRecord:
    label: str
    report: Report
    run_id: str | None = None
    epoch: float | None = None
    step: int | None = None


def new_run_id() -> str:
    """A run id that sorts by start time and does not collide between runs started in the same second."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class HistoryWriter:
    """Append one run's audits to a history file, never mixing them into another run's records.

    Args:
        path: the ``.jsonl`` file.
        source: who writes ("monitor", "lightning", "transformers"), stored in every record.
        if_exists: what to do when ``path`` already holds records: "refuse" (OptionsError now, before
            training starts), "overwrite" (start the file over at the first record) or "resume" (continue
            the run id recorded last).

    Example:
        >>> writer = HistoryWriter("nrc-history.jsonl", "monitor")   # doctest: +SKIP
        >>> writer.append(report, epoch=3, step=120)                  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, source: str, if_exists: str = "refuse") -> None:
        if if_exists not in IF_EXISTS:
            raise OptionsError(f"if_exists={if_exists!r}: expected one of {list(IF_EXISTS)}.")
        self.path, self.source, self.if_exists = Path(path), source, if_exists
        self.run_id = new_run_id()
        self._started = False
        held = _records_in(self.path)
        if held and if_exists == "refuse":
            raise OptionsError(
                f"{self.path} already holds {len(held)} audit record(s) of run {held[-1].run_id or '(no run id)'}; "
                "a new run does not append to another run's history. Choose another path, or pass "
                "if_exists='overwrite' to start it over or if_exists='resume' to continue that run."
            )
        if held and if_exists == "resume" and held[-1].run_id:
            self.run_id = held[-1].run_id

    def append(self, report: Report, *, epoch: float | None = None, step: int | None = None,
               label: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Write one record (flushed at once, so a crash keeps every audit made so far); returns it."""
        record = {"schema": SCHEMA, "run_id": self.run_id, "source": self.source,
                  "label": label or default_label(epoch, step), "epoch": _plain(epoch), "step": step,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "report": report.to_dict()}  # fmt: skip
        mode = "a" if self._started or self.if_exists == "resume" else "w"
        if mode == "w" and self.if_exists == "refuse" and _records_in(self.path):
            raise OptionsError(f"{self.path} was written by another run since this one started; choose another path.")
        with open(self.path, mode, encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        self._started = True
        return record


def default_label(epoch: float | None, step: int | None) -> str:
    if epoch is not None:
        return f"epoch {_plain(epoch)}"
    return f"step {step}" if step is not None else "audit"


def _plain(epoch: float | None) -> float | int | None:
    """Whole epochs as ints (``epoch 3``, not ``epoch 3.0``)."""
    return int(epoch) if isinstance(epoch, float) and epoch.is_integer() else epoch


def _records_in(path: Path) -> list[HistoryRecord]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    return read_records(path)


def read_records(path: str | Path) -> list[HistoryRecord]:
    """Every record of a history file, in file order (OptionsError naming the line of a bad one)."""
    path = Path(path)
    # size-capped like --baseline and validate: /dev/zero or a huge sparse file is refused, not read into memory
    lines = read_document(path, f"the history file {path}", expected=HISTORY_DOCUMENT).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            records.append(_record(parse_json(line, f"{path}:{number}"), f"{path}:{number}"))
    return records


def _record(doc: Any, where: str) -> HistoryRecord:
    if not isinstance(doc, dict) or not isinstance(doc.get("label"), (str, int, float)):
        raise OptionsError(f"{where}: expected a history record {{\"label\": str, \"report\": {{...}}}}; "
                           f"found {type(doc).__name__} without a string 'label'.")  # fmt: skip
    if "schema" in doc and doc["schema"] != SCHEMA:
        raise OptionsError(f"{where}: schema {doc['schema']!r} is not {SCHEMA!r}; this history was written by "
                           "another tool or a newer nrc-audit.")  # fmt: skip
    epoch, step, run = doc.get("epoch"), doc.get("step"), doc.get("run_id")
    if not (epoch is None or (isinstance(epoch, (int, float)) and not isinstance(epoch, bool))) \
            or not (step is None or (isinstance(step, int) and not isinstance(step, bool))) \
            or not (run is None or isinstance(run, str)):  # fmt: skip
        raise OptionsError(f"{where}: 'epoch' must be a number, 'step' an integer and 'run_id' a string (or null); "
                           f"found epoch={epoch!r}, step={step!r}, run_id={run!r}.")  # fmt: skip
    check_report(doc.get("report"), f"{where}: report")
    try:
        report = Report.from_dict(doc["report"])
    except (KeyError, TypeError) as exc:
        raise OptionsError(f"{where} is not a history record ({exc}).") from None
    return HistoryRecord(str(doc["label"]), report, run, epoch, step)


def load_run(path: str | Path, run_id: str | None = None) -> tuple[list[HistoryRecord], str]:
    """The records of one run, in training order, and how they were ordered ("step", "epoch", "as recorded").

    A file holding several runs needs ``run_id`` (OptionsError listing the runs otherwise).
    """
    every = read_records(path)
    runs = list(dict.fromkeys(r.run_id for r in every))
    records = every if run_id is None else [r for r in every if r.run_id == run_id]
    if run_id is not None and not records:
        raise OptionsError(f"{path} holds no records of run {run_id!r}; its runs: {_listing(every)}.")
    if run_id is None and len(runs) > 1:
        raise OptionsError(f"{path} holds {len(runs)} runs ({_listing(every)}); pass --run RUN_ID to choose one.")
    if not records:
        raise OptionsError(f"{path} holds no history records.")
    for key in ("step", "epoch"):
        if all(getattr(r, key) is not None for r in records):
            return sorted(records, key=lambda r: getattr(r, key)), key  # stable: ties keep the file order
    return records, "as recorded"


def _listing(records: list[HistoryRecord]) -> str:
    counts: dict[str | None, int] = {}
    for r in records:
        counts[r.run_id] = counts.get(r.run_id, 0) + 1
    return ", ".join(f"{run or '(no run id)'}: {n} record(s)" for run, n in counts.items())
