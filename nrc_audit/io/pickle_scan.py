"""Read a ``.pt`` file's pickle opcode by opcode before ``torch.load`` runs it.

``weights_only=True`` stops code execution, not allocation: it allows builtins such as ``bytearray``, so a
3 KB pickle calling ``bytearray(2_000_000_000)`` allocates 2 GB inside ``torch.load``, before any check on
the loaded object can run. :func:`check_pt_pickle` walks the opcodes (``pickletools.genops``: nothing is
built) and refuses, naming what it found:

- a global a state dict never needs: only torch's own names (tensor rebuilders, storages, dtypes),
  ``collections.OrderedDict`` and ``_codecs.encode`` (how protocol 2 writes ``bytes``) are accepted;
- storages whose declared sizes together exceed the memory budget (io/plan.py).

It scans the zip format's ``*/data.pkl`` entry and the first pickles of the legacy format; anything it
cannot parse is left to ``torch.load`` (reported there as a damaged file).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import IO, Any

from nrc_audit.errors import CheckpointError
from nrc_audit.io.plan import memory_budget

MAX_PICKLE_BYTES = 64 << 20  # the object pickle of a state dict is ~100 bytes per tensor
_ALLOWED = {("collections", "OrderedDict"), ("_codecs", "encode")}
_ENDS_MARK = {"TUPLE", "LIST", "DICT", "SETITEMS", "APPENDS", "ADDITEMS", "FROZENSET", "OBJ", "INST", "POP_MARK"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_LEGACY_PICKLES = 4  # magic number, protocol, sys info, the object (then storage keys and raw bytes)


def _allowed(module: str, name: str) -> bool:
    return (module, name) in _ALLOWED or module == "torch" or module.startswith("torch.")


def _refuse(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused to load — the pickle {what}, which a state dict never holds; rebuilding it "
                           "would execute code or allocate memory before any check. nrc-audit only reads plain "
                           "state dicts (torch.load(weights_only=True), after reading the pickle's opcodes). Save "
                           "model.state_dict() instead, or convert to .safetensors.")  # fmt: skip


def _scan(stream: IO[bytes], path: Path, budget: int) -> int:
    """Walk one pickle; returns the bytes its storages declare. Raises CheckpointError on a refused object."""
    stack: list[list[Any]] = [[]]  # values since each MARK: enough to read torch's persistent-id tuples
    strings: list[str] = []  # the last two string constants: the operands of STACK_GLOBAL
    memo: dict[Any, Any] = {}
    declared = 0
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "STACK_GLOBAL", "INST"):
            module, _, attr = (str(arg).partition(" ") if name != "STACK_GLOBAL" else
                               (strings[-2] if len(strings) > 1 else "?", " ", strings[-1] if strings else "?"))  # fmt: skip
            if not _allowed(module, attr):
                shown = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2's name
                raise _refuse(path, f"contains a {shown}.{attr} object")
        if name in ("GLOBAL", "INST"):
            stack[-1].append(arg)
        elif name in _MEMO_PUT:  # the top value, remembered: torch's later storage tuples fetch 'storage' back
            memo[len(memo) if arg is None else arg] = stack[-1][-1] if stack[-1] else None
        elif name in _MEMO_GET:
            stack[-1].append(memo.get(arg))
        elif name == "MARK":
            stack.append([])
        elif name in _ENDS_MARK and len(stack) > 1:
            items = stack.pop()
            stack[-1].append(tuple(items) if name in ("TUPLE", "LIST") else None)
        elif name in ("BINPERSID", "PERSID"):
            pid = stack[-1][-1] if stack[-1] else None
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
                declared += max(0, pid[4])  # ('storage', type, key, location, size): its numel or nbytes
                if declared > budget:
                    break
        elif arg is not None and not isinstance(arg, (bytes, bytearray)):
            stack[-1].append(arg)
            if isinstance(arg, str):
                strings = [*strings[-1:], arg]
    return declared


def check_pt_pickle(path: Path) -> None:
    """Refuse a ``.pt`` whose pickle builds objects no state dict holds, or declares storages over the budget."""
    budget = memory_budget()
    try:
        declared = _scan_file(Path(path), budget)
    except CheckpointError:
        raise
    except Exception:  # damaged or foreign: torch.load names it with its own words
        return
    if declared > budget:
        raise CheckpointError(f"{path}: its pickle declares tensor storages of at least {declared / (1 << 30):.3g} "
                              f"G values, more than the memory budget of {budget / (1 << 30):.3g} GiB (NRC_AUDIT_MAX_MEMORY or "
                              "MemAvailable); it would be allocated before any check. Audit on a larger machine.")


def _scan_file(path: Path, budget: int) -> int:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            entries = [e for e in zf.infolist() if e.filename.endswith("data.pkl")]
            declared = 0
            for entry in entries:
                if entry.file_size > MAX_PICKLE_BYTES:
                    raise _refuse(path, f"is {entry.file_size} bytes long (a state dict's is far under "
                                        f"{MAX_PICKLE_BYTES >> 20} MiB)")  # fmt: skip
                with zf.open(entry) as fh:
                    declared += _scan(io.BytesIO(fh.read()), path, budget)
            return declared
    declared = 0
    with open(path, "rb") as fh:
        for _ in range(_LEGACY_PICKLES):
            declared += _scan(fh, path, budget)
    return declared
