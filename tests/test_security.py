"""SECURITY.md's promises, checked: no code from checkpoints, no leaked tokens, bounded deps.

Refusing pickle weights and writing outputs 0644 are checked in test_failures.py.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fapm_cli"


def _calls_and_imports() -> list[tuple[str, ast.AST]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found.append((str(path.relative_to(ROOT)), node))
    return found


def test_no_module_can_run_code_from_a_checkpoint() -> None:
    bad = []
    for where, node in _calls_and_imports():
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in {"pickle", "dill", "joblib", "marshal"} for n in names):
                bad.append(f"{where}:{node.lineno} imports a pickle module")
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in {"torch.load", "eval", "exec", "pickle.load", "pickle.loads"}:
                bad.append(f"{where}:{node.lineno} calls {func}")
            for kw in node.keywords:
                value = ast.unparse(kw.value)
                if kw.arg == "trust_remote_code" and value != "False":
                    bad.append(f"{where}:{node.lineno} passes trust_remote_code={value}")
                if kw.arg == "weights_only" and value != "True":
                    bad.append(f"{where}:{node.lineno} passes weights_only={value}")
    assert not bad, bad


def test_every_dependency_has_an_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    assert reqs
    unbounded = [r for r in reqs if not re.search(r"<\s*[0-9]", r) and "==" not in r]
    assert not unbounded, f"add an upper bound to: {unbounded}"


def test_hub_token_is_never_printed_or_written(tmp_path: Path) -> None:
    """Even with --debug tracebacks, the token stays out of stdout, stderr and the disk."""
    token = "hf_fapmTestSecret0123456789abcdef"
    env = {
        **os.environ,
        "HF_TOKEN": token,
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: connection refused, at once
        "HF_HOME": str(tmp_path / "hf-home"),
        "FAPM_DEBUG": "1",
        "NO_COLOR": "1",
    }
    args = ["prune", "-b", "org/base", "-f", "org/finetuned", "-o", str(tmp_path / "out")]
    code = "from fapm_cli.cli.app import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "--debug", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 3, done.stderr  # the Hub cannot be reached: a clean input error
    assert "error: " in done.stderr
    assert token not in done.stdout + done.stderr
    assert token[3:] not in done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
