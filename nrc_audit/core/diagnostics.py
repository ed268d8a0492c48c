"""Report-level warnings: audits that do not look like a regression audit (SPEC §5 ``warnings``).

Two halves: :class:`DataFacts`, a few cheap facts about the targets gathered while the pass streams (no
second read of the data), and :func:`report_warnings`, a pure function from those facts and the finished
statistics to messages that say what was found and the fix. Warnings inform; they never change the exit code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nrc_audit.core.conditions import TargetSummary

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


def report_warnings(
    facts: DataFacts,
    target: TargetSummary,
    model_mse: float,
    k: int,
    rank_source: str,
    uint8_unscaled: bool = False,
) -> list[str]:
    """The report's top-level warnings, each naming what was found and the fix.

    Args:
        facts: the streamed target facts.
        target: the target block (t, eigenvalues of Σ_Y, rank estimate).
        model_mse: (1/(N t)) ‖f(X) − Y‖_F².
        k, rank_source: the verdicts' rank and where it came from (``choose_rank``).
        uint8_unscaled: X was stored as uint8 and fed to the model without ``--scale-uint8``.
    """
    out = []
    if uint8_unscaled:
        out.append("X is stored as uint8 (pixel values 0–255) and was fed to the model unscaled. If the model was "
                   "trained on images in [0, 1], pass --scale-uint8.")  # fmt: skip
    labels = facts.looks_like_labels()
    if labels is not None:
        out.append(f"the targets look like class labels ({labels}); nrc-audit audits regression networks "
                   "on continuous targets. Pass the regression targets (--y-key), not labels or a classifier.")  # fmt: skip
    variance = sum(target.eigenvalues) / target.dim if target.dim else 0.0  # mean per-column variance of Y
    if variance > 0 and model_mse >= variance:
        out.append(
            f"the model does not fit the data: model MSE {model_mse:.4g} ≥ the targets' mean variance "
            f"{variance:.4g} (R² = {1 - model_mse / variance:.3g} ≤ 0), so its layers say little about collapse. "
            "Check --x-key/--y-key, that X and Y are preprocessed (e.g. standardised) as in training, and that "
            "this is the trained checkpoint."
        )
    if rank_source != "auto" and k > target.rank_estimate:
        out.append(
            f"k = {k} exceeds the targets' intrinsic rank estimate {target.rank_estimate} (of t = {target.dim}): "
            f"the bottom {k - target.rank_estimate} direction(s) of each top-k subspace carry no target signal, "
            "so NRC1/NRC3 can fail on collapsed layers. Drop --rank (the default, --rank auto, uses "
            f"k = {target.rank_estimate})."
        )
    return out
