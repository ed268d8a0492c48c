"""The records of an audit report and their JSON form (schema ``nrc-audit-report/1``).

Field names follow SPEC §5 exactly; they are a public contract: extend, never rename.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any, TypeVar

from nrc_audit.core.conditions import METRIC_FIELDS, LayerMetrics, TargetSummary

__all__ = ["SCHEMA_ID", "METRIC_FIELDS", "Gate", "LayerReport", "ReportData", "Summary", "load_schema"]

SCHEMA_ID = "nrc-audit-report/1"
_R = TypeVar("_R", bound="ReportData")
# One record type per layer: the pure metrics' record is the report's row (same fields, same JSON order).
LayerReport = LayerMetrics


@dataclass
class Gate:
    require_collapsed: int
    passed: bool
    failing_layers: list[int]


@dataclass
class Summary:
    num_layers: int
    collapsed_layers: list[int]
    not_collapsed_layers: list[int]
    collapse_onset: int | None
    gate: Gate


@dataclass
class ReportData:
    """The whole audit. ``to_dict()`` gives the JSON document."""

    tool: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    target: TargetSummary
    model_mse: float | None
    layers: list[LayerReport]
    summary: Summary
    schema: str = SCHEMA_ID
    extensions: dict[str, Any] = field(default_factory=dict)  # optional blocks (e.g. "baseline"), never renames
    warnings: list[str] = field(default_factory=list)  # report-level: the audit does not look well posed

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": self.schema,
            "tool": self.tool,
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "target": asdict(self.target),
            "model_mse": self.model_mse,
            "layers": [asdict(layer) for layer in self.layers],
            "summary": asdict(self.summary),
            "warnings": list(self.warnings),
            **self.extensions,
        }
        return _finite_or_null(doc)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls: type[_R], doc: dict[str, Any]) -> _R:
        """Rebuild a report from its JSON document (e.g. a baseline file)."""
        layer_names = {f.name for f in fields(LayerReport)}
        layers = [LayerReport(**{k: v for k, v in d.items() if k in layer_names}) for d in doc["layers"]]
        s = doc["summary"]
        summary = Summary(s["num_layers"], s["collapsed_layers"], s["not_collapsed_layers"],
                          s["collapse_onset"], Gate(**s["gate"]))  # fmt: skip
        return cls(doc["tool"], doc["model"], doc["data"], doc["settings"], TargetSummary(**doc["target"]),
                   doc["model_mse"], layers, summary, doc.get("schema", SCHEMA_ID),
                   warnings=list(doc.get("warnings", [])))  # fmt: skip


def _finite_or_null(obj: Any) -> Any:
    """Replace NaN/Inf floats by None: JSON has no NaN, and a non-finite metric is undefined."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def load_schema() -> dict[str, Any]:
    """The JSON Schema of ``nrc-audit-report/1`` shipped inside the package."""
    text = resources.files("nrc_audit").joinpath("schema/nrc-audit-report-1.json").read_text("utf-8")
    return json.loads(text)


SHOWN_MAX = 200  # characters of a name shown in a table or card; the JSON report keeps the whole name


def shown(text: object, limit: int = SHOWN_MAX) -> str:
    """A user-supplied name (layer, file, architecture) made safe to print: control characters (terminal
    escape codes, newlines) written as ``\\x1b``-style escapes, and a longer name cut to ``limit`` characters
    with its length noted. The JSON report keeps the exact name."""
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")  # undecodable file-name bytes (surrogates)
    return s if len(s) <= limit else f"{s[:limit]}… ({len(s)} characters)"


def md_code(text: object, limit: int = SHOWN_MAX) -> str:
    """``text`` as an inline markdown code span that cannot end early: printable only, backticks turned into
    quotes (table rows escape their pipes themselves); HTML inside a code span is shown, never rendered."""
    return "`" + shown(text, limit).replace("`", "'") + "`"
