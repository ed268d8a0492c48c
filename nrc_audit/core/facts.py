"""Cheap streaming facts about the targets, for the report-level warnings (see core/diagnostics.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LABEL_DISTINCT_MAX = 20  # integer-valued targets with at most this many distinct values look like class labels


@dataclass
class DataFacts:
    """Streaming facts about Y, folded batch by batch (``observe_targets``) in any order.

    Once a batch shows a non-integer value the checks stop, so a real regression target costs one
    comparison on its first batch and nothing after.
    """

    rows: int = 0
    integer_valued: bool = True
    one_hot: bool = True  # every row has exactly one 1 and zeros elsewhere (only tracked while integer-valued)
    distinct: set[float] = field(default_factory=set)  # capped at LABEL_DISTINCT_MAX + 1 values

    def observe_targets(self, y: torch.Tensor) -> None:
        """Fold one batch of targets y (B, t), on any device."""
        self.rows += int(y.shape[0])
        if not self.integer_valued or y.numel() == 0:
            return
        if not bool((y == torch.round(y)).all()):  # one host sync, on the batches that keep it integer only
            self.integer_valued, self.one_hot, self.distinct = False, False, set()
            return
        if self.one_hot:
            self.one_hot = y.shape[1] >= 2 and bool((((y == 0) | (y == 1)).all() and (y.sum(dim=1) == 1).all()))
        if len(self.distinct) <= LABEL_DISTINCT_MAX:
            values = torch.unique(y)
            if len(values) <= LABEL_DISTINCT_MAX + 1:
                self.distinct.update(float(v) for v in values.cpu())
            else:
                self.distinct.update(float(v) for v in values[: LABEL_DISTINCT_MAX + 1].cpu())

    def looks_like_labels(self) -> str | None:
        """Why Y looks like class labels (a phrase), or None."""
        if self.rows == 0 or not self.integer_valued:
            return None
        if self.one_hot:
            return "every row of Y is one-hot"
        d = len(self.distinct)
        if d <= LABEL_DISTINCT_MAX and self.rows > 2 * d:
            shown = ", ".join(f"{v:g}" for v in sorted(self.distinct)[:8]) + (", …" if d > 8 else "")
            return f"Y holds only integers, {d} distinct value(s) ({shown})"
        return None
