"""Outputs that real clients accept: huggingface_hub's card parser, GitHub workflow commands, JUnit XML;
and the CLI conventions (--version, fast --help without torch, panels, escaped markup, flags)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nrc_audit.cli.app import audit_app
from nrc_audit.cli.commands import reanalyze_app

runner = CliRunner()
LOOSE = ["--nrc1-max", "1", "--nrc2-min", "0", "--nrc3-min", "0", "--nrc4-ratio-max", "1e9", "--noise-alignment-max", "1"]


def run(*args, app=audit_app):
    return runner.invoke(app, [str(a) for a in args])


def base(case) -> list:
    return [case["ckpt"], case["data"], "--no-features", "-q"]


# ---------------------------------------------------------------- model cards (huggingface_hub's own parser)

def test_model_index_loads_in_huggingface_hub_modelcard(mlp_case, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    frag = tmp_path / "model-index.yaml"
    args = ["--model-index", frag, "--dataset-id", "someone/my-data", "--dataset-name", "My data", *LOOSE]
    assert run(*base(mlp_case), *args).exit_code == 0
    readme = tmp_path / "README.md"
    readme.write_text("---\n" + frag.read_text() + "---\n\n# mlp\n")
    card = hub.ModelCard.load(readme)  # strict: raises on metadata the Hub rejects
    results = card.data.eval_results
    assert card.data.model_name == "mlp"
    assert {r.task_type for r in results} == {"tabular-regression"}
    assert {(r.dataset_type, r.dataset_name) for r in results} == {("someone/my-data", "My data")}
    assert all(r.source_name is None and r.source_url is None and r.dataset_revision is None for r in results)
    by_type = {r.metric_type: r.metric_value for r in results}
    report = json.loads(run(*base(mlp_case), "--format", "json", *LOOSE).stdout)
    assert by_type["nrc_collapse_onset"] == report["summary"]["collapse_onset"]
    assert by_type["nrc3_last_layer"] == pytest.approx(report["layers"][-1]["nrc3"])


def test_model_index_without_dataset_id_exits_2_before_the_pass(mlp_case, tmp_path):
    result = run(*base(mlp_case), "--model-index", tmp_path / "mi.yaml", "--json", tmp_path / "r.json")
    assert result.exit_code == 2
    assert "--model-index needs --dataset-id" in " ".join(result.stderr.split())
    assert not (tmp_path / "r.json").exists()


EXISTING = """---
license: mit
tags:
- regression
model-index:
- name: mlp
  results:
  - task:
      type: tabular-regression
    dataset:
      type: someone/other-data
      name: Other
    metrics:
    - type: mse
      value: 0.5
---

# My model

Intro text.

## Training

