"""One declaration of each shared option (cli/common.py's groups, added by ``takes``): every command that takes a
group offers all of its options, declared the same way, in help panels that follow PANEL_ORDER."""

from __future__ import annotations

from pathlib import Path

import dataclasses
from typing import get_type_hints

import pytest
import typer
from typer.testing import CliRunner

from nrc_audit.cli.common import PANEL_ORDER, make_app, takes
from nrc_audit.cli.options import AnalysisArgs, DataArgs, ModelArgs, PassArgs, ReportArgs, RunArgs
from nrc_audit.cli.reference import command_params

# Which command takes which options: written out here on purpose, independently of the groups and decorators in cli/.
USERS = {
    "analysis": (AnalysisArgs, ("audit", "reanalyze", "trend"),
                 "--rank --pinv-rtol --rank-energy --batch-size --nrc1-max --nrc2-min --nrc3-min --nrc4-ratio-max --noise-alignment-max "
                 "--require-collapsed"),
    "data": (DataArgs, ("audit", "trend"), "--x-key --y-key --channels-last --scale-uint8 --limit --input-key"),
    "model": (ModelArgs, ("audit", "trend"), "--model-def --model-kwargs --activation --output-key --token-pooling"),
    "pass": (PassArgs, ("audit", "trend"), "--layers --exclude --device"),
    "report outputs": (ReportArgs, ("audit", "reanalyze"),
                       "--json --format --markdown --model-index --model-card --dataset-id --dataset-name --hub-task "
                       "--plot --junit-xml --baseline --baseline-tolerance --exit-zero"),
    "run": (RunArgs, ("audit", "reanalyze", "trend"), "--config --no-progress --quiet"),
}  # fmt: skip
TREND_OUTPUTS = "--json --format --plot --junit-xml"  # trend's own: the JSON and figure cover every checkpoint


def _fields(group):
    hints = get_type_hints(group, include_extras=True)
    return [(f.name, hints[f.name], f.default) for f in dataclasses.fields(group)]


def _declared(kind) -> tuple[tuple[str, ...], str, str]:
    """(option names, help, panel) of an ``Annotated[type, typer.Option(...)]`` alias."""
    [info] = [m for m in kind.__metadata__ if isinstance(m, typer.models.OptionInfo)]
    return (info.default, *info.param_decls), info.help, info.rich_help_panel


@pytest.mark.parametrize("group", sorted(USERS))
def test_every_user_of_a_group_offers_each_of_its_options(group):
    options, users, flags = USERS[group]
    assert [_declared(kind)[0][-1] for _, kind, _ in _fields(options)] == flags.split(), f"the {group} group changed"
    commands = command_params()
    for command in users:
        for name, kind, default in _fields(options):
            assert name in commands[command], f"{command} lost --{name.replace('_', '-')} ({group} options)"
            p = commands[command][name]
            names, help_text, panel = _declared(kind)
            assert (sorted(p.opts + p.secondary_opts), p.help, p.rich_help_panel) == (sorted(names), help_text, panel)
            assert p.default == (default.value if hasattr(default, "value") else default), (command, name)


def test_trend_takes_its_own_outputs():
    params = command_params()["trend"]
    assert {n for n, p in params.items() if p.rich_help_panel in ("Outputs", "CI") and "--no-progress" not in p.opts
            and "--quiet" not in p.opts and n != "require_collapsed"} == {"json_path", "fmt", "plot", "junit_xml"}  # fmt: skip
    assert " ".join(sorted(sum((params[n].opts for n in ("json_path", "fmt", "plot", "junit_xml")), []))) == \
        " ".join(sorted(TREND_OUTPUTS.split()))


def test_help_panels_follow_the_panel_order():
    """Arguments first, then Inputs, Model, Analysis, Thresholds, Outputs, CI: no panel appears twice apart."""
    for command, params in command_params().items():
        ranks = [0 if p.param_type_name == "argument" else 1 + PANEL_ORDER.index(p.rich_help_panel)
                 for p in params.values() if p.name != "help"]  # fmt: skip
        assert ranks == sorted(ranks), (command, [p.name for p in params.values()])


def test_takes_hands_the_command_filled_groups_and_keeps_its_own_parameters():
    app = make_app("probe")
    seen = {}

    @app.command()
    @takes
    def probe(store: str = typer.Argument(...), as_given: bool = typer.Option(False, "--as-given"),
              run: RunArgs = RunArgs()) -> None:  # fmt: skip
        seen.update(store=store, as_given=as_given, run=run)

    result = CliRunner().invoke(app, ["S", "-q", "--as-given", "--config", "x.toml"])
    assert result.exit_code == 0, result.output
    assert seen == {"store": "S", "as_given": True, "run": RunArgs(config=Path("x.toml"), quiet=True)}


def test_takes_refuses_an_option_declared_twice():
    with pytest.raises(TypeError, match=r"probe: option names \['quiet'\] are declared twice"):
        @takes
        def probe(quiet: bool = False, run: RunArgs = RunArgs()) -> None: ...


def test_a_settings_field_names_a_known_settings_key():
    from nrc_audit.cli.options import setting

    with pytest.raises(TypeError, match="settings key 'rnak' is not in"):
        setting("rnak")


def test_trend_applies_the_model_and_layer_options_to_every_checkpoint(mlp_case, tmp_path):
    """--layers, --exclude, --token-pooling reach every audit of a trend; --format json, --junit-xml work."""
    import json

    import nrc_audit
    from conftest import make_mlp
    from nrc_audit.cli.commands import trend_app

    ckpts = [mlp_case["ckpt"], nrc_audit.save_checkpoint(make_mlp([12, 32, 32, 16, 3], seed=5), tmp_path / "m2.safetensors",
                                                         arch={"family": "mlp", "activation": "relu"})]  # fmt: skip
    xml = tmp_path / "last.xml"
    result = CliRunner().invoke(trend_app, [*map(str, ckpts), "--data", str(mlp_case["data"]), "--layers", "2",
                                            "--layers", "4", "--exclude", "4", "--token-pooling", "cls",
                                            "--require-collapsed", "0", "--format", "json", "--junit-xml", str(xml),
                                            "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [[layer["name"] for layer in r["layers"]] for r in doc["reports"]] == [["2"], ["2"]]
    assert doc["labels"] == ["m2", "mlp"] and xml.read_text().count("<testcase") == 1
    bad = CliRunner().invoke(trend_app, [*map(str, ckpts), "--data", str(mlp_case["data"]), "--model-def", "nope.py:f"])
    assert bad.exit_code == 2 and "nope.py" in " ".join(bad.stderr.split())
