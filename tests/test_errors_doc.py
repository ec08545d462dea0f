"""docs/errors.md stays in sync with the code: the exit-code table, the classes, every message.

Messages are read from the source with ``ast``: the first argument of every call to an error
class of ``fapm_cli.errors`` (or to a module's local ``bad(...)`` helper that builds one), of the
CLI boundary's ``_print_error``, and of ``ValueError`` in ``parse_*`` functions and in the CLI
(those become usage errors). In an f-string every ``{...}`` becomes ``…``; the document writes
messages the same way, so each documented message is matched against the code's by a pattern
where ``…`` stands for any text.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fapm_cli import errors
from fapm_cli.cli.app import app
from fapm_cli.errors import ExitCode, FapmError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
ELLIPSIS = "…"


def _error_classes() -> dict[str, ExitCode]:
    out: dict[str, ExitCode] = {}
    todo = [FapmError]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls.exit_code
        todo += cls.__subclasses__()
    return out


CLASSES = _error_classes()


@dataclass(frozen=True)
class Message:
    template: str
    code: ExitCode | None  # None: printed by the boundary (its code is in the doc)
    where: str


def _template(node: ast.expr, inner: str | None = None, param: str | None = None) -> str | None:
    """The text of a str constant or f-string, with ``…`` for each replacement field.

    ``inner`` replaces the field that is exactly ``{param}`` (a ``bad(what)`` helper's message).
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif (
                inner is not None
                and isinstance(v, ast.FormattedValue)
                and (isinstance(v.value, ast.Name) and v.value.id == param)
            ):
                parts.append(inner)
            else:
                parts.append(ELLIPSIS)
        return "".join(parts)
    return None


def _helpers(tree: ast.Module) -> dict[str, tuple[ast.Call, str]]:
    """Local ``bad(what)``-style helpers: functions returning an error built from a parameter."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.args.args:
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Return)
                    and isinstance(sub.value, ast.Call)
                    and isinstance(sub.value.func, ast.Name)
                    and sub.value.func.id in CLASSES
                    and sub.value.args
                    and node.name not in CLASSES
                ):
                    found[node.name] = (sub.value, node.args.args[0].arg)
    return found


def _parents(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_parse_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef) and node.name.startswith("parse_"):
            return True
    return False


def code_messages() -> list[Message]:
    out = []
    for path in sorted((ROOT / "fapm_cli").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), where)
        helpers = _helpers(tree)
        parents = _parents(tree)
        in_cli = "/cli/" in where
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
                continue
            name = node.func.id
            text: str | None = None
            code: ExitCode | None = None
            if name in CLASSES:
                text, code = _template(node.args[0]), CLASSES[name]
            elif name in helpers:
                call, param = helpers[name]
                inner = _template(node.args[0])
                if inner is not None:
                    assert isinstance(call.func, ast.Name)
                    text = _template(call.args[0], inner, param)
                    code = CLASSES[call.func.id]
            elif name == "_print_error":
                text = _template(node.args[0])
            elif name == "ValueError" and (in_cli or _in_parse_function(node, parents)):
                text, code = _template(node.args[0]), ExitCode.USAGE
            # Skip messages made only of values (e.g. "{where}: {err.strerror}").
            if text is not None and len(re.sub(r"[^A-Za-z]", "", text)) >= 3:
                out.append(Message(text, code, f"{where}:{node.lineno}"))
    return out


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in template.split(ELLIPSIS)), re.DOTALL)


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _rows(body: str) -> list[list[str]]:
    """Body rows of every Markdown table in ``body`` (heading rows left out)."""
    separator = re.compile(r"^\|[\s:|-]+\|$")
    lines = body.splitlines()
    rows = []
    for i, line in enumerate(lines):
        is_heading = i + 1 < len(lines) and separator.match(lines[i + 1])
        if line.startswith("|") and not separator.match(line) and not is_heading:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            rows.append([c.replace("\\|", "|") for c in cells])
    return rows


def documented_messages() -> dict[int, list[str]]:
    """Exit code -> messages of the '### <code> ...' sections of '## Messages'."""
    out: dict[int, list[str]] = {}
    for heading, body in _sections(DOC.read_text()).items():
        m = re.match(r"^### (\d+) ", heading)
        if m and "option parsing" not in heading:
            for row in _rows(body):
                span = re.fullmatch(r"`(.+)`", row[0])
                assert span, f"{heading}: message cell {row[0]!r} must be one `code span`"
                out.setdefault(int(m.group(1)), []).append(span.group(1))
    return out


def test_exit_code_table_matches_the_enum() -> None:
    table = _rows(_sections(DOC.read_text())["## Exit codes"])
    documented = {int(r[0]): r[1].strip("`") for r in table}
    assert documented == {int(c): c.name for c in ExitCode}


def test_every_error_class_is_in_the_exit_code_table() -> None:
    table = _rows(_sections(DOC.read_text())["## Exit codes"])
    by_code = {int(r[0]): r[2] for r in table}
    for name, code in CLASSES.items():
        if name != "FapmError":
            assert f"`{name}`" in by_code[int(code)], f"{name} missing from row {int(code)}"
    # The loop saw every class errors.py defines, and every failure exit code has one.
    defined = {
        n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, FapmError)
    }
    assert defined == set(CLASSES)
    assert {int(c) for c in CLASSES.values()} >= {2, 3, 4, 5, 6, 130}


def test_the_code_has_messages_to_check() -> None:
    # Guards the extraction itself: a few messages known to exist must be found.
    found = {m.template for m in code_messages()}
    assert "…: no .safetensors files in this directory" in found
    assert "…: header claims … bytes (limit …)" in found
    assert "…: tensor …: shape must be a list of non-negative integers" in found  # via bad()
    assert "sparsity … is outside [0, 1]" in found  # a ValueError from parse_sparsity


def test_every_message_in_the_code_is_documented() -> None:
    documented = documented_messages()
    everywhere = [d for docs in documented.values() for d in docs]
    missing = []
    for msg in code_messages():
        pattern = _pattern(msg.template)
        pool = everywhere if msg.code is None else documented.get(int(msg.code), [])
        if not any(pattern.fullmatch(d) for d in pool):
            code = "?" if msg.code is None else int(msg.code)
            missing.append(f"{msg.where}: exit {code}: `{msg.template}`")
    assert not missing, "add these to docs/errors.md:\n" + "\n".join(missing)


def test_every_documented_message_exists_in_the_code() -> None:
    patterns = [_pattern(m.template) for m in code_messages()]
    stale = [
        f"exit {code}: `{d}`"
        for code, docs in documented_messages().items()
        for d in docs
        if not any(p.fullmatch(d) for p in patterns)
    ]
    assert not stale, "docs/errors.md lists messages the code no longer has:\n" + "\n".join(stale)


def test_the_worked_example_prints_what_the_doc_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = re.search(r"```console\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert block
    lines = block.group(1).splitlines()
    command, shown = lines[0].removeprefix("$ ").split(), lines[1:]
    exit_at = shown.index("$ echo $?")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, command[1:])
    assert result.stderr.splitlines() == shown[:exit_at]
    assert result.exit_code == int(shown[exit_at + 1])
    assert result.stdout == ""
