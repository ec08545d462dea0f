"""Faults during a run: full disk, file-size limit, signals, a shard vanishing, two runs racing.

Each must end with a clear message and the documented exit code, the inputs unchanged, no output
and no temporary directory left behind. Signals and limits are real (a subprocess, a real
``RLIMIT_FSIZE``, a real tmpfs when the machine allows mounting one); nothing is timed: a test
waits for the run to reach the point of interest (its temporary output appearing) before acting.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fapm_cli import plan
from fapm_cli.errors import ExitCode, InputError, ResourceError
from fapm_cli.io import reader, writer
from fapm_cli.verbs import prune as verbs_prune
from tests.checkpoints import load_checkpoint, make_pair, tree_hash, write_checkpoint
from tests.raw import TMP_MARK, stray_temps
from tests.reference import reference_prune

FAPM = [sys.executable, "-c", "from fapm_cli.cli.app import main; main()"]
# No .pyc writes: under RLIMIT_FSIZE one would kill Python (SIGXFSZ) before fapm starts.
ENV = {**os.environ, "NO_COLOR": "1", "FAPM_DEBUG": "0", "PYTHONDONTWRITEBYTECODE": "1"}
SAFETY_NET_S = 300  # only so that a broken build fails instead of hanging the suite


def fapm(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*FAPM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **kwargs,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=SAFETY_NET_S)
    return proc.returncode, out, err


def assert_clean_error(rc: int, stdout: str, stderr: str, code: ExitCode, *needles: str) -> None:
    assert rc == code, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), (
        lines
    )
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    base, ft = make_pair(seed=5)
    b = write_checkpoint(tmp_path / "base", base)
    f = write_checkpoint(tmp_path / "ft", ft, shard_bytes=3000, config={"model_type": "x"})
    return b, f, reference_prune(base, ft, Fraction(9, 10))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Big enough (2 x 48 MB) that pruning it takes a while on any machine."""
    root = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(1024, 1536, generator=gen) for i in range(8)}
    ft = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    return (
        write_checkpoint(root / "base", base, shard_bytes=13 << 20),
        write_checkpoint(root / "ft", ft, shard_bytes=13 << 20),
    )


def wait_until_writing(parent: Path, proc: subprocess.Popen[str]) -> None:
    """Return once the run has written output bytes into its temporary directory."""
    deadline = time.monotonic() + SAFETY_NET_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        with contextlib.suppress(OSError):  # the directory may vanish while listed
            for tmp in parent.iterdir():
                if TMP_MARK in tmp.name and any(p.stat().st_size > 0 for p in tmp.iterdir()):
                    return
        time.sleep(0.005)
    raise AssertionError("the run never started writing")


# -- resources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 5000])
def test_file_size_limit_exits_6(tmp_path: Path, small: tuple[Path, Path, Any], limit: int) -> None:
    b, f, _ = small
    inputs = tree_hash(b), tree_hash(f)

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    # One 8 kB shard: the limit is hit on the first write (0) or in the middle of one (5000).
    proc = fapm("prune", "-b", str(b), "-f", str(f), "-o", str(out), preexec_fn=limit_file_size)
    assert_clean_error(*finish(proc), ExitCode.RESOURCES, str(out), "File too large")
    assert not out.exists()
    assert not stray_temps(tmp_path)
    assert (tree_hash(b), tree_hash(f)) == inputs


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_exits_6(
    tmp_path: Path, small: tuple[Path, Path, Any], tiny_filesystem: Path
) -> None:
    b, f, _ = small
    inputs = tree_hash(b), tree_hash(f)
    out = tiny_filesystem / "out"
    assert_clean_error(
        *finish(fapm("prune", "-b", str(b), "-f", str(f), "-o", str(out))),
        ExitCode.RESOURCES,
        str(out),
        "No space left on device",
    )
    assert list(tiny_filesystem.iterdir()) == []
    assert (tree_hash(b), tree_hash(f)) == inputs


