"""The audit report users hold: the records and their JSON, plus the table (``to_table``) and markdown
(``to_markdown``) views."""

from __future__ import annotations

from typing import Any

from nrc_audit.outputs.records import SCHEMA_ID, METRIC_FIELDS, Gate, LayerReport, ReportData, Summary, load_schema
from nrc_audit.outputs.markdown import to_markdown
from nrc_audit.outputs.render import layer_table

__all__ = ["SCHEMA_ID", "METRIC_FIELDS", "Gate", "LayerReport", "Report", "Summary", "load_schema"]


class Report(ReportData):
    """The whole audit. ``to_dict()`` gives the JSON document, ``to_table()`` the Rich table,
    ``to_markdown()`` the model-card section."""

    def to_table(self) -> Any:
        """The per-layer Rich table with k, the onset and the gate in its caption, e.g.
        ``rich.print(report.to_table())`` in a notebook."""
        return layer_table(self, summary=True)

    def to_markdown(self) -> str:
        """The GitHub-flavoured markdown section ``--markdown`` writes (verdict, per-layer table, how to read it)."""
        return to_markdown(self)

    def __rich__(self) -> Any:
        return self.to_table()
