"""CI and model-card outputs: markdown, model-index, plot, settings file, baseline, trend, validate."""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

import nrc_audit
from conftest import SAMPLES, make_mlp
from nrc_audit.cli.app import audit_app
from nrc_audit.cli.commands import trend_app, validate_app

runner = CliRunner()
LOOSE = ["--nrc1-max", "1", "--nrc2-min", "0", "--nrc3-min", "0", "--nrc4-ratio-max", "1e9", "--noise-alignment-max", "1"]


def run(*args):
    return runner.invoke(audit_app, [str(a) for a in args])


def base(case) -> list:
    return [case["ckpt"], case["data"], "--no-features", "--no-progress"]


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Parse the first GitHub pipe table: header, delimiter row, body rows."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines]
    header, delim, *rows = split
    assert all(set(cell) <= set(":-") and "-" in cell for cell in delim), delim
    assert all(len(row) == len(header) for row in rows)
    return [dict(zip(header, row)) for row in rows]


def test_markdown_is_a_github_table_naming_failing_layers(mlp_case, tmp_path):
    md = tmp_path / "card.md"
    result = run(*base(mlp_case), "--markdown", md, "--require-collapsed", "2")
    assert result.exit_code == 1
    text = md.read_text()
    rows = parse_markdown_table(text)
    assert [r["layer"] for r in rows] == ["`0`", "`2`", "`4`", "`6`"]
    assert all(r["collapsed"] == "❌" for r in rows)
    assert "**Gate FAILED**" in text and "2 (`4`), 3 (`6`)" in text
    assert "sha256" in text and "How to read this" in text


