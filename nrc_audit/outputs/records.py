"""The records of an audit report, their JSON form (schema ``nrc-audit-report/1``) and the verdict → exit code map.

Field names follow SPEC §5 exactly; they are a public contract: extend, never rename.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any, TypeVar

from nrc_audit.core.conditions import LayerMetrics, TargetSummary
from nrc_audit.errors import ExitCode

SCHEMA_ID = "nrc-audit-report/1"
_R = TypeVar("_R", bound="ReportData")
METRIC_FIELDS = (
    "nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio", "cka_signal", "noise_alignment",
    "stable_rank", "stable_rank_cov", "stable_rank_w",
)  # fmt: skip


@dataclass
class LayerReport:
    """One row of the report: a Linear or Conv2d layer, its input features H and its weight W."""

    index: int
    name: str
    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    in_dim: int
    out_dim: int
    pooled: bool
    nrc1: float | None = None
    nrc2: float | None = None
    nrc3: float | None = None
    nrc4: float | None = None
    nrc4_ratio: float | None = None
    cka_signal: float | None = None
    noise_alignment: float | None = None
    stable_rank: float | None = None
    stable_rank_cov: float | None = None
    stable_rank_w: float | None = None
    bound: dict[str, Any] = field(default_factory=lambda: {"lhs": None, "rhs": None, "holds": None})
    passed: dict[str, bool] = field(default_factory=dict)
    collapsed: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_metrics(
        cls, index: int, name: str, kind: str, in_dim: int, out_dim: int, pooled: bool, m: LayerMetrics
    ) -> "LayerReport":
        values = {f: getattr(m, f) for f in METRIC_FIELDS}
        bound = {"lhs": m.bound_lhs, "rhs": m.bound_rhs, "holds": m.bound_holds}
        return cls(index, name, kind, in_dim, out_dim, pooled, **values, bound=bound,
                   passed=dict(m.passed), collapsed=m.collapsed, warnings=list(m.warnings))  # fmt: skip


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
    """The whole audit. ``to_dict()`` gives the JSON document; ``exit_code`` the CLI's verdict."""

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
                   doc["model_mse"], layers, summary, doc.get("schema", SCHEMA_ID))  # fmt: skip

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.summary.gate.passed else ExitCode.GATE_FAILED


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
