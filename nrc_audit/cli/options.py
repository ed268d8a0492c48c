"""The option groups: each shared option declared once, as a typed field of the group it belongs to.

A command takes a group by naming it as a parameter type (``analysis: AnalysisArgs``); :func:`takes`
flattens the group's fields into options for Typer and hands the command the filled, frozen group. A field
that a settings file may set carries its key (``setting(...)``); :func:`settings` resolves exactly those
keys, and refuses at import a key that the settings file does not know, so a renamed field cannot drop
out of the settings file unnoticed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Optional

from nrc_audit.cli.common import (
    ANALYSIS, CI, MODEL, OUTPUTS, ActivationOpt, BaselineOpt, BatchOpt, ChannelsLastOpt, ConfigOpt,
    DatasetIdOpt, DatasetNameOpt, DeviceOpt, EnergyOpt, ExitZeroOpt, FormatOpt, HubTaskOpt, JsonOpt, JunitOpt,
    LimitOpt, MarkdownOpt, ModelCardOpt, ModelIndexOpt, Nrc1Opt, Nrc2Opt, Nrc3Opt, Nrc4Opt, NoiseOpt, OutputFormat, PlotOpt,
    QuietFlag, QuietOpt, RankOpt, RequireOpt, RtolOpt, ScaleUint8Opt, ToleranceOpt, XKeyOpt, YKeyOpt, analysis_options,
    is_main, json_object, opt,
)  # fmt: skip
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions
from nrc_audit.errors import OptionsError
from nrc_audit.io.settings_file import DEFAULTS


class TokenPooling(str, enum.Enum):
    mean = "mean"
    cls = "cls"
    last = "last"


class Compression(str, enum.Enum):
    gzip = "gzip"
    lzf = "lzf"


def setting(key: str, default: Any = None) -> Any:
    """A group field backed by the settings key ``key`` (None on the command line: not given)."""
    if key not in DEFAULTS:
        raise TypeError(f"settings key {key!r} is not in io/settings_file.py's DEFAULTS")
    return field(default=default, metadata={"setting": key})


ModelDefOpt = Annotated[Optional[str], opt("--model-def", help="file.py:callable or package.module:callable returning the nn.Module. EXECUTES that code.", panel=MODEL, show="built-in MLP/ResNet from the state dict")]
ModelKwargsOpt = Annotated[Optional[str], opt("--model-kwargs", help="JSON object of keyword arguments for --model-def.", panel=MODEL, show=False)]
InputKeyOpt = Annotated[Optional[list[str]], opt("--input-key", help="Extra HDF5 array passed to the model by keyword: NAME (array NAME) or NAME=KEY (repeatable). 'attention_mask' also masks token pooling.", panel=MODEL, show=False)]
OutputKeyOpt = Annotated[Optional[str], opt("--output-key", help="Entry of a dict / ModelOutput model output to audit.", panel=MODEL, show="logits")]
PoolingOpt = Annotated[TokenPooling, opt("--token-pooling", help="Linear inputs (B, T, h) → (B, h): mean (unmasked tokens), cls (token 0) or last (last unmasked token).", panel=MODEL)]
LayersOpt = Annotated[Optional[list[str]], opt("--layers", help="Glob of layer names to audit (repeatable).", panel=ANALYSIS, show="every Linear/Conv2d layer")]
ExcludeOpt = Annotated[Optional[list[str]], opt("--exclude", help="Glob of layer names to skip (repeatable).", panel=ANALYSIS, key="exclude")]


@dataclass(frozen=True)
class DataArgs:
    """How the data file is read (commands that run the model over one)."""

    x_key: XKeyOpt = setting("x_key")
    y_key: YKeyOpt = setting("y_key")
    channels_last: ChannelsLastOpt = False
    scale_uint8: ScaleUint8Opt = False
    limit: LimitOpt = None
    input_key: InputKeyOpt = None


@dataclass(frozen=True)
class ModelArgs:
    """How the checkpoint becomes a module, and how its output and tokens are read."""

    model_def: ModelDefOpt = None
    model_kwargs: ModelKwargsOpt = None
    activation: ActivationOpt = setting("activation")
    output_key: OutputKeyOpt = None
    token_pooling: PoolingOpt = TokenPooling.mean


@dataclass(frozen=True)
class PassArgs:
    """Which layers the pass hooks and where it runs."""

    layers: LayersOpt = setting("layers")
    exclude: ExcludeOpt = setting("exclude")
    device: DeviceOpt = setting("device")


@dataclass(frozen=True)
class AnalysisArgs:
    """Statistics → metrics → verdicts: shared by every command that builds a report."""

    rank: RankOpt = setting("rank")
    pinv_rtol: RtolOpt = setting("pinv_rtol")
    rank_energy: EnergyOpt = setting("rank_energy")
    batch_size: BatchOpt = setting("batch_size")
    nrc1_max: Nrc1Opt = setting("nrc1_max")
    nrc2_min: Nrc2Opt = setting("nrc2_min")
    nrc3_min: Nrc3Opt = setting("nrc3_min")
    nrc4_ratio_max: Nrc4Opt = setting("nrc4_ratio_max")
    noise_alignment_max: NoiseOpt = setting("noise_alignment_max")
    require_collapsed: RequireOpt = setting("require_collapsed")


@dataclass(frozen=True)
class ReportArgs:
    """Where one report goes (commands that end in one report)."""

    json_path: JsonOpt = None
    fmt: FormatOpt = OutputFormat.table
    markdown: MarkdownOpt = None
    model_index: ModelIndexOpt = None
    model_card: ModelCardOpt = None
    dataset_id: DatasetIdOpt = None
    dataset_name: DatasetNameOpt = None
    hub_task: HubTaskOpt = None
    plot: PlotOpt = None
    junit_xml: JunitOpt = None
    baseline: BaselineOpt = None
    baseline_tolerance: ToleranceOpt = setting("baseline_tolerance")
    exit_zero: ExitZeroOpt = False

    def outputs(self, model: Path | None = None) -> Any:
        """These options → ``outputs.emit.Outputs``; the tolerance comes later, from the resolved settings."""
        from nrc_audit.outputs.emit import Outputs
        from nrc_audit.outputs.model_card import HubCard

        card = HubCard(self.dataset_id, self.dataset_name, self.hub_task, model.stem if model is not None else None)
        return Outputs(fmt=self.fmt.value, json_path=self.json_path, markdown_path=self.markdown,
                       model_index_path=self.model_index, plot_path=self.plot, baseline_path=self.baseline,
                       exit_zero=self.exit_zero,
                       is_main=is_main(), junit_path=self.junit_xml, model_card_path=self.model_card,
                       card=card)  # fmt: skip


@dataclass(frozen=True)
class RunArgs:
    """The settings file and how much goes to stderr."""

    config: ConfigOpt = None
    no_progress: QuietOpt = False
    quiet: QuietFlag = False

    @property
    def progress(self) -> bool:
        return not (self.no_progress or self.quiet)


StoreOpt = Annotated[Optional[Path], opt("--features", help="Feature store path.", panel=OUTPUTS, show="MODEL-STEM-HASH8.features.h5 in the current folder (beside a model folder, never in it)")]
CompressionOpt = Annotated[Optional[Compression], opt("--features-compression", help="gzip or lzf.", panel=OUTPUTS, show="none")]
TrendJsonOpt = Annotated[Optional[Path], opt("--json", help="Write all reports as one JSON document.", panel=OUTPUTS, show=False)]
TrendFormatOpt = Annotated[OutputFormat, opt("--format", help="What stdout carries: the trend tables, the JSON document of all reports, or GitHub workflow annotations of the last checkpoint.", panel=OUTPUTS)]
TrendJunitOpt = Annotated[Optional[Path], opt("--junit-xml", help="Write JUnit XML of the last checkpoint here: one testcase per layer, gate failures as failures.", panel=CI, show=False)]
GROUPS = (DataArgs, ModelArgs, PassArgs, AnalysisArgs, ReportArgs, RunArgs)


def settings(run: RunArgs, *groups: Any) -> dict[str, Any]:
    """Command line > settings file > built-in default for every settings key the ``groups`` carry (None on
    the command line: not given); keys no group carries keep their file or built-in value."""
    from nrc_audit.io.settings_file import load_settings, resolve

    given = {f.metadata["setting"]: getattr(g, f.name) for g in groups for f in fields(g) if "setting" in f.metadata}
    file_values, _ = load_settings(run.config)
    return resolve(given, file_values)


def audit_config(model: Path, data: Path, s: dict[str, Any], data_args: DataArgs, model_args: ModelArgs,
                 features: Path | None = None, compression: Compression | None = None) -> AuditConfig:
    """The one way from options to an :class:`AuditConfig` (``s``: the resolved settings), validated."""
    return AuditConfig(
        model_path=model, data_path=data,
        data=DataOptions(s["x_key"], s["y_key"], data_args.channels_last, data_args.scale_uint8, data_args.limit,
                         input_keys(data_args.input_key)),
        model=ModelOptions(model_args.model_def, json_object(model_args.model_kwargs), s["activation"],
                           model_args.output_key, model_args.token_pooling.value),
        analysis=analysis_options(s), layers=tuple(s["layers"]), exclude=tuple(s["exclude"]),
        device=s["device"], batch_size=int(s["batch_size"]), features_path=features,
        features_compression=compression.value if compression is not None else None,
    ).validate()  # fmt: skip


def input_keys(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--input-key`` values → (keyword, HDF5 key) pairs: 'attention_mask' or 'attention_mask=masks/train'."""
    pairs = []
    for value in values or []:
        name, _, key = value.partition("=")
        if not name or (_ and not key):
            raise OptionsError(f"--input-key {value!r} is not NAME or NAME=KEY (e.g. attention_mask=mask).")
        pairs.append((name, key or name))
    return tuple(pairs)
