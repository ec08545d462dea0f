"""The exception tree and its exit codes.

Every error a user can cause is one of these. Library exceptions (OSError, json, safetensors,
huggingface_hub) are translated where the library is called, with ``raise ... from err``, so the
CLI boundary only has to map a class to an exit code and print ``message`` and ``hint``.
The table in docs/errors.md is checked against this module by a test.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
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


# -- signals ----------------------------------------------------------------------------------
# The CLI's handlers for SIGINT and SIGTERM raise in the main thread, wherever it is. Two places
# lose that exception: threading.Thread.start() (raised between the new thread's registration
# and its first step, the thread dies in its bootstrap and prints a traceback under the clean
# error message: "del _limbo[self]: KeyError"), and code where Python only reports an exception
# and goes on (a weakref callback or __del__ run by the garbage collector: the run would then
# finish and publish its output). So threads are started inside ``signals_deferred()``, whose
# end raises a signal that came meanwhile, and the signal is also kept until the run ends:
# ``check_signals()`` raises it again at the points where a run commits to something (each
# item of the streaming loop, and before the output is moved into place).
_deferral = {"depth": 0}
_arrived: list[BaseException] = []


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only
        return
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        if not _deferral["depth"]:
            check_signals()


def raise_or_defer(err: BaseException) -> None:
    """What a signal handler does: keep ``err`` for the run, and raise it now unless a thread
    is being started (then at the end of that block)."""
    if not _arrived:
        _arrived.append(err)
    if not _deferral["depth"]:
        raise err


def check_signals() -> None:
    """Raise the signal that arrived during this run, if any (its first raise may be lost)."""
    if _arrived and threading.current_thread() is threading.main_thread():
        raise _arrived[0]


def clear_signals() -> None:
    """A run's end (or start): signals before it belong to no run."""
    _arrived.clear()
