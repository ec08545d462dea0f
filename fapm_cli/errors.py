"""The exception tree and its exit codes.

Every error a user can cause is one of these. Library exceptions (OSError, json, safetensors,
huggingface_hub) are translated where the library is called, with ``raise ... from err``, so the
CLI boundary only has to map a class to an exit code and print ``message`` and ``hint``.
The table in docs/errors.md is checked against this module by a test.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug in fapm: please report it (run with --debug for the traceback)
    USAGE = 2  # bad flags or flag combinations
    INPUT = 3  # a source is missing, unreadable, malformed or unsafe
    MISMATCH = 4  # base and finetuned (or task vectors) do not pair up
    OUTPUT = 5  # the output cannot be written where asked
    RESOURCES = 6  # disk full, file-size limit, out of memory
    INTERRUPTED = 130  # SIGINT or SIGTERM: nothing was written
    BROKEN_PIPE = 141  # stdout's reader went away (``| head``): ended quietly, as Unix tools do


class FapmError(Exception):
    """Base class: a one-line ``message`` naming the file or tensor, and a ``hint``."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(FapmError):
    exit_code = ExitCode.USAGE


class InputError(FapmError):
    exit_code = ExitCode.INPUT


class MismatchError(FapmError):
    exit_code = ExitCode.MISMATCH


class OutputError(FapmError):
    exit_code = ExitCode.OUTPUT


class ResourceError(FapmError):
    exit_code = ExitCode.RESOURCES


class Interrupted(FapmError):
    exit_code = ExitCode.INTERRUPTED
