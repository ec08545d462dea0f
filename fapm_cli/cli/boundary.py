"""The one place where exceptions become messages and exit codes.

Every command body runs inside ``boundary``: a ``FapmError`` prints ``error: ...`` and its hint
on stderr and exits with the error's code; SIGINT and SIGTERM exit 130 after the engine has
removed its partial output; anything else is a bug, reported as such (exit 1). ``--debug`` (or
``FAPM_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer

from fapm_cli.errors import ExitCode, FapmError, Interrupted, clear_signals, raise_or_defer

P = ParamSpec("P")
R = TypeVar("R")

_state = {"debug": os.environ.get("FAPM_DEBUG", "") not in ("", "0")}


def set_debug(value: bool) -> None:
    _state["debug"] = _state["debug"] or value


def _on_sigterm(signum: int, frame: Any) -> None:
    raise_or_defer(
        Interrupted(
            "terminated by SIGTERM; nothing was written",
            hint="the inputs are unchanged; run the command again to finish",
        )
    )


def _on_sigint(signum: int, frame: Any) -> None:
    raise_or_defer(KeyboardInterrupt())


def _print_error(message: str, hint: str | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def boundary(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # Handlers are restored afterwards (the command may run inside a test runner or a
        # caller's process), and only set from the main thread, the only one allowed to.
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
            if hasattr(signal, "SIGXFSZ"):
                # Over RLIMIT_FSIZE, write() then fails with EFBIG (reported as a resource
                # error) instead of the process being killed with the temporary output left.
                previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        clear_signals()
        try:
            return _run(fn, *args, **kwargs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            clear_signals()

    return wrapper


def _run(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    try:
        result = fn(*args, **kwargs)
        sys.stdout.flush()  # a closed pipe shows here, not later in click (which exits 1)
        return result
    except typer.Exit:
        raise
    except FapmError as err:
        if _state["debug"]:
            traceback.print_exc()
        _print_error(err.message, err.hint)
        raise typer.Exit(int(err.exit_code)) from None
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        _print_error(
            "interrupted; nothing was written",
            "the inputs are unchanged; run the command again to finish",
        )
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except BrokenPipeError:
        # The reader of stdout is gone (``fapm inspect BIG --tensors | head -3``): end quietly
        # with the shell's code for SIGPIPE. stdout now points at /dev/null, so that Python's
        # own flush at exit does not fail again on the closed pipe.
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(int(ExitCode.BROKEN_PIPE)) from None
    except MemoryError:
        _print_error(
            "out of memory",
            "fapm needs about 2.5x the largest tensor's float32 size; free memory",
        )
        raise typer.Exit(int(ExitCode.RESOURCES)) from None
    except Exception as err:
        if _state["debug"]:
            traceback.print_exc()
        _print_error(
            f"internal error: {type(err).__name__}: {err}",
            "this is a bug in fapm; please report it with the output of --debug",
        )
        raise typer.Exit(int(ExitCode.INTERNAL)) from None
