"""The verdict policy, in one place: the choice of k, per-condition pass/fail, collapse onset, the CI gate and
the exit code. Pure functions on numbers and lists; nothing here reads a file or a tensor.

Why k defaults to the target's intrinsic rank (``rank="auto"``): Deep NRC says collapsed layers collapse to
the rank r of the targets, not to their nominal dimension t (Rangamani & Unal §4.3, PAPER_NOTES §3). The
paper recomputes NRC1 and NRC3 with r in place of t for its low-rank targets (SGEMM, synthetic). At k = t > r
the bottom t − r directions of a collapsed layer carry no signal: U_k picks up noise and W's top-k input
subspace picks up directions weight decay has not yet removed, so NRC3 fails on layers that are collapsed at
k = r (docs/validation.md, "Choice of k"). When the targets are full rank, r = t and nothing changes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Mapping

from nrc_audit.config import NEAR_MARGIN, NO_WEIGHT_DECAY_REGION, NOISE_ONLY_FAILURE_MAX, Thresholds
from nrc_audit.errors import ExitCode

RANK_T = "t"  # --rank t: the paper's k = t view
RANK_AUTO = "auto"  # --rank auto (the default): k = target.rank_estimate


@dataclass(frozen=True)
class Condition:
    """One condition of Deep NRC as every consumer reads it: verdicts, renderers, the CLI and the baseline."""

    name: str  # key in a layer's ``passed`` block; upper-cased in CI titles (NRC1)
    field: str  # the layer's JSON metric field that is compared
    op: str  # "≤" or "≥": the condition holds when ``field op threshold``
    threshold: str  # the Thresholds field, settings key and ``settings.thresholds`` key
    option: str  # the command-line option that sets the threshold
    label: str  # the metric's name in messages and cards
    column: str  # the metric's short name in table headers
    help: str  # the option's help
    relative: bool = False  # a ratio, not bounded by 1: --baseline-tolerance and the near margin are relative
    baseline: bool = True  # --baseline compares this metric (and the delta table shows it)
    paper: bool = True  # one of the paper's NRC1–NRC4 (SPEC §4): a panel of the 2×2 figures
    meaning: str = ""  # what the metric measures, in a figure panel's title
    axis: str = ""  # the figure panel's y label
    scale: str = ""  # the metric is a multiple of this ("model MSE"): figures draw it on a log axis, 1× marked

    @property
    def default(self) -> float:
        return float(getattr(Thresholds, self.threshold))

    @property
    def larger_is_worse(self) -> bool:
        return self.op == "≤"

    def rule(self, threshold: float) -> str:
        """The condition as captions state it, e.g. 'NRC1 noise ≤ 0.25'."""
        return f"{self.label} {self.op} {threshold}"

    def holds(self, value: float | None, thresholds: Thresholds) -> bool:
        """A null (undefined) metric fails its condition."""
        compare = operator.le if self.op == "≤" else operator.ge
        return value is not None and bool(compare(value, getattr(thresholds, self.threshold)))


# The conditions (SPEC §4 and the noise condition). Another is one more row here, a Thresholds field and its metric.
TABLE: tuple[Condition, ...] = (
    Condition("nrc1", "nrc1", "≤", "nrc1_max", "--nrc1-max", "NRC1 noise", "NRC1", "NRC1 passes when noise ≤ this.",
              meaning="noise outside the top-k", axis="noise fraction"),
    Condition("nrc2", "nrc2", "≥", "nrc2_min", "--nrc2-min", "NRC2 CKA", "NRC2", "NRC2 passes when CKA(H, Y) ≥ this.",
              meaning="feature–target CKA", axis="CKA(H, Y)"),
    Condition("nrc3", "nrc3", "≥", "nrc3_min", "--nrc3-min", "NRC3 alignment", "NRC3",
              "NRC3 passes when the mean principal cosine ≥ this.", meaning="feature–weight alignment",
              axis="mean principal cosine"),
    Condition("nrc4", "nrc4_ratio", "≤", "nrc4_ratio_max", "--nrc4-ratio-max", "NRC4 probe MSE / model MSE", "NRC4 ratio",
              "NRC4 passes when probe MSE / model MSE ≤ this.", relative=True, meaning="best linear probe",
              axis="probe MSE / model MSE", scale="model MSE"),
    Condition("noise_alignment", "noise_alignment", "≤", "noise_alignment_max", "--noise-alignment-max",
              "noise alignment", "noise align.", "The noise condition passes when the mean singular value of U_⊥ᵀV_k "
              "(W reading the feature noise subspace) ≤ this; 1 disables it.", baseline=False, paper=False,
              meaning="W reading the feature noise", axis="mean singular value of U_⊥ᵀV_k"),
)  # fmt: skip
CONDITIONS = tuple(c.name for c in TABLE)
PAPER = tuple(c for c in TABLE if c.paper)  # the paper's NRC1–NRC4, without the noise condition
BY_NAME = {c.name: c for c in TABLE}
# passed key → (value field, threshold field, "max" | "min"): how each condition compares its value
RULES = {c.name: (c.field, c.threshold, "max" if c.op == "≤" else "min") for c in TABLE}


def choose_rank(rank: int | str | None, target_dim: int, rank_estimate: int) -> tuple[int, str]:
    """The subspace rank k of the verdicts and where it came from (``settings.rank``, ``settings.rank_source``).

    Args:
        rank: None or "auto" → the target's energy rank estimate r (≤ t); "t" → t; an int → that int.
        target_dim: t, the number of target columns.
        rank_estimate: ``target.rank_estimate`` (1 ≤ r ≤ t for non-constant targets).
    Returns:
        (k, source) with source "auto" | "target_dim" | "user".
    """
    if rank is None or rank == RANK_AUTO:
        return max(1, min(rank_estimate, target_dim)), "auto"
    if rank == RANK_T:
        return target_dim, "target_dim"
    return int(rank), "user"


def condition_passed(values: Mapping[str, float | None], th: Thresholds) -> dict[str, bool]:
    """Per-condition verdicts of one layer (:data:`TABLE`); a null (undefined) metric fails its condition.

    One exception: a null ``noise_alignment`` next to a defined ``nrc3`` means the features have rank below k
    (λ_k ≈ 0, see core/conditions.py): there is no noise subspace for W to read, so that condition holds.

    Args:
        values: at least ``nrc1``, ``nrc2``, ``nrc3``, ``nrc4_ratio``, ``noise_alignment`` (floats or None).
        th: the thresholds (NRC1 ≤ nrc1_max, NRC2 ≥ nrc2_min, NRC3 ≥ nrc3_min, NRC4 ratio ≤ nrc4_ratio_max,
            noise alignment ≤ noise_alignment_max).
    """

    def ok(key: str) -> bool:
        field, limit, kind = RULES[key]
        v, bound = values.get(field), getattr(th, limit)
        if v is None:
            return key == "noise_alignment" and values.get("nrc3") is not None
        return bool(v <= bound) if kind == "max" else bool(v >= bound)

    return {key: ok(key) for key in CONDITIONS}


def near_threshold(values: Mapping[str, float | None], th: Thresholds, margin: float = NEAR_MARGIN) -> list[str]:
    """The conditions whose value lies within ``margin`` of its threshold, on either side, and decides the verdict.

    Absolute for the fractions and cosines; relative (a factor 1 ± margin) for the NRC4 ratio, which is not
    bounded by 1. Only a condition whose flip would flip the layer's verdict counts: any near condition of a
    collapsed layer, the one failing condition of a layer that fails only one. A verdict decided this close
    could flip with another seed or a few more epochs.
    """
    passed = condition_passed(values, th)
    failing = [c for c in CONDITIONS if not passed[c]]
    out = []
    for key in CONDITIONS:
        field, limit, _ = RULES[key]
        v, bound = values.get(field), getattr(th, limit)
        if v is None or (failing and failing != [key]):
            continue
        if abs(v - bound) <= (margin * bound if BY_NAME[key].relative else margin):
            out.append(key)
    return out


def in_no_weight_decay_region(values: Mapping[str, float | None], collapsed: bool) -> bool:
    """A collapsed layer whose NRC1 and noise alignment both exceed :data:`NO_WEIGHT_DECAY_REGION`: where the
    calibration study's networks trained without weight decay were called collapsed too."""
    return collapsed and all((v := values.get(field)) is not None and v > bound
                             for field, bound in NO_WEIGHT_DECAY_REGION.items())  # fmt: skip


