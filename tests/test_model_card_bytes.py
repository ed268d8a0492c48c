"""A model card is the user's document: ``--model-card`` changes only nrc-audit's own model-index result and
keeps every other byte (BOM, CRLF, comments, YAML 1.1 values, duplicate keys, other results); a card it cannot
change in place is refused with exit 2 before the pass. The result is read back with huggingface_hub's own
parser (``metadata_load``, ``ModelCard.load``)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from nrc_audit.cli.app import audit_app

LOOSE = ["--nrc1-max", "1", "--nrc2-min", "0", "--nrc3-min", "0", "--nrc4-ratio-max", "1e9", "--noise-alignment-max", "1"]
TASK = "Deep Neural Regression Collapse audit"

# Everything a re-dump would damage: a BOM, CRLF, YAML 1.1 scalars, comments, a duplicate key, flow lists,
# another result whose value is written 1.10, and a body with its own CRLF lines.
USER_FRONT = (
    "language: no  # Norwegian, not false\r\n"
    "version: 1.10\r\n"
    "mask: 0x1F\r\n"
    "tags: [regression, 'tabular']\r\n"
    "tags: [duplicate]\r\n"
    "# the user's comment\r\n"
    "model-index:\r\n"
    "- name: mlp\r\n"
    "  results:\r\n"
    "  - task: {type: tabular-regression}\r\n"
    "    dataset:\r\n"
    "      type: someone/other-data   # theirs\r\n"
    "      name: Other\r\n"
    "    metrics:\r\n"
    "    - {type: mse, value: 1.10}\r\n"
    "license: mit\r\n"
)
USER_BODY = "\r\n# mlp\r\n\r\nIntro text.\r\n"
CARD = "\ufeff---\r\n" + USER_FRONT + "---\r\n" + USER_BODY


def run(*args):
    return CliRunner().invoke(audit_app, [str(a) for a in args])


def audit(case, card, *more):
    return run(case["ckpt"], case["data"], "--no-features", "-q", "--model-card", card, *more)


def test_card_with_bom_crlf_and_yaml_1_1_values_keeps_every_other_byte(mlp_case, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    card = tmp_path / "README.md"
    card.write_bytes(CARD.encode())
    assert audit(mlp_case, card, "--dataset-id", "someone/my-data", *LOOSE).exit_code == 0
    text = card.read_bytes().decode()
    assert text.startswith("\ufeff---\r\n") and text.count("---\r\n") == 2  # one front matter, still first
    assert "\n" not in text.replace("\r\n", "")  # every line break is still CRLF
    ours = text.index("  - task:\r\n      type: tabular-regression\r\n      name: " + TASK)
    assert text[:ours] == CARD[:ours]  # every byte before our result is the user's
    assert text[ours:].split("license: mit\r\n---\r\n", 1)[1].startswith(USER_BODY)  # and the body follows as it was
    meta = hub.metadata_load(card)
    assert meta["license"] == "mit" and meta["version"] == 1.1 and meta["mask"] == 31  # the Hub reads them as before
    results = hub.ModelCard.load(card).data.eval_results
    assert sorted(r.dataset_type for r in results if r.metric_type == "mse") == ["someone/other-data"]
    assert "model_mse" in {r.metric_type for r in results if r.dataset_type == "someone/my-data"}
    once = card.read_bytes()
    assert audit(mlp_case, card, "--dataset-id", "someone/my-data", *LOOSE).exit_code == 0
    assert card.read_bytes() == once  # idempotent: our result replaced in place


def test_our_result_is_replaced_in_place_and_other_models_and_results_untouched(mlp_case, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    card = tmp_path / "README.md"
    card.write_text("---\nmodel-index:\n- name: other-model\n  results: []\n- name: x\n  results: []\n---\nhi\n")
    assert audit(mlp_case, card, "--dataset-id", "me/d", *LOOSE).exit_code == 0  # two models, none ours: a third
    text = card.read_text()
    assert text.startswith("---\nmodel-index:\n- name: other-model\n  results: []\n- name: x\n  results: []\n- name: mlp\n")
    assert [e["name"] for e in hub.metadata_load(card)["model-index"]] == ["other-model", "x", "mlp"]
    first = card.read_text()
    assert audit(mlp_case, card, "--dataset-id", "me/d").exit_code == 1  # other thresholds: our result changes
    second = card.read_text()
    assert second != first and second.count(TASK + "\n") == 1 + first.count(TASK + "\n") - 1
    assert second.split("- name: mlp\n")[0] == first.split("- name: mlp\n")[0]


@pytest.mark.parametrize("front", [
    "model-index: [{name: mlp, results: []}]\n",  # flow style: no line of its own to replace
    "model-index:\n  name: mlp\n",  # a mapping, not a list of models
    "model-index: oops\n",
    "model-index:\n- name: a\n  results: []\nmodel-index:\n- name: b\n  results: []\n",  # duplicated key
    "model-index:\n- name: mlp\n  results: {task: 1}\n",
], ids=["flow", "mapping", "scalar", "duplicate-key", "results-mapping"])  # fmt: skip
def test_card_that_cannot_be_merged_in_place_exits_2_before_the_pass_untouched(mlp_case, tmp_path, front):
    card = tmp_path / "README.md"
    card.write_text("---\n" + front + "---\nbody\n")
    before = card.read_bytes()
    result = audit(mlp_case, card, "--dataset-id", "me/d", "--json", tmp_path / "r.json")
    assert result.exit_code == 2, result.stderr
    assert "cannot be merged without rewriting it" in " ".join(result.stderr.split())
    assert card.read_bytes() == before and not (tmp_path / "r.json").exists()


def test_card_without_front_matter_or_model_index_gets_lines_added_only(mlp_case, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    card = tmp_path / "README.md"
    card.write_text("---\nlanguage: no\nthreshold: 1.10\n---\n# Mine\n")
    assert audit(mlp_case, card, "--dataset-id", "me/d", *LOOSE).exit_code == 0
    assert card.read_text().startswith("---\nlanguage: no\nthreshold: 1.10\nmodel-index:\n- name: mlp\n")
    assert hub.ModelCard.load(card).data.eval_results[0].dataset_type == "me/d"
    bare = tmp_path / "BARE.md"
    bare.write_text("# Just a title\n")
    assert audit(mlp_case, bare, "--dataset-id", "me/d", *LOOSE).exit_code == 0
    assert bare.read_text().startswith("---\nmodel-index:\n") and "---\n# Just a title\n" in bare.read_text()
    assert hub.ModelCard.load(bare).data.eval_results[0].dataset_type == "me/d"