def test_plot_writes_a_png(mlp_case, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    assert run(*base(mlp_case), "--plot", png, "--require-collapsed", "0").exit_code == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_without_matplotlib_exits_2_with_hint(mlp_case, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    out = tmp_path / "r.json"
    result = run(*base(mlp_case), "--plot", tmp_path / "fig.png", "--json", out)
    assert result.exit_code == 2
    assert "pip install 'nrc-audit[plot]'" in " ".join(result.stderr.split())
    assert not out.exists()  # refused before the pass: nothing written


def test_settings_file_changes_a_verdict_and_the_command_line_wins(mlp_case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        "[tool.nrc-audit]\nnrc1_max = 1.0\nnrc2_min = 0.0\nnrc3_min = 0.0\nnrc4_ratio_max = 1e9\nnoise_alignment_max = 1.0\nrequire_collapsed = 4\n"
    )
    result = run(*base(mlp_case), "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["thresholds"]["nrc1_max"] == 1.0 and doc["settings"]["thresholds"]["noise_alignment_max"] == 1.0 and doc["settings"]["require_collapsed"] == 4
    strict = run(*base(mlp_case), "--format", "json", "--nrc3-min", "0.99")
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["settings"]["thresholds"]["nrc3_min"] == 0.99


def test_explicit_config_file_and_bad_keys(mlp_case, tmp_path):
    cfg = tmp_path / "nrc.toml"
    cfg.write_text("require_collapsed = 0\n")
    assert run(*base(mlp_case), "--config", cfg).exit_code == 0
    cfg.write_text("[tool.nrc-audit]\nnrc1-max = 0.3\n")
    result = run(*base(mlp_case), "--config", cfg)
    assert result.exit_code == 2 and "unknown key(s) ['nrc1-max']" in " ".join(result.stderr.split())


def test_baseline_against_itself_passes_and_regressions_fail(mlp_case, tmp_path):
    ref = tmp_path / "ref.json"
    assert run(*base(mlp_case), *LOOSE, "--json", ref).exit_code == 0
    same = run(*base(mlp_case), *LOOSE, "--baseline", ref, "--format", "json")
    assert same.exit_code == 0
    assert json.loads(same.stdout)["baseline"] == {"path": str(ref), "tolerance": 0.05, "passed": True, "regressions": []}
    # a stricter NRC3 threshold un-collapses layers that were collapsed in the baseline
    worse = run(*base(mlp_case), *LOOSE, "--nrc3-min", "0.99", "--require-collapsed", "0", "--baseline", ref)
    assert worse.exit_code == 1
    assert "no longer collapsed (fails nrc3)" in worse.stdout and "collapse onset moved" in worse.stdout


def test_baseline_of_another_architecture_exits_2(mlp_case, tmp_path):
    other = nrc_audit.save_checkpoint(make_mlp([12, 8, 3]), tmp_path / "o.safetensors", arch={"family": "mlp"})
    ref = tmp_path / "ref.json"
    run(other, mlp_case["data"], "--no-features", "--json", ref)
    result = run(*base(mlp_case), "--baseline", ref)
    assert result.exit_code == 2 and "same architecture" in " ".join(result.stderr.split())


def test_baseline_no_weight_decay_sample_regresses_against_weight_decay_sample(tmp_path):
    data = SAMPLES / "data.h5"
    ref = tmp_path / "wd.json"
    assert run(SAMPLES / "mlp_wd.safetensors", data, "--no-features", "--json", ref).exit_code == 0
    own = run(SAMPLES / "mlp_wd.safetensors", data, "--no-features", "--baseline", ref)
    assert own.exit_code == 0, own.stdout
    nowd = run(SAMPLES / "mlp_nowd.safetensors", data, "--no-features", "--baseline", ref, "--format", "json")
    assert nowd.exit_code == 1
    regressions = json.loads(nowd.stdout)["baseline"]["regressions"]
    assert any("no longer collapsed" in r["what"] for r in regressions)
    assert all(r["layer"] is None or isinstance(r["layer"], int) for r in regressions)


def test_trend_over_sample_checkpoints(tmp_path):
    ckpts = sorted((SAMPLES / "trend").glob("*.safetensors"))
    assert len(ckpts) >= 3
    out, png = tmp_path / "trend.json", tmp_path / "trend.png"
    args = [*map(str, ckpts), "--data", str(SAMPLES / "data.h5"), "--json", str(out), "--no-progress"]
    if _has_matplotlib():
        args += ["--plot", str(png)]
    result = runner.invoke(trend_app, args)
    assert result.exit_code == 0, result.stderr
    assert "collapse over training" in result.stdout and "NRC3 alignment" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["labels"] == ["mlp_wd_epoch20", "mlp_wd_epoch60", "mlp_wd_epoch100"]  # natural order, not the glob's
    if _has_matplotlib():
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_validate_subcommand(mlp_case, tmp_path):
    good = tmp_path / "r.json"
    run(*base(mlp_case), "--json", good)
    assert runner.invoke(validate_app, [str(good)]).exit_code == 0
    doc = json.loads(good.read_text())
    doc["summary"]["onset"] = doc["summary"].pop("collapse_onset")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = runner.invoke(validate_app, [str(good), str(bad)])
    assert result.exit_code == 1 and "'collapse_onset' is a required property" in result.stderr
    assert runner.invoke(validate_app, [str(tmp_path / "missing.json")]).exit_code == 2


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_report_records_and_the_json_schema_name_the_same_fields():
    """Python's report types and the shipped JSON Schema are two descriptions of one document: a field added
    to a record but not to the schema (or the other way round) fails here. Order counts: the JSON keeps the
    records' field order, which the schema lists."""
    from dataclasses import fields

    from nrc_audit.core.conditions import LayerMetrics, TargetSummary
    from nrc_audit.core.verdicts import TABLE
    from nrc_audit.outputs.records import Gate, ReportData, Summary, load_schema

    schema = load_schema()["properties"]
    pairs = {
        "layers": (LayerMetrics, schema["layers"]["items"]),
        "target": (TargetSummary, schema["target"]),
        "summary": (Summary, schema["summary"]),
        "summary.gate": (Gate, schema["summary"]["properties"]["gate"]),
    }
    for where, (record, block) in pairs.items():
        names = [f.name for f in fields(record)]
        assert names == list(block["properties"]), where
        assert set(block.get("required", [])) <= set(names), where
    top = [f.name for f in fields(ReportData) if f.name not in ("extensions",)]
    assert set(top) == set(schema) - {"baseline"}, "a top-level report field differs from the schema"
    passed = schema["layers"]["items"]["properties"]["passed"]
    assert set(passed.get("properties", passed.get("required", []))) == {c.name for c in TABLE}


ODD = ["--nrc1-max", "0.31", "--nrc2-min", "0.52", "--nrc3-min", "0.63", "--nrc4-ratio-max", "7.5",
       "--noise-alignment-max", "0.44"]  # fmt: skip
STATED = ["NRC1 noise ≤ 0.31", "NRC2 CKA ≥ 0.52", "NRC3 alignment ≥ 0.63", "NRC4 probe MSE / model MSE ≤ 7.5",
          "noise alignment ≤ 0.44"]  # fmt: skip


def test_table_caption_and_card_state_every_condition_with_the_runs_thresholds(mlp_case, tmp_path):
    """Both read the one table of conditions: the five rules, each with this run's threshold, none left out."""
    md = tmp_path / "card.md"
    result = run(*base(mlp_case), *ODD, "--markdown", md, "--require-collapsed", "0")
    assert result.exit_code == 0, result.stderr
    caption = " ".join(result.stdout.split())
    thresholds = next(line for line in md.read_text().splitlines() if line.startswith("Thresholds:"))
    for rule in STATED:
        assert rule in caption and rule in thresholds, rule


def test_trend_shows_one_table_per_condition_including_the_noise_condition(tmp_path):
    ckpts = sorted((SAMPLES / "trend").glob("*.safetensors"))
    result = runner.invoke(trend_app, [*map(str, ckpts), "--data", str(SAMPLES / "data.h5"), "--no-progress"])
    assert result.exit_code == 0, result.stderr
    titles = [line.strip() for line in result.stdout.splitlines()]
    for title in ("NRC1 noise", "NRC2 CKA", "NRC3 alignment", "NRC4 probe MSE / model MSE", "noise alignment"):
        assert title in titles, (title, titles)
