"""nrc-audit: audit trained regression networks for Deep Neural Regression Collapse.

Public names are imported lazily so that ``import nrc_audit`` stays cheap (no torch at import time).
"""

from __future__ import annotations

from typing import Any

from nrc_audit.version import __version__

__all__ = ["__version__", "save_checkpoint", "audit", "Report"]


def __getattr__(name: str) -> Any:
    if name == "save_checkpoint":
        from nrc_audit.io.checkpoint import save_checkpoint

        return save_checkpoint
    if name == "Report":
        from nrc_audit.outputs.report import Report

        return Report
    if name == "audit":
        from nrc_audit.engine.api import audit

        return audit
    raise AttributeError(f"module 'nrc_audit' has no attribute {name!r}")
