"""Settings from a ``[tool.nrc-audit]`` table (nearest ``pyproject.toml``, or ``--config FILE``).

Precedence: command-line option > settings file > built-in default. The resolved values are what the
report's ``settings`` block records.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from nrc_audit.config import AnalysisOptions, AuditConfig, BaselineOptions, DataOptions, ModelOptions
from nrc_audit.errors import OptionsError
from nrc_audit.io.validate import check_tolerance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the backport, a dependency there (pyproject.toml)
    import tomli as tomllib

def _defaults() -> dict[str, Any]:
    """Every settings key with its built-in default, read from the config dataclasses (their one home); the
    command-line help, the API signature and docs/settings.md show these values (tests/test_settings_truth.py)."""
    analysis, data, model = AnalysisOptions(), DataOptions(), ModelOptions()
    run = AuditConfig(Path("model"), Path("data"))
    return {
        "rank": analysis.rank,
        **analysis.thresholds.to_dict(),  # nrc1_max, nrc2_min, nrc3_min, nrc4_ratio_max, noise_alignment_max
        "pinv_rtol": analysis.pinv_rtol,
        "rank_energy": analysis.rank_energy,
        "require_collapsed": analysis.require_collapsed,
        "x_key": data.x_key,
        "y_key": data.y_key,
        "batch_size": run.batch_size,
        "device": run.device,
        "layers": list(run.layers),
        "exclude": list(run.exclude),
        "activation": model.activation,
        "baseline_tolerance": BaselineOptions().baseline_tolerance,
    }


DEFAULTS: dict[str, Any] = _defaults()
TYPES: dict[str, tuple[type, ...]] = {
    "rank": (int, str), "nrc1_max": (int, float), "nrc2_min": (int, float), "nrc3_min": (int, float),
    "nrc4_ratio_max": (int, float), "noise_alignment_max": (int, float), "pinv_rtol": (int, float), "rank_energy": (int, float),
    "require_collapsed": (int,), "x_key": (str,), "y_key": (str,), "batch_size": (int,), "device": (str,),
    "layers": (list,), "exclude": (list,), "activation": (str,), "baseline_tolerance": (int, float),
}  # fmt: skip


def find_pyproject(start: Path) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` that has a ``[tool.nrc-audit]`` table."""
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and _table(_read(candidate), candidate) is not None:
            return candidate
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionsError(f"cannot read the settings file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionsError(f"{path} is not valid TOML ({exc}).") from None


def _table(doc: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The [tool.nrc-audit] table; a dedicated settings file (not pyproject.toml) may hold its keys at top level."""
    tool = doc.get("tool")
    table = tool.get("nrc-audit") if isinstance(tool, dict) else None
    if table is None and path.name != "pyproject.toml":
        table = doc
    return table


def load_settings(config: Path | None, cwd: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """Settings from ``config`` (or the nearest pyproject.toml), validated; returns (values, source path)."""
    if config is not None:
        if not config.is_file():
            raise OptionsError(f"--config {config}: file not found.")
        path: Path | None = config
        table = _table(_read(config), config)
        if table is None:
            raise OptionsError(f"--config {config}: the file has no [tool.nrc-audit] table.")
        values = table
    else:
        path = find_pyproject(cwd or Path.cwd())
        values = (_table(_read(path), path) or {}) if path else {}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise OptionsError(
            f"{path}: unknown key(s) {unknown} in [tool.nrc-audit]; known keys are {sorted(DEFAULTS)} "
            "(use underscores, e.g. nrc1_max)."
        )
    for key, value in values.items():
        _check_value(path, key, value)
    return dict(values), path


def _check_value(path: Path | None, key: str, value: Any) -> None:
    """Type (and, for numbers, finiteness) of one [tool.nrc-audit] value; lists must hold strings."""
    expected = " or ".join(t.__name__ for t in TYPES[key])
    if not isinstance(value, TYPES[key]) or isinstance(value, bool):
        raise OptionsError(f"{path}: [tool.nrc-audit] {key} = {value!r} is a {type(value).__name__}; expected "
                           f"{expected} (e.g. {key} = {DEFAULTS[key]!r}).")  # fmt: skip
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionsError(f"{path}: [tool.nrc-audit] {key} = {value!r}; expected a finite number.")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise OptionsError(f"{path}: [tool.nrc-audit] {key} = {value!r}; expected a list of strings "
                           "(module names or glob patterns).")  # fmt: skip
    if key == "baseline_tolerance":
        check_tolerance(value, f"{path}: [tool.nrc-audit] baseline_tolerance =")


def resolve(cli: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """Merge: a command-line value that is not None wins over the file, which wins over DEFAULTS."""
    merged = dict(DEFAULTS)
    merged.update(file_values)
    merged.update({k: v for k, v in cli.items() if v is not None and (v != [] or k not in DEFAULTS)})
    if merged.get("baseline_tolerance") is not None:  # checked here, before the pass, for the option too
        check_tolerance(merged["baseline_tolerance"])
    return merged
