"""Data flows one way (STYLE.md): a module imports only from the layers below it.

cli → commands/outputs → pipeline/api → io/extract/store/stats → conditions → report → render, with the
math (stats, conditions) importing no I/O. Imports inside functions count too: laziness is no licence to
point upwards, except the few presentation hooks listed in ALLOWED_LAZY.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "nrc_audit"
RANK = {
    "errors": 0, "_kernels": 0, "config": 1, "settings_file": 1,
    "stats": 2, "models": 2, "models.mlp": 2, "models.resnet": 3, "models.base": 2,
    "io": 2, "io.checkpoint": 2, "io.dataset": 2, "io.architecture": 4, "extract": 2,
    "conditions": 3, "store": 3, "distributed": 3,
    "report": 4, "baseline": 5, "render": 5, "markdown": 5, "plot": 5, "trend": 5,
    "pipeline": 6, "api": 7, "monitor": 8, "outputs": 8,
    "cli": 9, "commands": 10, "__main__": 11,
}  # fmt: skip
ALLOWED_LAZY = {("report", "render"), ("io.architecture", "models.resnet"), ("cli", "commands"),
                ("cli", "pipeline"), ("__init__", "*")}  # fmt: skip


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nrc_audit"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            yield node, names
        elif isinstance(node, ast.Import):
            yield node, [a.name for a in node.names if a.name.startswith("nrc_audit")]


def _module_name(path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def test_every_module_is_ranked():
    names = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert names - set(RANK) - {"__init__"} == set(), "rank new modules in tests/test_layering.py"


def test_imports_point_downwards():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        for node, names in _imports(path):
            targets = {n.removeprefix("nrc_audit").lstrip(".") for n in names}
            targets = {t for t in targets if t in RANK}
            for target in targets:
                if (me, target) in ALLOWED_LAZY or (me, "*") in ALLOWED_LAZY:
                    continue
                if RANK[target] >= RANK[me] and target != me:
                    bad.append(f"{me} (rank {RANK[me]}) imports {target} (rank {RANK[target]}), line {node.lineno}")
    assert not bad, "\n".join(bad)
