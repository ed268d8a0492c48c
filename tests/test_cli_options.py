"""One declaration of each shared option (cli/common.py's groups, added by ``takes``): every command that takes a
group offers all of its options, declared the same way, in help panels that follow PANEL_ORDER."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nrc_audit.cli.common import (
    ANALYSIS_OPTIONS, DATA_PASS_OPTIONS, PANEL_ORDER, REPORT_OUTPUTS, RUN_OPTIONS, make_app, takes,
)  # fmt: skip
from nrc_audit.cli.reference import command_params

# Which command takes which options: written out here on purpose, independently of the groups and decorators in cli/.
USERS = {
    "analysis": (ANALYSIS_OPTIONS, ("audit", "reanalyze", "trend"),
                 "--rank --pinv-rtol --rank-energy --batch-size --nrc1-max --nrc2-min --nrc3-min --nrc4-ratio-max --noise-alignment-max "
                 "--require-collapsed"),
    "data pass": (DATA_PASS_OPTIONS, ("audit", "trend"), "--x-key --y-key --channels-last --scale-uint8 --limit --device"),
    "report outputs": (REPORT_OUTPUTS, ("audit", "reanalyze"),
                       "--json --format --markdown --model-index --model-card --dataset-id --dataset-name --hub-task "
                       "--plot --junit-xml --baseline --baseline-tolerance --exit-zero"),
    "run": (RUN_OPTIONS, ("audit", "reanalyze", "trend"), "--config --no-progress --quiet"),
}  # fmt: skip


def _declared(kind) -> tuple[tuple[str, ...], str, str]:
    """(option names, help, panel) of an ``Annotated[type, typer.Option(...)]`` alias."""
    [info] = [m for m in kind.__metadata__ if isinstance(m, typer.models.OptionInfo)]
    return (info.default, *info.param_decls), info.help, info.rich_help_panel


@pytest.mark.parametrize("group", sorted(USERS))
def test_every_user_of_a_group_offers_each_of_its_options(group):
    options, users, flags = USERS[group]
    assert [_declared(kind)[0][-1] for _, kind, _ in options] == flags.split(), f"the {group} group changed"
    commands = command_params()
    for command in users:
        for name, kind, default in options:
            assert name in commands[command], f"{command} lost --{name.replace('_', '-')} ({group} options)"
            p = commands[command][name]
            names, help_text, panel = _declared(kind)
            assert (sorted(p.opts + p.secondary_opts), p.help, p.rich_help_panel) == (sorted(names), help_text, panel)
            assert p.default == default, (command, name)


def test_help_panels_follow_the_panel_order():
    """Arguments first, then Inputs, Model, Analysis, Thresholds, Outputs, CI: no panel appears twice apart."""
    for command, params in command_params().items():
        ranks = [0 if p.param_type_name == "argument" else 1 + PANEL_ORDER.index(p.rich_help_panel)
                 for p in params.values() if p.name != "help"]  # fmt: skip
        assert ranks == sorted(ranks), (command, [p.name for p in params.values()])


def test_takes_passes_the_shared_options_by_name_and_keeps_the_commands_own():
    app = make_app("probe")
    seen = {}

    @app.command()
    @takes(RUN_OPTIONS)
    def probe(store: str = typer.Argument(...), as_given: bool = typer.Option(False, "--as-given"), **opts):
        seen.update(opts, store=store, as_given=as_given)

    result = CliRunner().invoke(app, ["S", "-q", "--as-given", "--config", "x.toml"])
    assert result.exit_code == 0, result.output
    assert seen == {"store": "S", "as_given": True, "quiet": True, "no_progress": False, "config": Path("x.toml")}


def test_takes_refuses_a_command_without_opts():
    with pytest.raises(TypeError, match="probe must end in \\*\\*opts to take shared options"):
        @takes(RUN_OPTIONS)
        def probe(store: str) -> None: ...
