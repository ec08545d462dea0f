"""Bounded-memory sharded safetensors output, with an index and an atomic finish.

Every shard's header is planned from names, shapes and dtypes before any data is computed, so
tensor bytes can be streamed to disk chunk by chunk: the writer never holds more than one chunk.
Everything is written into a temporary sibling directory, fsynced, and renamed into place only
when complete; on any failure or interrupt the temporary directory is removed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fapm_cli.errors import (
    FapmError,
    OutputError,
    ResourceError,
    check_signals,
    signals_deferred,
)
from fapm_cli.io.header import PlannedTensor, build_header, read_header
from fapm_cli.io.parts import MARKER as PART_MARKER
from fapm_cli.plan import VERSION_KEY

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
FILE_MODE = 0o644  # outputs are readable by others, whatever the umask says
DIR_MODE = 0o755
_STAGING_BYTES = 8 << 20
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '2GiB' -> 2**31, '500MB', '1000000' (bytes)."""
    units = {
        "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
        "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    }  # fmt: skip
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :].strip()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"size {text!r} not understood (use e.g. 500MB, 5GB, 2GiB)")
    return int(value * units[unit])


def shard_names(count: int) -> list[str]:
    """Hugging Face shard names: model.safetensors, or model-00001-of-00003.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy, in processing order: a new shard starts when the next tensor would overflow.

    A tensor larger than ``max_shard_size`` gets a shard of its own (as transformers does).
    """
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def os_error(err: OSError, what: str) -> FapmError:
    """Translate an OSError raised while writing ``what``."""
    if err.errno in _RESOURCE_ERRNOS:
        return ResourceError(
            f"{what}: {err.strerror} while writing",
            hint="free disk space or raise the file-size limit; nothing was written",
        )
    return OutputError(f"{what}: {err.strerror}", hint="check the output path and its permissions")


