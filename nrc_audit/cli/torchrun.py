"""``nrc-audit-torchrun``: torchrun with the ranks' exit code instead of torchrun's own.

torchrun (``torch.distributed.run``) ends with exit 1 and a ``ChildFailedError`` traceback whenever a worker
fails, whatever the worker's code, and with exit 1 and a ``SignalException`` traceback when Ctrl-C or SIGTERM
reaches it. Under it a CI job cannot tell a failed gate (1) from unusable input (2) or an interrupted run (130).
This launcher takes torchrun's arguments unchanged and runs torchrun's own ``main``; it only translates how
torchrun ends:

* every worker exited 0 → 0;
* a worker failed → that worker's exit code (rank 0's when it failed, as every nrc-audit rank exits with the
  same code; a worker killed by signal S → 128 + S);
* the launcher itself got signal S (Ctrl-C: SIGINT) → 128 + S, after torchrun has stopped the workers.

    nrc-audit-torchrun --nproc-per-node 8 -m nrc_audit model.safetensors data.h5 --json report.json
"""

from __future__ import annotations

import sys
from typing import Any


def _exit_code(failures: dict[int, Any]) -> tuple[int, int]:
    """(rank, code) to end with from torchrun's ``{global rank: ProcessFailure}`` (exitcode < 0: killed by signal)."""
    rank = 0 if 0 in failures else min(failures)
    code = int(failures[rank].exitcode)
    return rank, 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun
    except ModuleNotFoundError as exc:  # torch missing: the same answer as nrc-audit's
        from nrc_audit.cli.common import _report_missing_module

        _report_missing_module(exc)
        return 2
    try:
        torchrun(argv)
    except ChildFailedError as exc:  # each rank has printed its own message
        rank, code = _exit_code(exc.failures)
        print(f"nrc-audit-torchrun: {len(exc.failures)} rank(s) failed; rank {rank} exited with {code}", file=sys.stderr)
        return code
    except SignalException as exc:  # torchrun's handler raised it after closing the workers
        print(f"nrc-audit-torchrun: stopped by signal {int(exc.sigval)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    except SystemExit as exc:  # argparse: --help (0) or a bad torchrun option (2)
        return exc.code if isinstance(exc.code, int) else 2
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
