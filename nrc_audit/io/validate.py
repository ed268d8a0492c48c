"""One validation for every external JSON document: reports (``--baseline``, history lines, ``validate``),
store attributes and checkpoint metadata.

Every refusal is a :class:`NrcAuditError` of the caller's kind whose message names the file, the field (a
JSON path such as ``layers[3].nrc1``) and what was expected, so that a hand-edited or hostile document
never reaches the code as a ``KeyError``/``TypeError`` traceback or, worse, as a silently wrong number.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from nrc_audit.errors import NrcAuditError, OptionsError

MAX_DEPTH = 64  # a report nests 4 levels; 64 leaves room for extensions and stops 10⁵-deep bombs cheaply

Check = Callable[[Any], bool]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


# Expected shape of a report (SPEC §5): field → (check, what the message says is expected)
NUMBER_OR_NULL = (_opt(_number), "a finite number or null")
_LAYER = {
    "index": (_integer, "an integer"), "name": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: isinstance(v, str), "a string"), "in_dim": (_integer, "an integer"),
    "out_dim": (_integer, "an integer"), "pooled": (lambda v: isinstance(v, bool), "true or false"),
    "collapsed": (lambda v: isinstance(v, bool), "true or false"),
    "passed": (lambda v: isinstance(v, dict) and all(isinstance(x, bool) for x in v.values()),
               "an object of true/false values"),
    "warnings": (_list_of(lambda x: isinstance(x, str)), "a list of strings"),
    "bound": (lambda v: isinstance(v, dict), "an object"),
}  # fmt: skip
_LAYER_METRICS = ("nrc1", "nrc2", "nrc3", "nrc4", "nrc4_ratio", "cka_signal", "noise_alignment",
                  "stable_rank", "stable_rank_cov", "stable_rank_w")  # fmt: skip
_SUMMARY = {
    "num_layers": (_integer, "an integer"), "collapsed_layers": (_list_of(_integer), "a list of integers"),
    "not_collapsed_layers": (_list_of(_integer), "a list of integers"),
    "collapse_onset": (_opt(_integer), "an integer or null"), "gate": (lambda v: isinstance(v, dict), "an object"),
}  # fmt: skip
_GATE = {"require_collapsed": (_integer, "an integer"), "passed": (lambda v: isinstance(v, bool), "true or false"),
         "failing_layers": (_list_of(_integer), "a list of integers")}  # fmt: skip
_TOP = {name: (lambda v: isinstance(v, dict), "an object") for name in ("tool", "model", "data", "settings", "target")}


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, without recursion (stops counting past ``limit``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def parse_json(text: str, source: str, error: type[NrcAuditError] = OptionsError, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``max_depth`` and non-finite constants.

    json's C parser raises RecursionError for a 10⁵-deep document (caught here); shallower excess nesting
    is measured on the parsed value without recursion.
    """
    def _no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON (write null for an undefined value)")

    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            exc = f"nested deeper than Python can parse; expected at most {max_depth} levels"  # type: ignore[assignment]
        raise error(f"{source} is not valid JSON ({exc}).") from None
    if depth(value, max_depth) > max_depth:
        raise error(f"{source}: the JSON document is nested more than {max_depth} levels deep; expected a "
                    "document written by nrc-audit (a report nests 4 levels).")
    return value


def _check_fields(doc: Any, spec: dict, where: str, source: str, error: type[NrcAuditError]) -> None:
    if not isinstance(doc, dict):
        raise error(f"{source}: {where or 'the document'} is {type(doc).__name__}; expected a JSON object.")
    missing = [k for k in spec if k not in doc]
    if missing:
        raise error(f"{source}: {where + '.' if where else ''}{missing[0]} is missing (all missing: {missing}); "
                    "expected a complete nrc-audit-report/1 document. Re-run the audit with --json.")  # fmt: skip
    for key, (check, expected) in spec.items():
        if not check(doc[key]):
            raise error(f"{source}: {where + '.' if where else ''}{key} is {_show(doc[key])}; expected {expected}.")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return (text[:60] + "…") if len(text) > 60 else text


