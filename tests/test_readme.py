"""The README's shell examples run as shown, and the installed `fapm` works as a user runs it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """Every `fapm ...` command line of the README's ```sh blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("fapm "):
                lines.append(line)
    return lines


def make_workspace(tmp: Path) -> None:
    """What `make demo` leaves for the README's examples: demo/base, demo/finetuned and
    demo/finetuned-2, made by the demo's own script (fewer training steps: same layout)."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_pair.py"), str(tmp / "demo"),
         "--steps-base", "4", "--steps-finetune", "2"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def run_readme(tmp: Path, fapm_bin: Path) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
    env = {**os.environ, "PATH": f"{fapm_bin}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    results = []
    for line in readme_commands():
        proc = subprocess.run(
            line, shell=True, cwd=tmp, env=env, capture_output=True, text=True, timeout=300
        )
        results.append((line, proc))
    return results


def test_readme_has_examples() -> None:
    cmds = readme_commands()
    assert any(shlex.split(c)[1] == "prune" for c in cmds)


def test_readme_examples_run(tmp_path: Path) -> None:
    make_workspace(tmp_path)
    bin_dir = Path(sys.executable).parent
    for line, proc in run_readme(tmp_path, bin_dir):
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, line
    assert (tmp_path / "demo" / "fapm" / "model.safetensors.index.json").exists()
    assert (tmp_path / "demo" / "multi" / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_installed_fapm_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build a wheel of the repo, install it into a new venv, and run the README there.

    The venv reuses this environment's third-party packages through a .pth file (no download),
    but fapm itself is installed from the repo, not editable: the console script, the package
    list and the metadata are what a user would get.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The wheel is built by this environment's pip and setuptools; the new venv only installs it.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("fapm-*.whl")
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    fapm = venv / "bin" / "fapm"
    where = subprocess.run(
        [str(py), "-c", "import fapm_cli; print(fapm_cli.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert str(venv) in where  # the installed copy, not the repo
    work = tmp_path / "work"
    work.mkdir()
    make_workspace(work)
    for line, proc in run_readme(work, fapm.parent):
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
    r = subprocess.run([str(fapm), "prune", "-b", "nope", "-f", "x", "-o", "y"], cwd=work,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 3 and r.stderr.startswith("error: ")
