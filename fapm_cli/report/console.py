"""How results reach a person or a script: JSON on stdout, tables for people, warnings on stderr,
progress bars on a terminal. Colour and bars only appear on a terminal, never when ``NO_COLOR`` is
set (colour) or ``--quiet`` is given. Nothing in ``report`` imports torch or the engine: it
renders the plain records of ``fapm_cli.records``.
"""

from __future__ import annotations

import array
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
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
    the standard way, 0.3 s so (docs/benchmarks.md)."""
    out: list[str] = []
    try:
        _put(obj, 0, out, {})
    except _Unusual:
        return json.dumps(obj, indent=2, allow_nan=False)
    return "".join(out)


class _Unusual(Exception):
    """A key that is not a string beside a container value: the standard library's turn."""


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _put(o: Any, level: int, out: list[str], seen: dict[Any, list[str]]) -> None:
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
            _put(v, level + 1, out, seen)
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
            table = _rows(o, level + 1, seen)
            if table is not None:
                out += ["[" + pad, table, "\n" + "  " * level + "]"]
                return
        for i, v in enumerate(o):
            out.append(("[" if i == 0 else ",") + pad)
            _put(v, level + 1, out, seen)
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


def _rows(rows: list[Any], level: int, seen: dict[Any, list[str]]) -> str | None:
    """``rows`` as the items of a list at ``level`` (the text between its brackets' lines) when
    they are a report's rows: dicts with the same string keys in the same order whose values,
    column by column, are scalars or lists of ints. Each column goes through one encoder call,
    and a column already met in the document (``seen``: a sweep's reports share their
    sparsity-free columns) is not encoded again; the columns' texts are then interleaved with
    the keys in one join. None for anything else: ``_put`` formats it. Writing a sweep's
    report of 60,000 rows: 0.63 -> 0.31 s (docs/benchmarks.md)."""
    keys = tuple(rows[0])
    if not keys or not all(type(k) is str for k in keys):
        return None
    if set(map(type, rows)) != {dict} or not all(map(keys.__eq__, map(tuple, rows))):
        return None
    inner = "\n" + "  " * (level + 1)
    parts: list[Iterable[str]] = []
    for i, column in enumerate(zip(*map(dict.values, rows), strict=True)):
        text = _column(column, level + 1, seen)
        if text is None:
            return None
        key = json.encoder.encode_basestring_ascii(keys[i])
        parts += [itertools.repeat(("{" if i == 0 else ",") + inner + key + ": "), text]
    close = "\n" + "  " * level + "}"
    pieces = list(
        itertools.chain.from_iterable(zip(*parts, itertools.repeat(close + ",\n" + "  " * level)))
    )
    pieces[-1] = close  # the last row's: no item after it
    return "".join(pieces)


def _column(values: tuple[Any, ...], level: int, seen: dict[Any, list[str]]) -> list[str] | None:
    """The JSON text of each of ``values`` (one column of ``_rows``, at ``level``): scalars, or
    lists of ints; None for other values. ``seen`` keeps the texts of each column by what
    decides them: the types and values, and a float's bits (-0.0 == 0.0, 1 == 1.0 == True;
    their texts differ), so that an equal column is looked up instead of encoded."""
    kinds = set(map(type, values))
    if kinds <= _SCALAR_TYPES:
        if len(kinds) == 1 and float not in kinds:
            key: Any = ("scalars", kinds.pop(), values)
        elif float not in kinds:
            key = ("scalars", tuple(map(type, values)), values)
        elif len(kinds) == 1:
            key = array.array("d", values).tobytes()
        else:  # floats among other types: not worth a key
            return _cut_encoder()(values)[1:-1].split(_CUT)
        text = seen.get(key)
        if text is None:
            text = seen[key] = _cut_encoder()(values)[1:-1].split(_CUT)
        return text
    if kinds != {list} or set(map(type, itertools.chain.from_iterable(values))) - {int}:
        return None  # 1.0 == 1 == True: the types decide, not the cache
    key = ("lists", level, tuple(map(tuple, values)))
    text = seen.get(key)
    if text is None:
        inner, close = "\n" + "  " * (level + 1), "\n" + "  " * level + "]"
        each: dict[tuple[int, ...], str] = {}
        for v in key[2]:
            if v not in each:
                each[v] = "[]" if not v else "[" + inner + ("," + inner).join(map(str, v)) + close
        text = seen[key] = [each[v] for v in key[2]]
    return text


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
