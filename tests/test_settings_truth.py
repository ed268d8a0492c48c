"""One source of truth for settings: the config dataclasses hold the defaults; the settings file's DEFAULTS,
the CLI help, the Python API's signature, docs/settings.md and the README's threshold table agree with them."""

from __future__ import annotations

import inspect
import json
import re

from conftest import REPO
from nrc_audit.config import AnalysisOptions, AuditConfig, BaselineOptions, DataOptions, ModelOptions, Thresholds
from nrc_audit.io.settings_file import DEFAULTS, TYPES

# key → (dataclass, field): written out here on purpose, independently of settings_file's own mapping
HOMES = {
    "rank": (AnalysisOptions, "rank"), "nrc1_max": (Thresholds, "nrc1_max"), "nrc2_min": (Thresholds, "nrc2_min"),
    "nrc3_min": (Thresholds, "nrc3_min"), "nrc4_ratio_max": (Thresholds, "nrc4_ratio_max"),
    "noise_alignment_max": (Thresholds, "noise_alignment_max"),
    "pinv_rtol": (AnalysisOptions, "pinv_rtol"), "rank_energy": (AnalysisOptions, "rank_energy"),
    "require_collapsed": (AnalysisOptions, "require_collapsed"), "x_key": (DataOptions, "x_key"),
    "y_key": (DataOptions, "y_key"), "batch_size": (AuditConfig, "batch_size"), "device": (AuditConfig, "device"),
    "layers": (AuditConfig, "layers"), "exclude": (AuditConfig, "exclude"), "activation": (ModelOptions, "activation"),
    "baseline_tolerance": (BaselineOptions, "baseline_tolerance"),
}  # fmt: skip


def _home_default(key: str):
    cls, name = HOMES[key]
    value = getattr(cls, name)
    return list(value) if isinstance(value, tuple) else value


def test_settings_file_defaults_are_the_dataclass_defaults():
    assert set(DEFAULTS) == set(HOMES) == set(TYPES)
    assert {k: _home_default(k) for k in DEFAULTS} == DEFAULTS


def test_api_signature_defaults_are_the_dataclass_defaults():
    from nrc_audit.engine.api import audit

    params = inspect.signature(audit).parameters
    for key in ("rank", "require_collapsed", "pinv_rtol", "rank_energy"):
        assert params[key].default == _home_default(key), key
    assert list(params["exclude"].default) == _home_default("exclude")


def _commands():
    from nrc_audit.cli.reference import command_params

    return command_params()


def test_cli_help_shows_each_default_and_each_option_is_declared_once():
    seen: dict[str, tuple] = {}
    for command, params in _commands().items():
        for key in DEFAULTS:
            if key not in params:
                continue
            p = params[key]
            if DEFAULTS[key] is not None and DEFAULTS[key] != []:
                shown = ", ".join(map(str, DEFAULTS[key])) if isinstance(DEFAULTS[key], list) else str(DEFAULTS[key])
                assert p.show_default == shown, (command, key, p.show_default)
            # the same declaration everywhere: same option names and help in every command that takes it
            assert seen.setdefault(key, (tuple(p.opts), p.help)) == (tuple(p.opts), p.help), (command, key)
    assert set(seen) == set(DEFAULTS)


def test_docs_settings_reference_is_current():
    from nrc_audit.cli.reference import settings_reference

    assert (REPO / "docs" / "settings.md").read_text(encoding="utf-8") == settings_reference(), \
        "docs/settings.md is stale: run python -m nrc_audit.cli.reference > docs/settings.md"


def test_readme_threshold_table_shows_the_defaults():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for key in ("nrc1_max", "nrc2_min", "nrc3_min", "nrc4_ratio_max", "noise_alignment_max"):
        option = "--" + key.replace("_", "-")
        found = re.search(rf"(\d[\d.]*) \(`{option}`\)", text)
        assert found and float(found.group(1)) == DEFAULTS[key], (key, found and found.group(0))


def test_help_defaults_render_in_every_command():
    from typer.testing import CliRunner

    from nrc_audit.cli.app import audit_app
    from nrc_audit.cli.commands import SUBCOMMANDS

    for app in (audit_app, SUBCOMMANDS["reanalyze"], SUBCOMMANDS["trend"]):
        out = " ".join(CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout.split())
        assert f"[default: ({json.dumps(DEFAULTS['nrc1_max'])})]" in out
        assert f"[default: ({DEFAULTS['batch_size']})]" in out


def test_every_settings_key_is_a_field_of_an_option_group():
    """The settings file reaches a command only through the groups' ``setting(KEY)`` fields: a key that no
    field carries (a renamed parameter) would be read from the file and silently dropped."""
    from dataclasses import fields

    from nrc_audit.cli.options import GROUPS

    carried = [f.metadata["setting"] for g in GROUPS for f in fields(g) if "setting" in f.metadata]
    assert sorted(carried) == sorted(DEFAULTS)  # each key exactly once
