"""ASCII consoles get ASCII output (an ASCII-only stdout: ``PYTHONIOENCODING=ascii``, ``LC_ALL=C`` without
UTF-8 mode). Rich draws table and panel borders with ``box.ASCII`` there by itself; this module spells the
text's own symbols (✓ ✗ ≤ · × …) in ASCII *before* Rich lays a table out, so the columns stay aligned. A
character with no spelling here is written as '?' by the stream (cli/streams.py), never an error.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderHook
from rich.panel import Panel
from rich.table import Table
from rich.text import Span, Text

TO_ASCII = str.maketrans({
    "✓": "ok", "✗": "no", "⚠": "(!)", "≤": "<=", "≥": ">=", "≠": "!=", "≈": "~", "±": "+-", "·": "-", "×": "x",
    "√": "sqrt ", "−": "-", "–": "-", "—": "-", "…": "...", "→": "->", "←": "<-", "‖": "||", "²": "^2", "³": "^3",
    "⁺": "+", "ᵀ": "^T", "Σ": "Sum", "Δ": "Delta", "λ": "lambda", "μ": "mu", "σ": "sigma", "δ": "delta", "ℓ": "l",
    "⊥": "_perp", "∈": " in ", "°": " deg", "‘": "'", "’": "'", "“": '"', "”": '"',
})  # fmt: skip


def to_ascii(obj: Any) -> Any:
    """``obj`` with its text spelled in ASCII: str and Text directly; Table, Panel and Group through their
    titles, headers and cells (in place). Anything else is returned as it is."""
    if isinstance(obj, str):
        return obj.translate(TO_ASCII)
    if isinstance(obj, Text):
        return _text(obj)
    if isinstance(obj, Table):
        obj.title, obj.caption = to_ascii(obj.title), to_ascii(obj.caption)
        for column in obj.columns:
            column.header, column.footer = to_ascii(column.header), to_ascii(column.footer)
            # Rich keeps a column's cells in the private list ``_cells`` (the public ``cells`` only iterates)
            column._cells = [to_ascii(cell) for cell in column._cells]
        return obj
    if isinstance(obj, Panel):
        obj.renderable, obj.title, obj.subtitle = to_ascii(obj.renderable), to_ascii(obj.title), to_ascii(obj.subtitle)
        return obj
    if isinstance(obj, Group):
        obj.renderables[:] = [to_ascii(r) for r in obj.renderables]
        return obj
    return obj


def _text(text: Text) -> Text:
    """A Text spelled in ASCII with its styles kept: cut at every span boundary, each piece spelled on its own."""
    cuts = sorted({s.start for s in text.spans} | {s.end for s in text.spans})
    out = Text(style=text.style, justify=text.justify, overflow=text.overflow, no_wrap=text.no_wrap, end=text.end)
    for piece in text.divide(cuts):
        plain = piece.plain.translate(TO_ASCII)
        out.append_text(Text(plain, spans=[Span(0, len(plain), s.style) for s in piece.spans]))
    return out


class _AsciiHook(RenderHook):
    def __init__(self, console: Console) -> None:
        self.console = console

    def process_renderables(self, renderables: list) -> list:
        return [to_ascii(r) for r in renderables] if self.console.options.ascii_only else renderables


def console(**options: Any) -> Console:
    """A Rich Console (``options`` as for Console) that spells its output in ASCII whenever its stream's
    encoding is not UTF (decided at each print: the stream is looked up when written)."""
    made = Console(**options)
    made.push_render_hook(_AsciiHook(made))
    return made
