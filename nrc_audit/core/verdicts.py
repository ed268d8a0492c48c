"""Verdict policy over the per-layer verdicts: the collapse onset and the CI gate (pure functions)."""

from __future__ import annotations


def collapse_onset(collapsed: list[bool]) -> int | None:
    """First index of the longest run of collapsed layers that ends at the last layer (None if it is not)."""
    if not collapsed or not collapsed[-1]:
        return None
    i = len(collapsed) - 1
    while i > 0 and collapsed[i - 1]:
        i -= 1
    return i


def gate(collapsed: list[bool], require_collapsed: int) -> tuple[bool, list[int]]:
    """The CI gate: the last ``require_collapsed`` layers must all be collapsed. Returns (passed, failing)."""
    start = max(0, len(collapsed) - require_collapsed) if require_collapsed > 0 else len(collapsed)
    failing = [i for i in range(start, len(collapsed)) if not collapsed[i]]
    return not failing, failing
