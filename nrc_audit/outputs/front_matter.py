"""A model card's YAML front matter, changed by a text splice: only nrc-audit's own ``model-index`` result.

The card is the user's document. Re-dumping its front matter would rewrite YAML 1.1 values (``language:
no`` → ``false``, ``1.10`` → ``1.1``, ``0x1F`` → ``31``), drop comments, collapse duplicate keys, and turn
CRLF into LF. So the front matter is parsed only to *find* things (PyYAML's node tree gives the line of
every node) and the text is changed in exactly one place: the nrc-audit result's lines are replaced, or new
lines are inserted (a result at the end of a model's ``results``, a model at the end of ``model-index``, or
a ``model-index`` key at the end of the front matter). Every other byte — a BOM, the line endings, comments,
other results, their formatting — stays. A card whose ``model-index`` cannot be changed that way (flow
style, not a list of models, a duplicated ``model-index`` key, a front matter that is not a block mapping)
is refused with a message instead of being rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nrc_audit.errors import OptionsError

BOM = "\ufeff"
_BREAK = re.compile(r"\r\n|\r|\n|\x85|\u2028|\u2029")  # YAML's line breaks: node marks count these lines


def _yaml() -> Any:
    import yaml  # a declared dependency; imported here so that --help stays fast

    return yaml


def dump(value: Any) -> str:
    return str(_yaml().safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000))


def _lines(text: str) -> list[str]:
    """``text`` cut after each YAML line break (the breaks kept)."""
    out, at = [], 0
    for m in _BREAK.finditer(text):
        out.append(text[at : m.end()])
        at = m.end()
    if at < len(text):
        out.append(text[at:])
    return out


def _bare(line: str) -> str:
    return _BREAK.sub("", line)


@dataclass
class Card:
    """A card cut into its parts: ``bom + opening + front + closing + body`` is the original text."""

    bom: str
    opening: str  # the '---' line, or '' when the card has no front matter
    front: list[str]  # the front matter's lines, breaks kept
    closing: str
    body: str
    newline: str  # the card's own line break, for inserted lines

    def text(self) -> str:
        return self.bom + self.opening + "".join(self.front) + self.closing + self.body


def split(text: str, where: Path | str) -> Card:
    """Cut a card into BOM, front matter lines and body; no front matter: everything is the body."""
    bom = BOM if text.startswith(BOM) else ""
    rest = text[len(bom):]
    lines = _lines(rest)
    first = re.search(r"\r\n|\r|\n", rest)
    newline = first.group(0) if first else "\n"
    if not lines or _bare(lines[0]).rstrip() != "---":
        return Card(bom, "", [], "", rest, newline)
    for i in range(1, len(lines)):
        if _bare(lines[i]).rstrip() == "---":
            return Card(bom, lines[0], lines[1:i], lines[i], "".join(lines[i + 1:]), newline)
    raise OptionsError(f"{where}: the front matter opened by '---' on line 1 is never closed; add a '---' line.")


def parse(card: Card, where: Path | str) -> tuple[Any, dict[str, Any]]:
    """(the front matter's root node or None, its values) — refusing what does not parse or is no mapping."""
    yaml = _yaml()
    source = "".join(card.front)
    try:
        node = yaml.compose(source)
        values = yaml.safe_load(source) if node is not None else {}
    except yaml.YAMLError as exc:
        raise OptionsError(f"{where}: the YAML front matter does not parse ({exc}); fix it first.") from None
    if node is not None and not isinstance(values, dict):
        raise OptionsError(f"{where}: the front matter is a {type(values).__name__}, expected a mapping.")
    return node, values or {}


def _indented(value: Any, column: int, newline: str) -> list[str]:
    """``value`` dumped as block YAML, every line shifted right by ``column`` spaces, with the card's breaks."""
    return [" " * column + line + newline for line in dump(value).splitlines()]


def _span(card: Card, items: list, k: int, end_line: int) -> tuple[int, int, int]:
    """(first line, line after the last, dash column) of block-sequence item ``k``."""
    start = items[k].start_mark.line
    line = _bare(card.front[start]) if start < len(card.front) else ""
    column = len(line) - len(line.lstrip(" "))
    if not line[column:].startswith("-") or items[k].start_mark.column <= column:
        raise unsafe("a list item does not start its own '- ' line")
    stop = items[k + 1].start_mark.line if k + 1 < len(items) else end_line
    while stop > start + 1:  # trailing blank lines and comments of the enclosing level stay where they are
        text = _bare(card.front[stop - 1])
        lead = len(text) - len(text.lstrip(" "))
        if text.strip() and not (text.lstrip().startswith("#") and lead <= column):
            break
        stop -= 1
    return start, stop, column


def unsafe(why: str) -> OptionsError:
    return OptionsError(f"the card's model-index cannot be merged without rewriting it: {why}. nrc-audit changes "
                        "only its own result and keeps every other byte; write the model-index in block style "
                        "(one '- ' item per line), or remove it and re-run to let nrc-audit add one.")  # fmt: skip


def _block_sequence(node: Any, what: str) -> list:
    yaml = _yaml()
    if not isinstance(node, yaml.SequenceNode) or node.flow_style:
        raise unsafe(f"{what} is not a block-style list")
    return list(node.value)


def _end_line(node: Any) -> int:
    """The line after a block node's last line (its end mark sits at column 0 of the next line, or later on
    the last line when the node ends the document without a break)."""
    return node.end_mark.line + (1 if node.end_mark.column > 0 else 0)


def _key(mapping: Any, name: str) -> list:
    return [(k, v) for k, v in mapping.value if getattr(k, "value", None) == name]


def splice_result(card: Card, node: Any, entry_name: str, result: dict[str, Any],
                  same: Callable[[Any], bool], where: Path | str) -> None:  # fmt: skip
    """Put ``result`` into the card's model-index, in place: replacing the results ``same`` matches in the
    model named ``entry_name`` (or the card's only model), else appended; a model or the key added if missing."""
    try:
        _splice(card, node, entry_name, result, same)
    except OptionsError as exc:
        raise OptionsError(f"{where}: {exc}") from None


def _splice(card: Card, node: Any, entry_name: str, result: dict[str, Any], same: Callable[[Any], bool]) -> None:
    yaml, nl = _yaml(), card.newline
    if node is None or (isinstance(node, yaml.MappingNode) and not node.value):
        card.front += [*_indented({"model-index": [{"name": entry_name, "results": [result]}]}, 0, nl)]
        return
    if not isinstance(node, yaml.MappingNode) or node.flow_style:
        raise unsafe("the front matter is not a block mapping")
    found = _key(node, "model-index")
    if len(found) > 1:
        raise unsafe("the front matter has more than one model-index key")
    if not found:
        card.front[:] = card.front[: _end_line(node)] + _indented(
            {"model-index": [{"name": entry_name, "results": [result]}]}, 0, nl) + card.front[_end_line(node):]
        return
    entries = _block_sequence(found[0][1], "model-index")
    values = [yaml.safe_load(yaml.serialize(e)) for e in entries]
    if not entries or not all(isinstance(v, dict) for v in values):
        raise unsafe("model-index is not a list of models (mappings with a name and results)")
    pick = next((k for k, v in enumerate(values) if v.get("name") == entry_name), 0 if len(values) == 1 else None)
    if pick is None:  # another model's card section: ours is added as a model of its own
        start, stop, column = _span(card, entries, len(entries) - 1, _end_line(found[0][1]))
        card.front[stop:stop] = _indented([{"name": entry_name, "results": [result]}], column, nl)
        return
    _splice_into_entry(card, entries[pick], result, same)


def _splice_into_entry(card: Card, entry: Any, result: dict[str, Any], same: Callable[[Any], bool]) -> None:
    yaml, nl = _yaml(), card.newline
    if entry.flow_style:
        raise unsafe("a model in model-index is written in flow style")
    found = _key(entry, "results")
    if len(found) > 1:
        raise unsafe("a model in model-index has more than one results key")
    if not found:
        at = _end_line(entry)
        card.front[at:at] = _indented({"results": [result]}, entry.start_mark.column, nl)
        return
    items = _block_sequence(found[0][1], "results")
    if not items:
        raise unsafe("results is empty or written in flow style")
    end = _end_line(found[0][1])
    spans = [_span(card, items, k, end) for k in range(len(items))]
    ours = [k for k, item in enumerate(items) if same(yaml.safe_load(yaml.serialize(item)))]
    column = spans[0][2]
    new = _indented([result], column, nl)
    if not ours:
        card.front[spans[-1][1]:spans[-1][1]] = new
        return
    for k in reversed(ours[1:]):  # an earlier audit's duplicates go; the first keeps its place
        del card.front[spans[k][0]:spans[k][1]]
    card.front[spans[ours[0]][0]:spans[ours[0]][1]] = new
