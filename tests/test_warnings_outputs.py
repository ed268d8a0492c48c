"""Report-level warnings reach every output CI users and card readers look at, read back by each output's real
consumer: GitHub's workflow-command grammar, junitparser, markdown-it (CommonMark) and huggingface_hub."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import make_mlp, write_h5
from nrc_audit.cli.app import audit_app

# one distinctive phrase per report-level warning (nrc_audit.core.diagnostics, models.architecture)
WARNINGS = {
    "uint8": "X is stored as uint8",
    "labels": "the targets look like class labels",
    "no fit": "the model does not fit the data",
    "k above rank": "exceeds the targets' intrinsic rank estimate",
    "inferred architecture": "architecture inferred",
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    """One CLI run that earns all five warnings, writing every output at once."""
    d = tmp_path_factory.mktemp("warn")
    model = make_mlp([12, 16, 16, 3], seed=3)
    ckpt = d / "mlp.safetensors"  # a bare state dict with arch metadata but no fingerprint: inferred
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt),
              metadata={"nrc_audit.arch": json.dumps({"family": "mlp", "activation": "relu"})})  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 12)).astype(np.uint8)  # uint8 pixels, fed unscaled
    a, b = rng.integers(0, 3, size=(2, 200))
    y = np.stack([a, b, a + b], axis=1).astype(np.float32)  # integer labels of rank 2: --rank 3 exceeds it
    data = write_h5(d / "data.h5", X=x, Y=y)
    paths = {k: d / n for k, n in (("junit", "junit.xml"), ("markdown", "section.md"), ("card", "README.md"),
                                   ("json", "report.json"))}  # fmt: skip
    paths["card"].write_text("---\nlicense: mit\n---\n\n# my model\n")
    result = CliRunner().invoke(audit_app, [str(ckpt), str(data), "--rank", "3", "--no-features", "--no-progress",
                                            "--format", "github", "--junit-xml", str(paths["junit"]),
                                            "--markdown", str(paths["markdown"]), "--model-card", str(paths["card"]),
                                            "--dataset-id", "someone/data", "--json", str(paths["json"])])  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    report = json.loads(paths["json"].read_text())
    return {"stdout": result.stdout, "report": report, **paths}


def _one_each(texts: list[str]) -> None:
    for name, phrase in WARNINGS.items():
        assert sum(phrase in t for t in texts) == 1, f"{name}: {phrase!r} in {texts}"


def test_the_case_earns_all_five_warnings(outputs):
    _one_each(outputs["report"]["warnings"])


def _workflow_command(line: str) -> tuple[str, dict[str, str], str]:
    """(command, properties, message) of a GitHub workflow command, unescaped as the runner does."""
    m = re.fullmatch(r"::(\w+)(?: ([^:]*))?::(.*)", line)
    assert m, line
    unescape = lambda s: s.replace("%0A", "\n").replace("%0D", "\r").replace("%3A", ":").replace("%2C", ",").replace("%25", "%")  # noqa: E731
    props = dict(p.split("=", 1) for p in m.group(2).split(",")) if m.group(2) else {}
    return m.group(1), {k: unescape(v) for k, v in props.items()}, unescape(m.group(3))


def test_github_prints_one_warning_command_per_report_warning(outputs):
    commands = [_workflow_command(line) for line in outputs["stdout"].splitlines() if line.startswith("::")]
    audit_level = [msg for kind, props, msg in commands if kind == "warning" and props.get("title") == "nrc-audit: audit"]
    assert audit_level == outputs["report"]["warnings"]
    _one_each(audit_level)


def test_junit_carries_them_as_suite_properties_without_failing_a_test(outputs):
    junitparser = pytest.importorskip("junitparser")
    xml = junitparser.JUnitXml.fromfile(str(outputs["junit"]))
    (suite,) = list(xml)
    values = [p.value for p in suite.properties() if p.name == "nrc-audit.warning"]
    assert values == outputs["report"]["warnings"]
    _one_each(values)
    assert suite.tests == len(outputs["report"]["layers"])  # informational: no extra testcase, no failure
    system_out = suite._elem.find("system-out")  # the suite's system-out, which Jenkins-style readers show
    assert system_out is not None
    _one_each(system_out.text.splitlines())


def _blockquotes(text: str) -> list[str]:
    """The text of each paragraph inside a CommonMark blockquote (markdown-it, rich's own parser)."""
    from markdown_it import MarkdownIt

    tokens, depth, out = MarkdownIt().parse(text), 0, []
    for tok in tokens:
        depth += {"blockquote_open": 1, "blockquote_close": -1}.get(tok.type, 0)
        if depth and tok.type == "inline":
            out.append(tok.content)
    return out


def test_markdown_section_quotes_each_warning_under_the_verdict(outputs):
    text = outputs["markdown"].read_text()
    quoted = _blockquotes(text)
    _one_each(quoted)
    assert all(q.startswith("**Warning:** ") for q in quoted)
    assert text.index("Warning:") < text.index("| # |")  # above the table, next to the verdict


def test_model_card_body_and_metadata_carry_them(outputs):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.repocard import metadata_load

    card = hub.ModelCard.load(outputs["card"])
    _one_each(_blockquotes(card.text))
    meta = metadata_load(outputs["card"])
    assert meta["license"] == "mit"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["nrc_report_warnings"] == len(WARNINGS)
    assert {r.metric_type for r in card.data.eval_results} >= {"nrc_report_warnings"}
