"""Resolved settings of one audit: a frozen dataclass, validated once, no I/O."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from nrc_audit.errors import OptionsError


# A passing or failing value this close to its threshold is reported as near it (a layer warning, a table mark):
# absolute for NRC1–3 and the noise alignment, relative for the NRC4 ratio (docs/validation.md, "Calibration").
NEAR_MARGIN = 0.05

# Where a collapsed layer's verdict does not tell weight decay's collapse from a head that aligned anyway: the
# calibration study's networks trained *without* weight decay that pass all five conditions (small ResNets'
# Linear heads, 10 of 12) all have NRC1 > 0.14 and noise alignment > 0.31; every λ ≥ 1e-2 network's last layer
# has NRC1 ≤ 0.094 (docs/validation.md, "Calibration"). A collapsed layer with both values above these bounds
# gets a layer warning; the verdict itself stays the thresholds' (SPEC §4).
NO_WEIGHT_DECAY_REGION = {"nrc1": 0.12, "noise_alignment": 0.30}  # metric field → lower bound of the region

# The other side: weight-decay MLPs on rank-1 targets (λ = 1e-2, 3e-2) pass NRC1–NRC4 and fail only the noise
# condition, with noise alignment 0.47–0.56; no network trained without weight decay fails that way above 0.457
# (docs/validation.md, "Calibration"). A layer failing the noise condition alone with a value up to this bound gets a
# layer warning saying the paper's four conditions call it collapsed; the verdict stays the thresholds'.
NOISE_ONLY_FAILURE_MAX = 0.60


@dataclass(frozen=True)
class Thresholds:
    """Per-condition thresholds (SPEC §4, extended). A layer is collapsed when all five conditions hold.

    The fifth, noise alignment (the mean singular value of U_⊥ᵀV_k: W's top-k input subspace against the
    feature noise subspace), is the paper's own figure for collapsed layers (≲ 0.2, §4.3). Without weight
    decay the weights keep reading directions outside the signal subspace; NRC3 alone, a mean of cosines, is
    too lenient for that at k < t (docs/validation.md, "Calibration").
    """

    nrc1_max: float = 0.25  # noise fraction Σ_{j>k}λ_j/Σλ_j ≤ nrc1_max
    nrc2_min: float = 0.6  # linear CKA(H, Y) ≥ nrc2_min
    nrc3_min: float = 0.7  # mean cosine of principal angles ≥ nrc3_min
    nrc4_ratio_max: float = 2.0  # layer probe MSE / model MSE ≤ nrc4_ratio_max
    noise_alignment_max: float = 0.45  # mean singular value of U_⊥ᵀV_k ≤ noise_alignment_max

    def validate(self) -> "Thresholds":
        for name in ("nrc1_max", "nrc2_min", "nrc3_min", "noise_alignment_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OptionsError(
                    f"Threshold {name}={value} is outside [0, 1]; it compares a fraction or a cosine. "
                    f"Pass a value between 0 and 1 (default {getattr(Thresholds, name)})."
                )
        if not (self.nrc4_ratio_max > 0 and math.isfinite(self.nrc4_ratio_max)):
            raise OptionsError(
                f"Threshold nrc4_ratio_max={self.nrc4_ratio_max} must be a finite positive number (default "
                f"{Thresholds.nrc4_ratio_max}); inf would disable NRC4 and no JSON report can hold it. Pass a large "
                "value such as 1e9 to pass NRC4 always."
            )
        return self

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> "Thresholds":
        """A report's ``settings.thresholds``; a key it lacks (a report of an earlier version) keeps its default."""
        return cls(**{f.name: float(values[f.name]) for f in dataclasses.fields(cls) if f.name in values})


@dataclass(frozen=True)
class DataOptions:
    """How to read the HDF5 dataset (SPEC §1)."""

    x_key: str = "X"
    y_key: str = "Y"
    channels_last: bool = False
    scale_uint8: bool = False
    limit: int | None = None
    input_keys: tuple[tuple[str, str], ...] = ()  # (keyword of the model's forward, HDF5 key): extra inputs


@dataclass(frozen=True)
class ModelOptions:
    """How to turn the checkpoint into an ``nn.Module`` (SPEC §1)."""

    model_def: str | None = None
    model_kwargs: dict | None = None
    activation: str | None = None  # None: from metadata, else 'relu' recorded as an assumption
    output_key: str | None = None  # entry of a dict / ModelOutput output (None: 'logits')
    token_pooling: str = "mean"  # Linear inputs (B, T, h) → (B, h): mean | cls | last


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything that turns statistics into metrics and verdicts; shared by live runs and re-analysis."""

    rank: int | str | None = None  # None or "auto" → target.rank_estimate (≤ t), "t" → t, int → user
    pinv_rtol: float = 1e-3
    rank_energy: float = 0.99
    require_collapsed: int = 1
    thresholds: Thresholds = field(default_factory=Thresholds)

    def validate(self) -> "AnalysisOptions":
        self.thresholds.validate()
        if isinstance(self.rank, int) and self.rank < 1:
            raise OptionsError(f"--rank {self.rank} is not a positive integer; pass an integer ≥ 1, 'auto' or 't'.")
        if isinstance(self.rank, str) and self.rank not in ("auto", "t"):
            raise OptionsError(f"--rank {self.rank!r} is not understood; pass an integer ≥ 1, 'auto' or 't'.")
        if not 0.0 < self.pinv_rtol < 1.0:
            raise OptionsError(f"--pinv-rtol {self.pinv_rtol} must lie in (0, 1) (default {AnalysisOptions.pinv_rtol:g}).")
        if not 0.0 < self.rank_energy <= 1.0:
            raise OptionsError(f"--rank-energy {self.rank_energy} must lie in (0, 1] (default {AnalysisOptions.rank_energy}).")
        if self.require_collapsed < 0:
            raise OptionsError(
                f"--require-collapsed {self.require_collapsed} is negative; pass 0 to disable the gate."
            )
        return self


@dataclass(frozen=True)
class BaselineOptions:
    """How a report is compared with an earlier one (``--baseline``)."""

    baseline_tolerance: float = 0.05  # allowed worsening: NRC1–3 absolute, the NRC4 ratio relative


@dataclass(frozen=True)
class AuditConfig:
    """A whole audit run: inputs, outputs and options."""

    model_path: Path
    data_path: Path
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    layers: tuple[str, ...] = ()  # glob patterns to include (empty: all)
    exclude: tuple[str, ...] = ("*downsample*",)
    device: str = "auto"
    batch_size: int = 1024
    features_path: Path | None = None  # None: no feature store
    features_compression: str | None = None
    progress: bool = True

    def validate(self) -> "AuditConfig":
        self.analysis.validate()
        if self.batch_size < 1:
            raise OptionsError(f"--batch-size {self.batch_size} must be ≥ 1.")
        if self.data.limit is not None and self.data.limit < 1:
            raise OptionsError(f"--limit {self.data.limit} must be ≥ 1.")
        if self.model.token_pooling not in ("mean", "cls", "last"):
            raise OptionsError(f"--token-pooling {self.model.token_pooling!r} is unknown; use mean, cls or last.")
        if self.features_compression not in (None, "gzip", "lzf"):
            raise OptionsError(
                f"--features-compression {self.features_compression!r} is unknown; use gzip or lzf."
            )
        return self
