"""How results reach a person or a script: JSON on stdout, tables for people, warnings on stderr,
progress bars on a terminal. Colour and bars only appear on a terminal, never when ``NO_COLOR`` is
set (colour) or ``--quiet`` is given. Nothing in ``report`` imports torch or the engine: it
renders the plain records of ``fapm_cli.records``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

JSON_SCHEMA_VERSION = 1
T = TypeVar("T")


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def console(stream: TextIO | None = None) -> Any:
    from rich.console import Console

    class PipedConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich would exit 1 (the code fapm keeps for bugs): let the CLI's boundary end a
            # closed pipe the Unix way instead (exit 141, nothing on stderr).
            raise BrokenPipeError

    stream = stream or sys.stdout
    return PipedConsole(
        file=stream,
        no_color="NO_COLOR" in os.environ,
        force_terminal=None,
        highlight=False,
        soft_wrap=not is_terminal(stream),
    )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(dumps_indented(obj) + "\n")


_encoders: dict[int, Callable[[Any], str]] = {}


def _refuse(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _flat(level: int) -> Callable[[Any], str]:
    """One container of scalars in compact JSON whose item separator is "," + a newline + the
    indent of ``level``: the C encoder, made once (JSONEncoder.encode makes one per call)."""
    enc = _encoders.get(level)
    if enc is None:
        sep = ",\n" + "  " * level
        make = getattr(json.encoder, "c_make_encoder", None)
        if make is None:  # a Python without the C accelerator
            slow = json.JSONEncoder(allow_nan=False, separators=(sep, ": "))
            enc = slow.encode
        else:
            c = make(None, _refuse, json.encoder.encode_basestring_ascii, None, ": ", sep,
                     False, False, False)  # fmt: skip

            def enc(o: Any, c: Any = c) -> str:
                return "".join(c(o, 0))

        _encoders[level] = enc
    return enc


def dumps_indented(obj: Any) -> str:
    """``json.dumps(obj, indent=2, allow_nan=False)``, the same text, faster: the standard
    library formats an indented document in Python, one generator step per value, while its C
    encoder takes any separator. Runs of scalar items go to the C encoder with "," + newline
    + indent as the separator; only containers holding containers are walked here, and a
    list of a report's rows goes through ``_rows``. A sweep's report (60,000 rows) took 1.2 s
    the standard way, 0.6 s so (docs/benchmarks.md)."""
    out: list[str] = []
    try:
        _put(obj, 0, out)
    except _Unusual:
        return json.dumps(obj, indent=2, allow_nan=False)
    return "".join(out)


class _Unusual(Exception):
    """A key that is not a string beside a container value: the standard library's turn."""


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _put(o: Any, level: int, out: list[str]) -> None:
    kind = type(o)
    if kind is dict or (kind not in _SCALAR_TYPES and isinstance(o, dict)):
        if not o:
            out.append("{}")
            return
        pad = "\n" + "  " * (level + 1)
        flat = _flat(level + 1)
        out.append("{")
        run: dict[Any, Any] = {}
        sep = ""
        for k, v in o.items():
            if type(v) in _SCALAR_TYPES:
                run[k] = v
                continue
            if type(k) is not str:
                raise _Unusual
            if run:
                out.append(sep + pad + flat(run)[1:-1])
                run, sep = {}, ","
            out.append(sep + pad + json.encoder.encode_basestring_ascii(k) + ": ")
            _put(v, level + 1, out)
            sep = ","
        if run:
            out.append(sep + pad + flat(run)[1:-1])
        out.append("\n" + "  " * level + "}")
    elif kind is list or kind is tuple or isinstance(o, (list, tuple)):
        if not o:
            out.append("[]")
            return
        pad = "\n" + "  " * (level + 1)
        if _SCALAR_TYPES.issuperset(map(type, o)):
            out.append("[" + pad + _flat(level + 1)(o)[1:-1] + "\n" + "  " * level + "]")
            return
        if len(o) > 1 and type(o[0]) is dict:
            rows = _rows(o, level + 1)
            if rows is not None:
                out.append("[" + pad + ("," + pad).join(rows) + "\n" + "  " * level + "]")
                return
        for i, v in enumerate(o):
            out.append(("[" if i == 0 else ",") + pad)
            _put(v, level + 1, out)
        out.append("\n" + "  " * level + "]")
    else:  # a scalar, or what the standard encoder should judge (and refuse) itself
        out.append(json.dumps(o, indent=2, allow_nan=False))