Details.
"""


def test_model_card_merge_keeps_other_keys_and_results_and_is_idempotent(mlp_case, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    card = tmp_path / "README.md"
    card.write_text(EXISTING)
    args = [*base(mlp_case), "--model-card", card, "--dataset-id", "someone/my-data", *LOOSE]
    assert run(*args).exit_code == 0
    once = card.read_text()
    assert run(*args).exit_code == 0
    assert card.read_text() == once  # idempotent
    loaded = hub.ModelCard.load(card)
    assert loaded.data.license == "mit" and loaded.data.tags == ["regression"]
    datasets = [r.dataset_type for r in loaded.data.eval_results]
    assert datasets.count("someone/other-data") == 1 and "someone/my-data" in datasets
    assert any(r.metric_type == "mse" and r.metric_value == 0.5 for r in loaded.data.eval_results)
    body = loaded.text
    assert "Intro text." in body and "## Training\n\nDetails." in body
    assert body.count("<!-- nrc-audit:start -->") == 1 and body.count("## Deep Neural Regression Collapse audit") == 1
    # another run with other thresholds replaces the section and our result, nothing else
    assert run(*base(mlp_case), "--model-card", card, "--dataset-id", "someone/my-data").exit_code == 1
    again = hub.ModelCard.load(card)
    assert len(again.data.to_dict()["model-index"][0]["results"]) == 2  # theirs and ours, ours replaced
    assert [r.dataset_type for r in again.data.eval_results].count("someone/other-data") == 1
    assert again.text.count("<!-- nrc-audit:end -->") == 1 and "**Gate FAILED**" in again.text


def test_model_card_created_when_missing_and_without_dataset_only_the_section(mlp_case, tmp_path):
    card = tmp_path / "README.md"
    assert run(*base(mlp_case), "--model-card", card, *LOOSE).exit_code == 0
    text = card.read_text()
    assert text.startswith("<!-- nrc-audit:start -->\n## Deep Neural Regression Collapse audit")
    assert "model-index" not in text  # no dataset stated: no eval results


def test_model_card_with_broken_front_matter_exits_2_before_the_pass(mlp_case, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: [mit\n---\n# x\n")
    result = run(*base(mlp_case), "--model-card", card, "--json", tmp_path / "r.json")
    assert result.exit_code == 2
    assert "the YAML front matter does not parse" in " ".join(result.stderr.split())
    assert card.read_text() == "---\nlicense: [mit\n---\n# x\n" and not (tmp_path / "r.json").exists()


def test_card_and_junit_after_exit_2_say_the_audit_could_not_run(mlp_case, tmp_path):
    junitparser = pytest.importorskip("junitparser")
    md, xml, card = tmp_path / "card.md", tmp_path / "junit.xml", tmp_path / "README.md"
    card.write_text(EXISTING)
    result = run(mlp_case["ckpt"], tmp_path / "missing.h5", "--no-features", "-q", "--markdown", md,
                 "--junit-xml", xml, "--json", tmp_path / "r.json", "--format", "github", "--model-card", card)  # fmt: skip
    assert result.exit_code == 2
    assert card.read_text() == EXISTING  # a published card keeps its last real audit
    assert "**The audit could not run**" in md.read_text() and "missing.h5" in md.read_text()
    suite = next(iter(junitparser.JUnitXml.fromfile(str(xml))))
    assert suite.errors == 1 and suite.tests == 1
    assert re.match(r"::error title=nrc-audit could not run::.*missing\.h5", result.stdout)
    assert not (tmp_path / "r.json").exists()  # no metrics, no report


def test_a_check_after_the_path_check_still_leaves_the_could_not_run_section(mlp_case, tmp_path):
    """Outputs.check_paths hands on SafeOutputs; a failure of SafeOutputs.check_before_run (here --model-index
    without --dataset-id) writes the section, a failure before the paths are checked (a settings file that does
    not parse) writes none."""
    md = tmp_path / "card.md"
    result = run(*base(mlp_case), "--markdown", md, "--model-index", tmp_path / "mi.yaml")
    assert result.exit_code == 2 and "--model-index needs --dataset-id" in md.read_text()
    md.unlink()
    bad = tmp_path / "bad.toml"
    bad.write_text("[tool.nrc-audit\n")
    assert run(*base(mlp_case), "--markdown", md, "--config", bad).exit_code == 2
    assert not md.exists()


# ---------------------------------------------------------------- GitHub workflow commands and JUnit XML

def test_format_github_prints_one_error_per_failing_gate_layer(mlp_case):
    result = run(*base(mlp_case), "--format", "github", "--require-collapsed", "2")
    assert result.exit_code == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 2  # layers 2 and 3 of the random MLP fail the gate
    assert errors[0].startswith("::error title=nrc-audit gate%3A layer 2 4 fails NRC")
    assert "needs ≤ 0.25" in errors[0] or "needs ≥" in errors[0]
    assert result.stdout.splitlines()[-1].startswith("::notice title=nrc-audit::gate FAILED")


def test_format_github_baseline_regressions_and_warnings(mlp_case, tmp_path):
    good = tmp_path / "good.json"
    assert run(*base(mlp_case), "--json", good, *LOOSE).exit_code == 0
    doc = json.loads(good.read_text())
    doc["layers"][1]["nrc1"] = 0.0  # the baseline claims layer 1 was far less noisy
    doc["layers"][1]["warnings"] = []
    good.write_text(json.dumps(doc))
    result = run(*base(mlp_case), "--format", "github", "--baseline", good, *LOOSE)
    assert result.exit_code == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error")]
    assert errors == [line for line in errors if line.startswith("::error title=nrc-audit baseline%3A layer 1 2 NRC1::")]
    assert len(errors) == 1


def test_junit_xml_one_testcase_per_layer_failures_are_the_gate_layers(mlp_case, tmp_path):
    junitparser = pytest.importorskip("junitparser")
    xml = tmp_path / "junit.xml"
    assert run(*base(mlp_case), "--junit-xml", xml, "--require-collapsed", "2").exit_code == 1
    suites = list(junitparser.JUnitXml.fromfile(str(xml)))
    assert len(suites) == 1 and suites[0].name == "mlp"
    cases = list(suites[0])
    assert [c.name for c in cases] == ["layer 0: 0", "layer 1: 2", "layer 2: 4", "layer 3: 6"]
    failed = [c.name for c in cases if any(isinstance(r, junitparser.Failure) for r in c.result)]
    assert failed == ["layer 2: 4", "layer 3: 6"] and suites[0].failures == 2 and suites[0].tests == 4
    outside = cases[0].system_out or ""
    assert "not collapsed" in outside and "(outside the gate)" in outside


def test_reanalyze_takes_the_same_ci_options(mlp_case, tmp_path):
    junitparser = pytest.importorskip("junitparser")
    store, xml = tmp_path / "f.h5", tmp_path / "j.xml"
    assert run(mlp_case["ckpt"], mlp_case["data"], "-q", "--features", store, *LOOSE).exit_code == 0
    result = run(store, "-q", "--junit-xml", xml, "--format", "github", app=reanalyze_app)
    assert result.exit_code == 1
    assert junitparser.JUnitXml.fromfile(str(xml)).failures == 1
    assert sum(line.startswith("::error") for line in result.stdout.splitlines()) == 1


# ---------------------------------------------------------------- CLI conventions

def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "nrc_audit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_version():
    import nrc_audit

    result = _cli("--version")
    assert result.returncode == 0 and result.stdout == f"nrc-audit {nrc_audit.__version__}\n"


def test_help_lists_subcommands_and_does_not_import_torch():
    code = ("import sys\nfrom nrc_audit.cli.app import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")  # fmt: skip
    result = _cli(code=code)
    assert result.stdout.rstrip().endswith("NO-TORCH"), result.stdout[-300:]
    text = result.stdout
    for sub in ("nrc-audit trend", "nrc-audit reanalyze", "nrc-audit validate"):
        assert sub in text
    for panel in ("Inputs", "Model", "Analysis", "Thresholds", "Outputs", "CI"):
        assert f"─ {panel} ─" in text
    assert "nrc-audit[plot]" in text and "[tool.nrc-audit]" in text  # Rich markup did not eat them
    assert re.search(r"--nrc1-max .*\[default: \(0\.25\)\]", text)  # defaults shown
    assert re.search(r"--exit-zero +Exit 0", text)  # a flag: no <bool> value
    assert "-q" in text and "--version" in text


@pytest.mark.parametrize("sub", ["trend", "reanalyze", "validate"])
def test_subcommand_help_is_fast_too(sub):
    result = _cli(sub, "--help")
    assert result.returncode == 0 and f"nrc-audit {sub}" in result.stdout


# ---------------------------------------------------------------- Report views and figures

def test_report_to_table_carries_k_onset_and_gate_and_to_markdown_exists(mlp_case, tmp_path):
    from rich.console import Console

    from nrc_audit.outputs.report import Report

    out = tmp_path / "r.json"
    assert run(*base(mlp_case), "--json", out, "--require-collapsed", "2").exit_code == 1
    report = Report.from_dict(json.loads(out.read_text()))
    console = Console(record=True, width=160)
    console.print(report.to_table())
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    k = f"k = {report.settings['rank']} ({report.settings['rank_source']})"
    assert f"{k} · collapse onset: none · gate: FAILED (layers 2, 3)" in text
    assert report.to_markdown().startswith("## Deep Neural Regression Collapse audit")


def test_plot_is_2x2_at_800px_with_fixed_axes(mlp_case, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from nrc_audit.outputs import plot

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):  # capture the axes as drawn, before the figure is closed
        seen["axes"] = [(ax.get_ylim(), ax.get_yscale(), ax.get_ylabel(), ax.get_title()) for ax in fig.axes]
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    png = tmp_path / "fig.png"
    assert run(*base(mlp_case), "--plot", png, "--require-collapsed", "0").exit_code == 0
    from PIL import Image

    assert Image.open(png).size == (800, 640)
    axes = seen["axes"]
    assert len(axes) == 4 and all(label for _, _, label, _ in axes)
    for (low, high), scale, _, _ in axes[:3]:
        assert scale == "linear" and low <= 0 and 1 <= high <= 1.05  # NRC1–3 on [0, 1]
    assert axes[3][1] == "log" and "pass ≤ 2×" in axes[3][3]
    assert plot.WIDTH_IN * plot.DPI == 800


def test_readme_ci_examples_run_as_written(tmp_path):
    """The README's GitHub Actions and GitLab CI steps (audit, then summary/artifacts) on the shipped sample,
    also when the audit cannot run (exit 2): the summary step still finds its card."""
    yaml = pytest.importorskip("yaml")
    import shutil

    from conftest import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    # the workflow whose job runs the audit by hand, and the GitLab job (the README also shows the packaged action)
    (github,) = [b for b in blocks if isinstance(b, dict) and "audit" in b.get("jobs", {})
                 and any(s.get("name") == "Deep NRC audit" for s in b["jobs"]["audit"]["steps"])]
    (gitlab,) = [b for b in blocks if isinstance(b, dict) and "nrc-audit" in b]
    steps = {s.get("name"): s for s in github["jobs"]["audit"]["steps"]}
    audit, summary = steps["Deep NRC audit"]["run"], steps["Job summary"]["run"]
    gitlab_audit = gitlab["nrc-audit"]["script"][-1]
    shutil.copytree(REPO / "sample_checkpoints", tmp_path / "sample_checkpoints",
                    ignore=shutil.ignore_patterns("*.png", "trend", "images.h5", "resnet*"))  # fmt: skip
    nrc = f"{sys.executable} -m nrc_audit"
    env = dict(os.environ, GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"))

    def sh(command: str) -> int:
        return subprocess.run(["bash", "-c", command.replace("nrc-audit sample", f"{nrc} sample")], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120).returncode  # fmt: skip

    assert sh(audit) == 0 and sh(summary) == 0
    assert "**Gate passed**" in (tmp_path / "summary.md").read_text()
    # GitLab runs the same audit without the annotations; its artifacts are the files the audit wrote
    assert " ".join(gitlab_audit.split()) == " ".join(audit.replace(" --format github", "").split())
    assert all((tmp_path / p).exists() for p in gitlab["nrc-audit"]["artifacts"]["paths"])
    assert (tmp_path / gitlab["nrc-audit"]["artifacts"]["reports"]["junit"]).exists()
    (tmp_path / "sample_checkpoints" / "data.h5").unlink()
    assert sh(audit) == 2 and sh(summary) == 0
    assert "**The audit could not run**" in (tmp_path / "summary.md").read_text()