def test_disk_full_in_process_removes_the_temporary_output(
    tmp_path: Path, small: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, where mounting is not allowed: the writer's os.write fails with ENOSPC."""
    b, f, _ = small
    budget = {"left": 6000}

    def write(fd: int, data: Any) -> int:
        n = len(memoryview(data))
        if n > budget["left"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget["left"] -= n
        return os.write(fd, data)

    fake_os = SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake_os.write = write
    monkeypatch.setattr(writer, "os", fake_os)
    out = tmp_path / "out"
    with pytest.raises(ResourceError) as info:
        verbs_prune.prune(str(b), str(f), str(out), plan.PruneOptions(), max_shard_size=3000)
    assert info.value.exit_code == ExitCode.RESOURCES
    assert "No space left on device" in info.value.message
    assert budget["left"] < 6000  # it did write, then hit the wall
    assert not out.exists()
    assert not stray_temps(tmp_path)


# -- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "message"),
    [
        (signal.SIGINT, "interrupted; nothing was written"),
        (signal.SIGTERM, "terminated by SIGTERM; nothing was written"),
    ],
)
def test_signal_mid_run_leaves_nothing(
    tmp_path: Path, big: tuple[Path, Path], signum: int, message: str
) -> None:
    b, f = big
    inputs = tree_hash(b), tree_hash(f)
    out = tmp_path / "out"
    proc = fapm("prune", "-b", str(b), "-f", str(f), "-o", str(out))
    wait_until_writing(tmp_path, proc)
    proc.send_signal(signum)
    assert_clean_error(*finish(proc), ExitCode.INTERRUPTED, message)
    assert not out.exists()
    assert not stray_temps(tmp_path)
    assert (tree_hash(b), tree_hash(f)) == inputs


# -- inputs changing under a run -----------------------------------------------------------------


class OnFirstTensor(plan.Progress):
    """Runs ``action`` once, after the first tensor has been written: mid-run, deterministically."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def advance(self, nbytes: int) -> None:
        if self.action is not None:
            action, self.action = self.action, None
            action()


def _last_shard(ft: Path) -> Path:
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    return ft / sorted(set(index["weight_map"].values()))[-1]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_shard_damaged_mid_run_is_a_clean_error(
    tmp_path: Path, small: tuple[Path, Path, Any], damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This pair is small enough to be read ahead whole: reads only as far as memory needs.
    monkeypatch.setattr(reader, "READ_AHEAD", 0)
    b, f, _ = small
    victim = _last_shard(f)
    others = {k: v for k, v in tree_hash(f).items() if k != victim.name}, tree_hash(b)

    def strike() -> None:
        if damage == "deleted":
            victim.unlink()
        else:
            os.truncate(victim, victim.stat().st_size - 64)

    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        verbs_prune.prune(
            str(b), str(f), str(out), plan.PruneOptions(), progress=OnFirstTensor(strike)
        )
    assert info.value.exit_code == ExitCode.INPUT
    assert victim.name in info.value.message
    assert info.value.hint
    assert not out.exists()
    assert not stray_temps(tmp_path)
    assert ({k: v for k, v in tree_hash(f).items() if k != victim.name}, tree_hash(b)) == others


def test_shard_deleted_while_open_still_gives_the_right_result(tmp_path: Path) -> None:
    """On POSIX an open file stays readable after unlink: the run completes, and correctly."""
    base, ft = make_pair(seed=6)
    b = write_checkpoint(tmp_path / "base", base)
    f = write_checkpoint(tmp_path / "ft", ft)  # one shard: open from the first tensor on
    shard = f / "model.safetensors"
    out = tmp_path / "out"
    verbs_prune.prune(
        str(b), str(f), str(out), plan.PruneOptions(), progress=OnFirstTensor(shard.unlink)
    )
    assert not shard.exists()
    got = load_checkpoint(out)
    expected = reference_prune(base, ft, Fraction(9, 10))
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


# -- two runs, one output ------------------------------------------------------------------------


def test_two_runs_racing_for_one_output(tmp_path: Path, small: tuple[Path, Path, Any]) -> None:
    """Exactly one wins; the loser exits 5; the output is entirely the winner's.

    Both start together and spend seconds importing torch, so their runs overlap; whichever
    way the race goes (the loser sees the output at the start or only at the final rename),
    the contract is the same.
    """
    b, f, _ = small
    inputs = tree_hash(b), tree_hash(f)
    out = tmp_path / "out"
    sparsities = ["0.5", "0.9"]
    procs = [fapm("prune", "-b", str(b), "-f", str(f), "-o", str(out), "-s", s) for s in sparsities]
    results = [finish(p) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, ExitCode.OUTPUT], [r[2] for r in results]
    winner = sparsities[[r[0] for r in results].index(0)]
    loser = next(r for r in results if r[0] != 0)
    assert_clean_error(*loser, ExitCode.OUTPUT, str(out))
    assert not stray_temps(tmp_path)
    assert (tree_hash(b), tree_hash(f)) == inputs

    got = load_checkpoint(out)
    expected = reference_prune(load_checkpoint(b), load_checkpoint(f), Fraction(winner))
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    meta = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(meta["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}


def test_a_signal_while_a_thread_starts_is_raised_after_it() -> None:
    """A signal handler's exception inside ``signals_deferred`` (threads being started) waits
    for the end of the block; outside, it is raised at once."""
    from fapm_cli import errors

    errors.clear_signals()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt), errors.signals_deferred():  # noqa: PT012
            errors.raise_or_defer(KeyboardInterrupt())
            reached.append(1)  # the block went on
        assert reached
        errors.clear_signals()
        with pytest.raises(KeyboardInterrupt):
            errors.raise_or_defer(KeyboardInterrupt())
    finally:
        errors.clear_signals()


def test_a_lost_signal_still_stops_the_run(tmp_path: Path, small: tuple[Path, Path, Any]) -> None:
    """A signal whose exception Python swallowed (raised in a weakref callback or __del__) is
    raised again at the next item, and at the latest before the output is published."""
    from fapm_cli import errors

    b, f, _ = small

    def swallowed() -> None:
        # what "Exception ignored in ..." amounts to
        with contextlib.suppress(errors.Interrupted):
            errors.raise_or_defer(errors.Interrupted("terminated by SIGTERM"))

    out = tmp_path / "out"
    try:
        with pytest.raises(errors.Interrupted):
            verbs_prune.prune(
                str(b), str(f), str(out), plan.PruneOptions(), progress=OnFirstTensor(swallowed)
            )
    finally:
        errors.clear_signals()
    assert not out.exists()
    assert not stray_temps(tmp_path)
