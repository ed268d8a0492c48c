"""The package's exception tree and the exit-code contract.

Every user-facing failure is an :class:`NrcAuditError`; the CLI turns it into exit code 2 in exactly
one place (``cli.main``). Library callers (``nrc_audit.audit``) get the exceptions themselves.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes (ruff/pytest convention, SPEC §6)."""

    OK = 0  # audit ran and the gate passed
    GATE_FAILED = 1  # one of the last --require-collapsed layers is not collapsed
    USAGE = 2  # unusable input or options
    SIGHUP = 129  # the terminal went away (hang-up)
    SIGINT = 130  # interrupted (Ctrl-C)
    SIGTERM = 143  # terminated


class NrcAuditError(Exception):
    """Unusable input or options. The message says what was found, what was expected, and the fix."""

    exit_code = ExitCode.USAGE


class OptionsError(NrcAuditError):
    """An option value or a combination of options that cannot work."""


class CheckpointError(NrcAuditError):
    """A checkpoint that cannot be read or does not match any architecture."""


class DatasetError(NrcAuditError):
    """A dataset that cannot be read, or whose arrays are unusable (shape, dtype, NaN/Inf, length)."""


class ModelDataMismatchError(NrcAuditError):
    """The model and the dataset do not fit together (input width, output shape)."""


class FeatureStoreError(NrcAuditError):
    """A feature store that is missing, incomplete or of another schema."""


class PlanError(NrcAuditError):
    """What the audit would need (memory, disk, modules), estimated from headers, cannot fit or is absurd."""


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM; carries the exit code to use."""

    def __init__(self, exit_code: ExitCode) -> None:
        super().__init__(f"interrupted ({exit_code.name})")
        self.exit_code = exit_code