def check_output_path(output: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """Refuse, before any work, an output that exists or that overlaps an input."""
    out = Path(os.path.realpath(output))
    for inp in inputs:
        real = Path(os.path.realpath(inp))
        if out == real or real in out.parents or out in real.parents:
            raise OutputError(
                f"{output}: output overlaps input {inp}",
                hint="choose an output directory outside the inputs",
            )
    if output.exists() or output.is_symlink():
        empty_dir = output.is_dir() and not output.is_symlink() and not any(output.iterdir())
        if not (overwrite or empty_dir):
            raise OutputError(f"{output}: already exists", hint="pass --overwrite to replace it")
        if overwrite and not empty_dir:
            refuse_foreign(output)


def refuse_foreign(output: Path) -> None:
    """``--overwrite`` replaces only an empty directory or one that fapm wrote: a directory of
    plain files whose ``.safetensors`` shards all carry fapm's metadata (or a part of a split
    run). Anything else (a file, a link, a folder of notes, another tool's model) is refused,
    and nothing is deleted."""
    why = None
    if output.is_symlink() or not output.is_dir():
        why = "it is a file, not a directory fapm wrote"
    else:
        try:
            entries = list(os.scandir(output))
        except OSError as err:
            raise os_error(err, str(output)) from err
        shards = [e for e in entries if e.name.endswith(".safetensors")]
        if any(not e.is_file(follow_symlinks=False) for e in entries):
            why = "it holds folders or links, which fapm never writes"
        elif not shards and not any(e.name == PART_MARKER for e in entries):
            why = "it holds no checkpoint"
        else:
            for e in shards:
                try:
                    meta = read_header(e.path).metadata
                except FapmError:
                    meta = {}
                if VERSION_KEY not in meta:
                    why = f"{e.name} was not written by fapm"
                    break
    if why is not None:
        raise OutputError(
            f"{output}: --overwrite replaces only an earlier fapm output or an empty "
            f"directory, and {why}",
            hint="choose another output, or remove it yourself if it is yours to delete",
        )


@dataclass
class _OpenShard:
    name: str
    fd: int
    digest: hashlib._Hash
    size: int
    closed: bool = False
    flushed: int = 0  # bytes handed to writeback so far (see _start_writeback)
    waited: int = 0  # bytes known to be on disk and dropped from the page cache


class CheckpointWriter:
    """Writes planned tensors, in plan order, as a sharded checkpoint directory."""

    def __init__(
        self,
        output: Path,
        tensors: Sequence[PlannedTensor],
        *,
        max_shard_size: int,
        metadata: dict[str, str],
        index_metadata: dict[str, object] | None = None,
        overwrite: bool = False,
        fsync: bool = True,
        background: bool = False,
        shards: Collection[str] | None = None,
    ) -> None:
        """``shards``: write only these shards of the plan (one part of ``prune --part``); the
        plan, and so every shard's name and bytes, is still computed from all ``tensors``."""
        self.output = output
        self.overwrite = overwrite
        self.fsync = fsync
        self.metadata = metadata
        self.index_metadata = dict(index_metadata or {})
        groups = plan_shards(tensors, max_shard_size)
        names = shard_names(len(groups))
        self._plan = [(name, group) for name, group in zip(names, groups, strict=True)]
        self._selected = [n for n in names if shards is None or n in shards]
        self._queue = [
            (name, t) for name, group in self._plan if name in self._selected for t in group
        ]
        self._pos = -1  # index in _queue of the tensor being written
        self._left = 0  # bytes still expected for that tensor
        self._shard: _OpenShard | None = None
        self.shard_info: dict[str, dict[str, object]] = {}
        self.weight_map: dict[str, str] = {}
        self._staging: bytearray | None = None
        # background=True: bytes are hashed and written by one worker thread, so that sha256
        # and the copy into the page cache overlap the next chunk's computation. Callers must
        # then never modify a tensor after passing it to write() (the engine's are fresh).
        self._worker = _Worker() if background else None
        self._opened: list[_OpenShard] = []
        tag = secrets.token_hex(4)
        self.tmp = output.parent / f".{output.name}.fapm-tmp-{os.getpid()}-{tag}"
        # Parents created here are removed again by abort(): a failed run leaves nothing.
        self._made_parents = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(mode=DIR_MODE)
        except OSError as err:
            self._remove_made_parents()
            if err.errno in _RESOURCE_ERRNOS:
                raise os_error(err, str(output)) from err
            raise OutputError(
                f"{output}: cannot create the output directory ({err.strerror})",
                hint="choose an output inside a writable directory",
            ) from err

    # -- streaming ------------------------------------------------------------------------
    def begin(self, name: str) -> None:
        if self._left:
            raise AssertionError(f"tensor {self._queue[self._pos][1].name} not complete")
        self._pos += 1
        shard_name, planned = self._queue[self._pos]
        if planned.name != name:
            raise AssertionError(f"writer expected {planned.name}, got {name}")
        if self._shard is None or self._shard.name != shard_name:
            self._close_shard()
            self._open_shard(shard_name)
        self._left = planned.nbytes
        self.weight_map[name] = shard_name

    def write(self, chunk: torch.Tensor) -> None:
        """Append the bytes of a contiguous tensor chunk to the tensor begun last."""
        import torch

        data = chunk.reshape(-1)
        raw = data.view(torch.uint8)  # same bytes; bool and float8 included
        n = raw.numel()
        if n > self._left:
            raise AssertionError("more bytes than planned")
        if self._worker is not None:
            shard = self._shard
            assert shard is not None
            self._worker.submit(lambda: self._write_to(shard, _byte_view(raw)), n)
            self._left -= n
            return
        if self._staging is None:
            self._staging = bytearray(_STAGING_BYTES)
        staging = torch.frombuffer(self._staging, dtype=torch.uint8)
        view = memoryview(self._staging)
        for c in range(0, n, _STAGING_BYTES):
            part = raw[c : c + _STAGING_BYTES]
            staging[: part.numel()].copy_(part)
            self._write_bytes(view[: part.numel()])
        self._left -= n

    def after_written(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every chunk passed to ``write`` so far is written (on the worker
        thread in background mode): then the memory behind those chunks may be reused."""
        if self._worker is not None:
            self._worker.submit(fn, 0, always=True)
        else:
            fn()

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.begin(name)
        self.write(tensor.contiguous())

    # -- files ----------------------------------------------------------------------------
    def _open_shard(self, name: str) -> None:
        group = next(g for n, g in self._plan if n == name)
        path = self.tmp / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.fchmod(fd, FILE_MODE)
        except OSError as err:
            raise os_error(err, str(self.output / name)) from err
        self._shard = _OpenShard(name, fd, hashlib.sha256(), 0)
        self._opened.append(self._shard)
        self._write_bytes(build_header(group, self.metadata))

    def _write_bytes(self, data: bytes | memoryview) -> None:
        shard = self._shard
        assert shard is not None
        if self._worker is not None:
            copy = bytes(data)  # small (headers): copied, since callers may reuse the buffer
            self._worker.submit(lambda: self._write_to(shard, copy), len(copy))
        else:
            self._write_to(shard, data)

    def _write_to(self, shard: _OpenShard, data: bytes | memoryview) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.write(shard.fd, view)
                view = view[written:]
        except OSError as err:
            raise os_error(err, str(self.output / shard.name)) from err
        shard.digest.update(data)
        shard.size += len(data)
        _start_writeback(shard)

    def _close_shard(self) -> None:
        shard = self._shard
        if shard is None:
            return
        self._shard = None
        if self._worker is not None:
            self._worker.submit(lambda: self._close(shard), 0)
        else:
            self._close(shard)

    def _close(self, shard: _OpenShard) -> None:
        try:
            if self.fsync:
                os.fsync(shard.fd)
        except OSError as err:
            raise os_error(err, str(self.output / shard.name)) from err
        finally:
            shard.closed = True
            os.close(shard.fd)
        self.shard_info[shard.name] = {"bytes": shard.size, "sha256": shard.digest.hexdigest()}

    def adopt(self, name: str, path: Path, info: dict[str, object]) -> None:
        """Take shard ``name``, written earlier by a part, from ``path`` instead of writing it.

        Hard-linked when the file system allows it (no copy, and the part stays intact until
        the output is in place); its size must be the plan's, ``info`` is its index entry."""
        group = next(g for n, g in self._plan if n == name)
        upcoming = self._queue[self._pos + 1 : self._pos + 1 + len(group)]
        if (
            self._left
            or self._shard is not None
            or [t.name for _, t in upcoming] != [t.name for t in group]
        ):
            raise AssertionError(f"adopt({name}) out of plan order")
        expected = len(build_header(group, self.metadata)) + sum(t.nbytes for t in group)
        dest = self.tmp / name
        try:
            size = path.stat().st_size
            if size != expected:
                raise OutputError(
                    f"{path}: {size} bytes, the plan says {expected}",
                    hint="the part that wrote it was cut short or changed since: run that "
                    "part again",
                )
            try:
                os.link(path, dest)
            except OSError:  # no hard links here (or another file system): copy
                shutil.copyfile(path, dest)
                os.chmod(dest, FILE_MODE)
        except FileNotFoundError as err:
            raise OutputError(
                f"{path}: missing", hint="the part that writes it did not finish: run it again"
            ) from err
        except OSError as err:
            raise os_error(err, str(self.output / name)) from err
        self._pos += len(group)
        for t in group:
            self.weight_map[t.name] = name
        self.shard_info[name] = {"bytes": info["bytes"], "sha256": info["sha256"]}

    def _complete(self) -> None:
        if self._left or self._pos != len(self._queue) - 1:
            raise AssertionError("finish() before every planned tensor was written")
        # Shards with no tensors (only the empty checkpoint's) still get written, once.
        for name, group in self._plan:
            if not group and name in self._selected and name not in self.shard_info:
                self._close_shard()
                self._open_shard(name)
        self._close_shard()
        if self._worker is not None:
            self._worker.drain()

    def finish_part(self, marker_name: str, marker: dict[str, object]) -> None:
        """Close this part's shards, write its marker (last: it says the part is complete),
        and move the part's directory into place, replacing an earlier run of the same part."""
        self._complete()
        record = {**marker, "shards": self.shard_info, "weight_map": self.weight_map}
        try:
            self._write_small(marker_name, json.dumps(record, indent=2) + "\n")
            os.chmod(self.tmp, DIR_MODE)
            self.overwrite = True  # a rerun of a part replaces it: parts are idempotent
            self._move_into_place()
        except OSError as err:
            raise os_error(err, str(self.output)) from err

    def finish(
        self,
        copy_files: Sequence[tuple[str, Callable[[], str]]] = (),
        texts: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Close the last shard, write the index, copy extra files, and move into place.

        ``copy_files`` pairs a file name with a function returning the local path to copy;
        ``texts`` pairs a file name with the text fapm writes there itself.
        """
        self._complete()
        total = sum(t.nbytes for _, t in self._queue)
        index = {
            "metadata": {"total_size": total, **self.index_metadata, "shards": self.shard_info},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        try:
            self._write_small(INDEX_NAME, json.dumps(index, indent=2) + "\n")
            for name, local_path in copy_files:
                dest = self.tmp / name
                shutil.copyfile(local_path(), dest)
                os.chmod(dest, FILE_MODE)
            for name, text in texts:
                self._write_small(name, text)
            os.chmod(self.tmp, DIR_MODE)
            self._move_into_place()
        except OSError as err:
            raise os_error(err, str(self.output)) from err

    def _write_small(self, name: str, text: str) -> None:
        path = self.tmp / name
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.chmod(path, FILE_MODE)

    def _move_into_place(self) -> None:
        check_signals()  # a SIGINT/SIGTERM whose exception was lost: publish nothing
        out = self.output
        old: Path | None = None
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                out.rmdir()
            elif self.overwrite:
                refuse_foreign(out)  # also when it appeared (or changed) while we ran
                old = out.parent / f".{out.name}.fapm-old-{secrets.token_hex(4)}"
                out.rename(old)
            else:
                raise OutputError(
                    f"{out}: appeared while fapm was running (another run?)",
                    hint="pass --overwrite to replace it, or choose another output",
                )
        try:
            # rename(2) refuses to replace a non-empty directory: if another run finished
            # first, ours fails here instead of mixing the two outputs.
            os.rename(self.tmp, out)
        except BaseException as err:
            # Also on Ctrl-C between the two renames: the old output goes back in place.
            if old is not None and not out.exists():
                old.rename(out)
            if not isinstance(err, OSError):
                raise
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(
                    f"{out}: appeared while fapm was running (another run?)",
                    hint="pass --overwrite to replace it, or choose another output",
                ) from err
            raise
        if self.fsync:
            _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything written so far (idempotent)."""
        if self._worker is not None:
            self._worker.cancel()
            for shard in self._opened:  # shards whose close job was skipped
                if not shard.closed:
                    shard.closed = True
                    with contextlib.suppress(OSError):
                        os.close(shard.fd)
            self._shard = None
        if self._shard is not None:
            with contextlib.suppress(OSError):
                os.close(self._shard.fd)
            self._shard = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_made_parents()

    def _remove_made_parents(self) -> None:
        for parent in self._made_parents:  # innermost first; stops at one not empty
            try:
                parent.rmdir()
            except OSError:
                break


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _byte_view(raw: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 tensor, without a copy."""
    return memoryview(raw.numpy()).cast("B")  # type: ignore[arg-type]


# Jobs of at most this many bytes run in the submitting thread when the worker is idle.
_INLINE = 256 << 10


class _Worker:
    """One thread that runs write jobs in order; at most ``_IN_FLIGHT`` bytes queued.

    The first error is kept and raised (already translated) by the next ``submit`` or by
    ``drain``; jobs after it are skipped, except those submitted with ``always`` (they hand
    memory back, which must happen whatever went wrong)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[Callable[[], None], int, bool]] = collections.deque()
        self._bytes = 0
        self._error: BaseException | None = None
        self._closed = False
        self._open_fds: list[int] = []
        self._thread = threading.Thread(target=self._run, name="fapm-writer", daemon=True)
        with signals_deferred():
            self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int, *, always: bool = False) -> None:
        with self._cond:
            if not self._jobs and self._error is None and nbytes <= _INLINE:
                # Idle, and a small job: run it here. Handing it over costs two thread
                # switches (and the GIL) per job, which is most of the time of a checkpoint of
                # many small tensors; order is kept, as nothing is queued before it. Only the
                # producer submits, so nothing is queued while it runs.
                inline = True
            else:
                inline = False
                while self._bytes > _IN_FLIGHT and self._error is None:
                    self._cond.wait()
        if inline:
            try:
                job()
            except BaseException as err:
                with self._cond:
                    self._error = err
                raise
            return
        with self._cond:
            if self._error is not None:
                if always:
                    self._jobs.append((job, nbytes, True))  # after the jobs before it
                    self._bytes += nbytes
                    self._cond.notify_all()
                raise self._error
            self._jobs.append((job, nbytes, always))
            self._bytes += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes, always = self._jobs[0]
            try:
                if self._error is None or always:
                    job()
            except BaseException as err:
                with self._cond:
                    self._error = err
            with self._cond:
                self._jobs.popleft()
                self._bytes -= nbytes
                self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every job ran; raise the first error."""
        with self._cond:
            while self._jobs:
                self._cond.wait()
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Skip what is queued, wait for the running job, stop the thread."""
        with self._cond:
            if self._error is None:
                self._error = OutputError("cancelled", hint="")
            while len(self._jobs) > 1:
                self._jobs.pop()
            self._closed = True
            self._cond.notify_all()
        self._thread.join()


_IN_FLIGHT = 64 << 20  # output bytes queued for the worker at most
# Output pages are handed to the disk every _WRITEBACK bytes instead of all at the final fsync:
# the disk works while we compute, and at most ~2 windows of dirty output sit in memory (a
# memory cgroup charges them, and dirty pages cannot be reclaimed until written).
_WRITEBACK = 32 << 20


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the final fsync does it all
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _start_writeback(shard: _OpenShard) -> None:
    """Start writeback of the newest full window; wait for the one before and drop its pages.

    Purely an optimisation (errors are ignored): durability still comes from the fsync at
    close, which then has little left to do."""
    if _SYNC_FILE_RANGE is None or shard.size - shard.flushed < _WRITEBACK:
        return
    if shard.flushed > shard.waited:
        _SYNC_FILE_RANGE(
            shard.fd, shard.waited, shard.flushed - shard.waited,
            _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER,
        )  # fmt: skip
        with contextlib.suppress(OSError):
            os.posix_fadvise(
                shard.fd, shard.waited, shard.flushed - shard.waited, os.POSIX_FADV_DONTNEED
            )
        shard.waited = shard.flushed
    _SYNC_FILE_RANGE(shard.fd, shard.flushed, shard.size - shard.flushed, _SFR_WRITE)
    shard.flushed = shard.size
