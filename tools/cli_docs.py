"""Generate docs/cli.md from the `--help` of every command, so the reference cannot drift.

usage: python tools/cli_docs.py          # rewrite docs/cli.md
       python tools/cli_docs.py --check  # exit 1 if docs/cli.md is stale (make lint)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ["COLUMNS"] = "100"  # help is wrapped to the terminal: fix the width
os.environ["NO_COLOR"] = "1"

from typer.testing import CliRunner

from fapm_cli.cli.app import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="fapm")
    if result.exit_code != 0:
        raise SystemExit(f"fapm {' '.join(args)} --help failed:\n{result.output}")
    return result.stdout.rstrip() + "\n"


def commands(top: str) -> list[str]:
    section = top.split("Commands:", 1)[1] if "Commands:" in top else ""
    return re.findall(r"^  ([a-z][a-z-]*)\s", section, flags=re.MULTILINE)


def render() -> str:
    top = help_text()
    parts = [
        "# Command-line reference\n",
        "Generated from `--help` by `python tools/cli_docs.py`; `make lint` fails when it is "
        "stale. Worked examples are in [commands/](commands/).\n",
        "## fapm\n",
        "```text\n" + top + "```\n",
    ]
    for cmd in commands(top):
        parts += [f"## fapm {cmd}\n", "```text\n" + help_text(cmd) + "```\n"]
    return "\n".join(parts)


def main() -> None:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/cli.md is stale: run `make docs-cli`", file=sys.stderr)
            raise SystemExit(1)
        return
    DOC.write_text(text)


if __name__ == "__main__":
    main()
