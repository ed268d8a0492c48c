"""Report-level warnings: audits that do not look like a regression audit (SPEC §5 ``warnings``).

Two halves: :class:`DataFacts`, a few cheap facts about the targets gathered while the pass streams (no
second read of the data), and :func:`report_warnings`, a pure function from those facts and the finished
statistics to messages that say what was found and the fix. Warnings inform; they never change the exit code.
"""

from __future__ import annotations

from nrc_audit.core.conditions import TargetSummary
from nrc_audit.core.facts import LABEL_DISTINCT_MAX, DataFacts

__all__ = ["LABEL_DISTINCT_MAX", "UNUSED_MASK_NOTE", "DataFacts", "report_warnings", "unused_mask_warning"]

UNUSED_MASK_NOTE = "padding mask not used"  # starts the assumption that :func:`unused_mask_warning` reads



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


def unused_mask_warning(assumptions: list[str]) -> str | None:
    """The report warning for a padding mask the data file holds but the model was not given; else None."""
    found = [a for a in assumptions if a.startswith(UNUSED_MASK_NOTE)]
    if not found:
        return None
    return (f"{found[0][len(UNUSED_MASK_NOTE) + 2:]}. If the model was trained with that mask, pass it with "
            "--input-key attention_mask=KEY (its forward must take it), or the features of padded rows are wrong.")
