"""Data flows one way (STYLE.md): a module imports only from the layers below it, with no exception list.

Layers, bottom to top: errors/config → core (pure math) → io → models → outputs → engine (the audit pass)
→ integrations (training callbacks) → cli. Inside a layer, modules are ranked too (e.g. outputs.records below outputs.render below
outputs.report). Imports inside functions count: laziness is no licence to point upwards. The package's
``__init__`` (lazy public names) and ``__main__`` sit above everything.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "nrc_audit"
LAYERS = ["version", "errors", "config", "core", "io", "models", "outputs", "engine", "integrations", "cli"]
# Order inside a layer (lower first); a module not listed ranks below every listed one of its layer.
WITHIN = {
    "core": ["layer", "kernels", "facts", "stats", "verdicts", "spectra", "conditions", "diagnostics"],
    "io": ["lifecycle", "files", "validate", "plan", "settings_file", "fingerprint", "pickle_scan", "checkpoint", "hf_layout", "training_position", "pandas_hdf", "dataset", "store_check", "store_lock", "store"],
    "models": ["base", "mlp", "resnet", "hf", "architecture"],
    "outputs": ["charset", "context", "records", "render", "markdown", "front_matter", "model_card", "plot", "report", "build", "history", "baseline", "ci", "trend", "emit"],
    "engine": ["threads", "flops", "overlap", "model_io", "layer_kinds", "extract", "pipeline", "distributed", "run", "api", "monitor"],
    "integrations": ["probe", "common", "lightning", "transformers"],
    "cli": ["streams", "common", "options", "commands", "app", "reference", "torchrun"],
}
TOP = {"__init__", "__main__"}


def _module_name(path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def rank(module: str) -> tuple[int, int]:
    """(layer, position in the layer) of a module such as ``outputs.render`` or ``core``."""
    if module in TOP:
        return (len(LAYERS), 0)
    layer, _, rest = module.partition(".")
    order = WITHIN.get(layer, [])
    inner = order.index(rest) + 1 if rest in order else 0
    return (LAYERS.index(layer), inner)


def _imports(path):
    yield from _imports_in(path.read_text())


def _imports_in(source: str):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nrc_audit"):
            base = node.module.removeprefix("nrc_audit").lstrip(".")
            for alias in node.names:  # "from nrc_audit.engine import pipeline" imports engine.pipeline
                full = f"{base}.{alias.name}".lstrip(".")
                yield node, full if _is_module(full) else base
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nrc_audit"):
                    yield node, alias.name.removeprefix("nrc_audit").lstrip(".")


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_module_is_placed():
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        if me in TOP:
            continue
        layer, _, rest = me.partition(".")
        assert layer in LAYERS, f"{me}: put it in one of the layers {LAYERS} (tests/test_layering.py)"
        if rest:
            assert rest in WITHIN.get(layer, []), f"{me}: rank it inside its layer in tests/test_layering.py"


def _upward(me: str, source: str) -> list[str]:
    """The imports of module ``me`` (its source text) that point sideways or upwards."""
    bad = []
    for node, target in _imports_in(source):
        if not target or target == me or me.startswith(target + "."):
            continue  # the package root (__version__) or one's own package's __init__
        if me in TOP:
            continue
        if rank(target) >= rank(me):
            bad.append(f"{me} {rank(me)} imports {target} {rank(target)}, line {node.lineno}")
    return bad


def test_imports_point_downwards():
    bad = [line for path in PACKAGE.rglob("*.py") for line in _upward(_module_name(path), path.read_text())]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_layers():
    """The rule above implies it; stated on its own so a failure names the circle."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        edges.setdefault(me, set()).update(t for _, t in _imports(path) if t and t != me and me not in TOP)
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in edges.get(node, ()):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in seen:
                visit(nxt, stack + [nxt])
        seen[node] = 2

    for node in list(edges):
        if node not in seen:
            visit(node, [node])


def test_the_rule_catches_an_upward_import():
    """The check above, fed imports it must refuse (and ones it must let through), not only the real tree."""
    lazy = "def f():\n    from nrc_audit.outputs import report\n"  # inside a function, one layer's own module
    assert _upward("outputs.render", lazy) == ["outputs.render (6, 4) imports outputs.report (6, 9), line 2"]
    assert len(_upward("core.stats", "import nrc_audit.cli\nfrom nrc_audit.io.store import FeatureStore\n")) == 2
    assert _upward("core.stats", "from nrc_audit.core import stats\n") == []  # itself: not an import of a layer
    assert _upward("io.store", "from nrc_audit.io import checkpoint\nfrom nrc_audit.core.stats import merge\n") == []
    assert _upward("engine.run", "from nrc_audit.engine import pipeline, monitor\n") == [
        f"engine.run {rank('engine.run')} imports engine.monitor {rank('engine.monitor')}, line 1"]  # fmt: skip


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80  # issue 15: small modules with one job, small functions


def _sizes():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        functions = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]  # fmt: skip
        yield path.relative_to(PACKAGE), len(source.splitlines()), functions


def test_modules_and_functions_stay_small():
    too_long = [f"{path}: {n} lines" for path, n, _ in _sizes() if n > MAX_MODULE_LINES]
    too_long += [f"{path}:{name}: {n} lines" for path, _, functions in _sizes() for name, n in functions
                 if n > MAX_FUNCTION_LINES]  # fmt: skip
    assert not too_long, "split these: " + "; ".join(too_long)