def check_report(doc: Any, source: str, error: type[NrcAuditError] = OptionsError) -> dict[str, Any]:
    """Validate a parsed ``nrc-audit-report/1`` document; returns it unchanged.

    Raises ``error`` naming ``source``, the field and what was expected.
    """
    if depth(doc) > MAX_DEPTH:
        raise error(f"{source}: the JSON document is nested more than {MAX_DEPTH} levels deep.")
    _check_fields(doc, {"schema": (lambda v: v == "nrc-audit-report/1", '"nrc-audit-report/1"'), **_TOP,
                        "model_mse": NUMBER_OR_NULL, "layers": (lambda v: isinstance(v, list), "a list"),
                        "summary": (lambda v: isinstance(v, dict), "an object")}, "", source, error)  # fmt: skip
    for i, layer in enumerate(doc["layers"]):
        _check_fields(layer, {**_LAYER, **{m: NUMBER_OR_NULL for m in _LAYER_METRICS}}, f"layers[{i}]", source, error)
    _check_fields(doc["summary"], _SUMMARY, "summary", source, error)
    _check_fields(doc["summary"]["gate"], _GATE, "summary.gate", source, error)
    return doc


def check_tolerance(value: Any, source: str = "--baseline-tolerance") -> float:
    """A baseline tolerance: a finite number ≥ 0 (NaN would disable every metric check, a negative one
    would flag an identical report)."""
    if not _number(value) or value < 0:
        raise OptionsError(f"{source} {value!r}: expected a finite number ≥ 0 (e.g. 0.05); NaN disables the "
                           "metric checks and a negative tolerance flags even an identical report.")  # fmt: skip
    return float(value)


def json_object_of_scalars(raw: Any, source: str, field: str, error: type[NrcAuditError]) -> dict[str, Any]:
    """Parse a metadata/attribute string that must hold a JSON object (e.g. ``nrc_audit.model_kwargs``)."""
    if not isinstance(raw, str):
        raise error(f"{source}: {field} is {type(raw).__name__}; expected a JSON object in a string.")
    value = parse_json(raw, f"{source}: {field}", error)
    if not isinstance(value, dict):
        raise error(f"{source}: {field} is {_show(value)}; expected a JSON object such as {{\"width\": 64}}.")
    return value


def env_int(name: str, default: int) -> int:
    """An integer torchrun variable (RANK, WORLD_SIZE, LOCAL_RANK); junk is an OptionsError, not a traceback."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise OptionsError(f"{name}={shown!r} is not a non-negative integer; torchrun sets it for each rank. Unset "
                           "it to run one process, or launch with `torchrun --nproc-per-node N -m nrc_audit …`.")
    return value


MAX_DOCUMENT_BYTES = 64 << 20  # a report is a few KB; a history of thousands of them still fits
REPORT_DOCUMENT = "a JSON report written by nrc-audit (a few KB): pass the file --json wrote"


def read_document(path: Any, source: str, error: type[NrcAuditError] = OptionsError,
                  cap: int = MAX_DOCUMENT_BYTES, expected: str = REPORT_DOCUMENT) -> str:  # fmt: skip
    """The UTF-8 text of a JSON document, read with a size cap (``/dev/zero`` or a huge file is refused after
    ``cap`` bytes instead of growing memory without bound).

    Args:
        path: the file (``str`` or ``PathLike``); a FIFO or character device is read like a file, up to the cap.
        source: how messages name the file, e.g. ``"--baseline r.json"``.
        error: the exception raised for a missing, unreadable, oversized or non-UTF-8 file.
        cap: the most bytes read; one more means the file is refused.
        expected: what the file should be, ending the messages ("expected …").
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except FileNotFoundError:
        raise error(f"{source}: file not found.") from None
    except OSError as exc:
        raise error(f"{source} cannot be read ({exc.strerror or exc}).") from None
    if len(data) > cap:
        raise error(f"{source} is larger than {cap >> 20} MiB; expected {expected}.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{source} is not UTF-8 text ({exc}); expected {expected}.") from None