def fails_only_the_noise_condition(values: Mapping[str, float | None], passed: Mapping[str, bool]) -> bool:
    """NRC1–NRC4 pass and the noise condition fails with a noise alignment ≤ :data:`NOISE_ONLY_FAILURE_MAX`: where
    the calibration study's weight-decay MLPs on rank-1 targets ended (no network without weight decay did)."""
    value = values.get("noise_alignment")
    return (value is not None and passed.get("noise_alignment") is False and value <= NOISE_ONLY_FAILURE_MAX
            and all(passed.get(c.name, False) for c in PAPER))  # fmt: skip


def verdict_warnings(values: Mapping[str, float | None], th: Thresholds) -> list[str]:
    """The layer warnings that qualify its verdict: values near their thresholds (:func:`near_threshold`), a
    collapse inside the no-weight-decay region (:func:`in_no_weight_decay_region`) and a failure of the noise
    condition alone (:func:`fails_only_the_noise_condition`)."""
    passed = condition_passed(values, th)
    out = []
    for key in near_threshold(values, th):
        field, limit, _ = RULES[key]
        out.append(f"near threshold: {field} {values[field]:.4g} is close to {limit} {getattr(th, limit):g} "
                   f"({'passes' if passed[key] else 'fails'}); this verdict could flip with another seed or more training")  # fmt: skip
    if in_no_weight_decay_region(values, is_collapsed(passed)):
        found = " and ".join(f"{f} {values[f]:.3g} > {b:g}" for f, b in NO_WEIGHT_DECAY_REGION.items())
        out.append(f"collapsed, but {found}: networks trained without weight decay reached this region and were "
                   "called collapsed too in the calibration study (docs/validation.md, \"Calibration\"); this verdict "
                   "alone does not show that weight decay collapsed this layer")  # fmt: skip
    if fails_only_the_noise_condition(values, passed):
        out.append(f"not collapsed by the noise condition alone: NRC1–NRC4 pass, noise alignment "
                   f"{values['noise_alignment']:.3g} > {th.noise_alignment_max:g}; networks trained with weight decay "
                   "on rank-1 targets ended here in the calibration study (docs/validation.md, \"Calibration\"), so "
                   "the paper's four conditions call this layer collapsed (--noise-alignment-max 1 judges by them)")  # fmt: skip
    return out


def is_collapsed(passed: Mapping[str, bool]) -> bool:
    """A layer is collapsed when all five conditions hold (a report without the fifth, from an earlier
    version, is judged on the four it has)."""
    return all(passed.get(c, c == "noise_alignment") for c in CONDITIONS)


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


def exit_code(gate_passed: bool, regressions: int = 0, exit_zero: bool = False) -> ExitCode:
    """0 when the gate passed and no baseline regression was found, else 1 (0 anyway with ``--exit-zero``).

    Report-level warnings never enter here: they inform, they do not fail a run.
    """
    failed = not gate_passed or regressions > 0
    return ExitCode.GATE_FAILED if failed and not exit_zero else ExitCode.OK