# Never in encoded JSON (strings escape control characters): splits one encoding of many
# scalars back into each one's text.
_CUT = "\x00"


@functools.cache
def _cut_encoder() -> Callable[[Any], str]:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return json.JSONEncoder(allow_nan=False, separators=(_CUT, ": ")).encode
    c = make(None, _refuse, json.encoder.encode_basestring_ascii, None, ": ", _CUT, False,
             False, False)  # fmt: skip
    return lambda o: "".join(c(o, 0))


def _rows(rows: list[Any], level: int) -> list[str] | None:
    """The text of each of ``rows`` at ``level`` when they are a report's rows: dicts with the
    same string keys in the same order whose values are scalars or lists of ints. Every
    scalar of every row goes through one encoder call, each row is then one format of its
    values' texts (a sweep's 60,000 rows: 0.69 -> 0.6 s; the floats' repr is most of what is
    left). None for anything else: ``_put`` formats it."""
    keys = tuple(rows[0])
    if not all(type(k) is str for k in keys):
        return None
    pad = ",\n" + "  " * (level + 1)
    head = [json.encoder.encode_basestring_ascii(k).replace("%", "%%") + ": %s" for k in keys]
    form = "{" + pad[1:] + pad.join(head) + "\n" + "  " * level + "}"
    inner, close = "\n" + "  " * (level + 2), "\n" + "  " * (level + 1) + "]"
    lists_at: dict[tuple[type, ...], tuple[int, ...] | None] = {}
    texts: dict[tuple[int, ...], str] = {}
    scalars: list[Any] = []
    shaped: list[tuple[tuple[int, ...], list[str]]] = []  # per row: where its lists go, texts
    for d in rows:
        if type(d) is not dict or tuple(d) != keys:
            return None
        values = list(d.values())
        kinds = tuple(map(type, values))
        if kinds not in lists_at:  # a new combination of value types: where its lists are
            ok = all(t in _SCALAR_TYPES or t is list for t in kinds)
            lists_at[kinds] = tuple(i for i, t in enumerate(kinds) if t is list) if ok else None
        at = lists_at[kinds]
        if at is None:
            return None
        mine = []
        for i in reversed(at):  # popped from the end: the earlier positions stay
            v = values.pop(i)
            if set(map(type, v)) - {int}:  # 1.0 == 1 == True: the types decide, not the cache
                return None
            key = tuple(v)
            text = texts.get(key)
            if text is None:
                text = "[]" if not v else "[" + inner + ("," + inner).join(map(str, v)) + close
                texts[key] = text
            mine.append(text)
        scalars += values
        shaped.append((at, mine))
    each = _cut_encoder()(scalars)[1:-1].split(_CUT) if scalars else []
    out = []
    start = 0
    width = len(keys)
    for at, mine in shaped:
        stop = start + width - len(at)
        parts = each[start:stop]
        start = stop
        for i, text in zip(at, reversed(mine), strict=True):
            parts.insert(i, text)
        out.append(form % tuple(parts))
    return out


def show(
    warnings: Sequence[str],
    result: T,
    *,
    json_out: bool,
    quiet: bool,
    as_json: Callable[[T], dict[str, Any]],
    as_table: Callable[[T], None],
) -> None:
    """How every command ends: warnings on stderr, then the result on stdout as one JSON
    object (--json) or as tables; --quiet keeps only the JSON."""
    if not quiet:
        for w in warnings:
            warn(w)
    if json_out:
        emit_json(as_json(result))
    elif not quiet:
        as_table(result)


class BarProgress:
    """A tqdm bar by bytes with ETA on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and is_terminal(sys.stderr)
        self._bar: Any = None

    def start(self, total_bytes: int, label: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def wide_console() -> Any:
    """A console for wide tables: piped output is not folded at 80 columns."""
    out = console()
    if not is_terminal(sys.stdout):
        out.width = max(out.width, 160)
    return out


def pairs_table(rows: list[tuple[str, str]]) -> Any:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table
