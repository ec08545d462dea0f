"""Checkpoints: shards and headers read up front, tensors paired by name, data streamed.

``open_checkpoint`` reads every header (never tensor data) and checks the index against the
shards, so that a broken or mismatched input is refused before any heavy work. ``TensorReader``
then reads one tensor at a time with ``pread`` into a fresh buffer, or into a region of the
caller's ``BufferPool``: no mmap, so resident memory is the tensors in hand, not the page cache
of whole shards.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fapm_cli.errors import InputError, check_signals, signals_deferred
from fapm_cli.io.header import Header, TensorInfo
from fapm_cli.io.source import OTHER_WEIGHT_SUFFIXES, PICKLE_SUFFIXES, Source
from fapm_cli.io.sources import LocalFile

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    shard: str
    info: TensorInfo


@dataclass
class Checkpoint:
    source: Source
    shards: dict[str, Header]  # shard file name -> header, in index order
    tensors: dict[str, TensorRef]  # tensor name -> where it lives
    index_name: str | None = None
    index_metadata: dict[str, object] = field(default_factory=dict)
    extra_files: list[str] = field(default_factory=list)  # config, tokenizer, ...

    @property
    def display(self) -> str:
        return self.source.display

    @property
    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of the first shard (fapm writes the same in every shard)."""
        first = next(iter(self.shards.values()), None)
        return dict(first.metadata) if first else {}

    @property
    def total_bytes(self) -> int:
        return sum(r.info.nbytes for r in self.tensors.values())


def open_checkpoint(source: Source) -> Checkpoint:
    """Read the layout and every header of ``source``; no tensor data is read."""
    if isinstance(source, LocalFile):
        name = source.path.name
        header = source.read_header(name)
        return Checkpoint(
            source, {name: header}, {t: TensorRef(name, i) for t, i in header.tensors.items()}
        )

    files = source.list_files()
    extra = [
        f
        for f in files
        if not f.startswith(".")
        and not f.endswith(INDEX_SUFFIX)
        and not f.endswith(OTHER_WEIGHT_SUFFIXES + PICKLE_SUFFIXES)
    ]
    indexes = sorted(f for f in files if f.endswith(INDEX_SUFFIX))
    if DEFAULT_INDEX in indexes:
        indexes = [DEFAULT_INDEX]
    if len(indexes) > 1:
        raise InputError(
            f"{source.display}: several index files ({', '.join(indexes)})",
            hint="point to a directory holding one model, or to one .safetensors file",
        )
    if indexes:
        return _open_indexed(source, indexes[0], extra)

    shard_names = sorted(f for f in files if f.endswith(".safetensors"))
    if "model.safetensors" in shard_names:
        shard_names = ["model.safetensors"]
    if not shard_names:
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise InputError(
                f"{source.display}: only pickle weights ({pickles[0]}), which fapm refuses "
                "(unpickling can run arbitrary code)",
                hint="convert them to safetensors once in a trusted environment, e.g. "
                "model.save_pretrained(dir, safe_serialization=True)",
            )
        raise InputError(
            f"{source.display}: no .safetensors files in this directory",
            hint="point to a checkpoint directory, a .safetensors file or a Hub id",
        )
    shards = {n: source.read_header(n) for n in shard_names}
    tensors: dict[str, TensorRef] = {}
    for shard, header in shards.items():
        for name, info in header.tensors.items():
            if name in tensors:
                raise InputError(
                    f"{source.display}: tensor {name!r} is in both {tensors[name].shard} "
                    f"and {shard}",
                    hint="remove the stray shard, or add a model.safetensors.index.json",
                )
            tensors[name] = TensorRef(shard, info)
    return Checkpoint(source, shards, tensors, extra_files=extra)


def _open_indexed(source: Source, index_name: str, extra: list[str]) -> Checkpoint:
    where = f"{source.display}/{index_name}"
    try:
        index = json.loads(source.read_text(index_name))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        raise InputError(f"{where}: not valid JSON ({err})", hint="restore the index file") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            f"{where}: no weight_map of tensor name -> shard file",
            hint="restore the index file from the original checkpoint",
        )
    metadata = index.get("metadata")
    shards = {n: source.read_header(n) for n in dict.fromkeys(weight_map.values())}
    tensors: dict[str, TensorRef] = {}
    for name, shard in weight_map.items():
        info = shards[shard].tensors.get(name)
        if info is None:
            raise InputError(
                f"{where}: tensor {name!r} is mapped to {shard}, which does not contain it",
                hint="the index does not belong to these shards; restore it",
            )
        tensors[name] = TensorRef(shard, info)
    for shard, header in shards.items():
        for name in header.tensors:
            owner = tensors.get(name)
            if owner is None or owner.shard != shard:
                what = f"also in {owner.shard}" if owner else "missing from the index"
                raise InputError(
                    f"{source.display}/{shard}: tensor {name!r} is {what}",
                    hint="the index does not match the shards; restore it",
                )
    # Order tensors as they lie on disk (shard order, then offset) for sequential reads.
    rank = {shard: i for i, shard in enumerate(shards)}
    ordered = sorted(tensors.items(), key=lambda kv: (rank[kv[1].shard], kv[1].info.start))
    return Checkpoint(
        source,
        shards,
        dict(ordered),
        index_name=index_name,
        index_metadata=metadata if isinstance(metadata, dict) else {},
        extra_files=extra,
    )


class BufferPool:
    """Memory for tensor reads, reused from one tensor to the next: a ring over one arena.

    A fresh buffer costs a page fault and the zeroing of every 4 kB page on first touch: for
    a 2.5 GB checkpoint, 1-2 s of kernel time per side (measured: reading it into fresh
    buffers 1.5-2.5 s, into reused ones 0.6 s). One request per item holds all its inputs,
    and requests are handed back in the order they were taken (once the writer is done with
    them), so a ring allocator over one arena of ``limit`` bytes serves them without
    fragmentation; ``limit`` is what the tensors in hand need at the peak anyway, so the
    arena adds no memory.

    A request that does not fit yet waits for earlier ones to come back: they all do as the
    writer catches up (never the waiting thread's own work), and with none left the whole
    arena is free, so every request up to ``limit`` is served. A larger request, one still
    waiting after ``wait`` seconds (a safety valve, not expected), and every request after
    ``close`` get a fresh buffer, as without a pool.
    """

    ALIGN = 64  # every region starts at a multiple of this

    @classmethod
    def aligned(cls, nbytes: int) -> int:
        return -(-nbytes // cls.ALIGN) * cls.ALIGN

    def __init__(self, limit: int, wait: float = 30.0) -> None:
        self.limit = limit
        self.wait = wait
        self._cond = threading.Condition()
        self._arena: torch.Tensor | None = None
        self._live: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._head = 0  # next free offset
        self._closed = False
        self.fresh = 0  # requests served outside the arena (for tests and the benchmark)
        self.waited = 0  # requests that had to wait for room

    def _place(self, n: int) -> int | None:
        """Where ``n`` bytes fit in the arena now, or None."""
        if not self._live:
            self._head = 0
            return 0
        tail = next(iter(self._live.values()))[0]  # the oldest region's start
        newest = next(reversed(self._live.values()))[0]
        if newest >= tail:  # live data in [tail, head): room at the end, then at the start
            if self._head + n <= self.limit:
                return self._head
            return 0 if n <= tail else None
        # Wrapped: live data in [tail, end) and [0, head); room only in [head, tail), which is
        # empty when head == tail (comparing head and tail alone cannot tell full from empty).
        return self._head if self._head + n <= tail else None

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined)."""
        import torch

        with self._cond:
            at = None
            if 0 < nbytes <= self.limit and not self._closed:
                deadline = time.monotonic() + self.wait
                at = self._place(nbytes)
                if at is None:
                    self.waited += 1
                while at is None and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    at = self._place(nbytes)
            if at is None:
                self.fresh += 1
                return torch.empty(nbytes, dtype=torch.uint8)
            if self._arena is None:
                self._arena = torch.empty(self.limit, dtype=torch.uint8)
            buf = self._arena[at : at + nbytes]
            self._live[buf.data_ptr()] = [at, 0]
            self._head = at + self.aligned(nbytes)  # offsets stay aligned
            return buf

    def give(self, tensor: torch.Tensor | None) -> None:
        """Hand back the memory ``tensor`` was read into (no-op for fresh buffers)."""
        if tensor is None:
            return
        with self._cond:
            entry = self._live.get(tensor.data_ptr())
            if entry is None:
                return
            entry[1] = 1  # done; the ring's tail moves past every done entry at its front
            while self._live and next(iter(self._live.values()))[1]:
                self._live.popitem(last=False)
            self._cond.notify_all()

    def close(self) -> None:
        """No more waiting: a thread blocked in ``take`` (or any later call) gets fresh memory."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class TensorReader:
    """Reads whole tensors from a checkpoint, one at a time, keeping shard files open."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._fds: dict[str, int] = {}

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.checkpoint.source.local_path(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise InputError(
                    f"{self.checkpoint.display}/{shard}: cannot open ({err.strerror})",
                    hint="the shard disappeared or is unreadable; is something else deleting it?",
                ) from err
            self._fds[shard] = fd
        return fd

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``; read into ``into`` (uint8, exactly its bytes) when given."""
        info = self.checkpoint.tensors[name].info
        flat = self._read(name, 0, info.nbytes, into)
        return flat.reshape(info.shape)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries ``start:stop`` of the flattened tensor ``name``, read from the file alone:
        an operation that needs one chunk of a tensor at a time never holds the whole."""
        itemsize = self.checkpoint.tensors[name].info.dtype.itemsize
        return self._read(name, start * itemsize, stop * itemsize, None)

    def _read(self, name: str, begin: int, end: int, into: torch.Tensor | None) -> torch.Tensor:
        """Bytes ``begin:end`` of tensor ``name``'s data, as a flat tensor of its dtype."""
        import torch

        ref = self.checkpoint.tensors[name]
        info = ref.info
        dtype = getattr(torch, info.dtype.torch_name)
        nbytes = end - begin
        if nbytes <= 0:
            return torch.empty(0, dtype=dtype)
        fd = self._fd(ref.shard)
        if into is not None:
            assert into.dtype == torch.uint8 and into.numel() == nbytes
            buf: bytearray | ctypes.Array[ctypes.c_char] = (ctypes.c_char * nbytes).from_address(
                into.data_ptr()
            )
        else:
            buf = bytearray(nbytes)
        view = memoryview(buf).cast("B")
        done = 0
        try:
            while done < nbytes:  # one read returns at most ~2 GiB on Linux
                got = os.preadv(fd, [view[done:]], info.start + begin + done)
                if got == 0:
                    break
                done += got
        except OSError as err:
            raise InputError(
                f"{self.checkpoint.display}/{ref.shard}: read of tensor {name!r} failed "
                f"({err.strerror})",
                hint="the file is damaged or was removed during the run",
            ) from err
        if done != nbytes:
            raise InputError(
                f"{self.checkpoint.display}/{ref.shard}: file ended inside tensor {name!r}",
                hint="the file was truncated during the run; download it again",
            )
        if into is not None:
            return into.view(dtype)
        return torch.frombuffer(buf, dtype=dtype)

    def release_shard(self, shard: str) -> None:
        fd = self._fds.pop(shard, None)
        if fd is not None:
            os.close(fd)
        self.checkpoint.source.release(shard)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# Beyond the next item, the reader may run ahead by at most this many bytes: a checkpoint of
# many small tensors (MoE experts) would otherwise read one tensor at a time, a thread handoff
# per tensor (10,000 tensors of 64 x 64: 1.3 s of waiting). A constant, not a share of the
# model: reading ahead as far as the largest tensor's peak allowed raised the 1.2B pair's peak
# RSS from 1.41 to 1.86 GB (the arena held those reads beside the run's key array).
READ_AHEAD = 64 << 20
# At most this many items read ahead (a bound on queued results, not on bytes).
MAX_AHEAD = 512
# A run whose items read fewer bytes than this on average reads in the consumer's thread: a
# read of a few kB takes microseconds from the page cache, and the reader thread's Python
# work per item then only contends for the GIL with the computation (10,000 tensors of 64 x
# 64: fapm prune 4.1 s with the thread, 3.05 s without; the MoE pair's 4,779 tensors of ~50 kB:
# 3.5 s and 3.06 s; the small pair, 2.1 MB a tensor: the same either way).
PREFETCH_MIN_BYTES = 1 << 20


def read_ahead_limit(held: Sequence[int]) -> int:
    """The bytes the consumer's item and the next item read ahead may hold together."""
    return max(held, default=0)


def ahead_counts(held: Sequence[int], read: Sequence[int], limit: int) -> list[int]:
    """For each item ``j``: how many items after it the reader may hold while the consumer
    is on ``j``: the next one when ``held[j]`` plus its read fits in ``limit`` (the rule that
    never raises the peak the largest item sets), and as many more as fit, with it, in
    READ_AHEAD bytes of reads (and in ``limit`` beside ``held[j]``); at most MAX_AHEAD."""
    cum = list(itertools.accumulate(read, initial=0))
    out = []
    end = 0  # the furthest item read ahead: a window that slides with j
    for j in range(len(held)):
        end = max(end, j)
        while end > j and not _fits(held[j], cum[end + 1] - cum[j + 1], end - j, limit):
            end -= 1
        while (
            end + 1 < len(held)
            and end + 1 - j <= MAX_AHEAD
            and _fits(held[j], cum[end + 2] - cum[j + 1], end + 1 - j, limit)
        ):
            end += 1
        out.append(end - j)
    return out


def _fits(held: int, ahead: int, items: int, limit: int) -> bool:
    """Whether ``items`` items reading ``ahead`` bytes may be read beside one holding ``held``."""
    if held + ahead > max(limit, READ_AHEAD):
        return False
    return ahead <= READ_AHEAD or (items == 1 and held + ahead <= limit)


class Prefetcher:
    """Runs read jobs ahead of the consumer in a thread, only as far as memory allows.

    While the consumer works on job ``j`` the reader may run jobs ``j + 1 .. j + a`` (see
    ``ahead_counts``): job ``j + 1`` if ``held[j]`` (the bytes the consumer holds for ``j`` at
    its peak) plus its read fits in ``limit``, and more only within the constant READ_AHEAD.
    With ``limit`` the largest single ``held``, prefetching never raises the peak that the
    largest tensor sets anyway, beyond READ_AHEAD. ``os.preadv`` releases the GIL, so reads
    overlap the tensor math.
    """

    def __init__(
        self,
        jobs: Sequence[Callable[[], object]],
        held: Sequence[int],
        read: Sequence[int],
        limit: int,
    ) -> None:
        self._jobs = jobs
        self._ahead = ahead_counts(held, read, limit)
        self._cond = threading.Condition()
        self._asked = -1  # the job the consumer is on
        self._results: dict[int, tuple[bool, object]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fapm-reader", daemon=True)
        with signals_deferred():
            self._thread.start()

    def _may_start(self, j: int) -> bool:
        if self._asked >= j or j == 0:
            return True
        return self._asked >= 0 and j - self._asked <= self._ahead[self._asked]

    def _run(self) -> None:
        for j, job in enumerate(self._jobs):
            with self._cond:
                while not self._stop and not self._may_start(j):
                    self._cond.wait()
                if self._stop:
                    return
            try:
                outcome: tuple[bool, object] = (True, job())
            except BaseException as err:  # handed to the consumer, raised there
                outcome = (False, err)
            with self._cond:
                self._results[j] = outcome
                self._cond.notify_all()
            if not outcome[0]:
                return

    def get(self, j: int) -> object:
        with self._cond:
            self._asked = j
            self._cond.notify_all()
            while j not in self._results:
                self._cond.wait()
            ok, value = self._results.pop(j)
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._results.clear()
            self._cond.notify_all()
        self._thread.join()


# -- the one streaming loop ----------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One checkpoint a run reads, item by item.

    ``load[pos]``: the tensor read whole for item ``pos`` (None: nothing, e.g. the operation
    reads what it needs itself through ``reader``). ``shards[pos]``: every shard item ``pos``
    touches on this side (default: the loaded tensor's), so that each shard is released
    (closed, and deleted when it was downloaded under a disk budget) right after its last use.
    """

    reader: TensorReader
    load: Sequence[TensorRef | None]
    shards: Sequence[Sequence[str]] | None = None

    def shards_of(self, pos: int) -> Sequence[str]:
        if self.shards is not None:
            return self.shards[pos]
        ref = self.load[pos]
        return (ref.shard,) if ref is not None else ()


@dataclass
class Step:
    """Item ``pos`` in hand: its loaded tensors, one per side (None where nothing is loaded).

    ``own``: the tensors were read into the loop's own buffers, which the operation may
    overwrite (an output written in place into finetuned's buffer)."""

    pos: int
    tensors: list[torch.Tensor | None]
    own: bool


def stream(
    sides: Sequence[Side],
    *,
    held: Sequence[int],
    progress: Callable[[int], None] = lambda n: None,
    sizes: Sequence[int] | None = None,
    after: Callable[[Callable[[], None]], None] | None = None,
    prefetch: bool = True,
) -> Generator[Step, None, None]:
    """Every item's tensors, in order: the loop under every command.

    ``held[pos]``: the bytes item ``pos`` holds at its peak (its inputs and the operation's
    full-size temporaries), which bounds read-ahead. ``after(fn)``, when given, runs ``fn``
    once the output written so far is consumed (see ``writer.CheckpointWriter.after_written``):
    the inputs are then read into a reused ring of buffers (``BufferPool``), each item's
    handed back through ``after``. ``prefetch``: read the next item in a thread while this one
    is computed, when every side is a local file, the items are not tiny on average
    (PREFETCH_MIN_BYTES) and the memory the largest item needs anyway allows it.
    ``progress(sizes[pos])`` after each item (default: its loaded bytes). Shards are
    released after their last use, also when the consumer stops early."""
    from fapm_cli.io.sources import LocalDir, LocalFile

    n = len(held)
    loaded = [
        [r.info.nbytes if r is not None else 0 for r in (s.load[pos] for s in sides)]
        for pos in range(n)
    ]
    local = all(isinstance(s.reader.checkpoint.source, LocalDir | LocalFile) for s in sides)
    prefetch = prefetch and local and n > 1 and sum(map(sum, loaded)) >= PREFETCH_MIN_BYTES * n
    pool = None
    if after is not None and n:
        # Inputs go into reused buffers; an item's go back once the writer is done with them
        # (the output may be written from finetuned's buffer, see compute.prune).
        pool = BufferPool(inputs_at_peak(loaded, held, prefetch))
    last: dict[tuple[int, str], int] = {}
    for pos in range(n):
        for k, side in enumerate(sides):
            for shard in side.shards_of(pos):
                last[(k, shard)] = pos
    due: dict[int, list[tuple[int, str]]] = {}
    for key, pos in last.items():
        due.setdefault(pos, []).append(key)

    def read(pos: int) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """Item ``pos``'s tensors, and the pool region holding them all."""
        sizes_here = [BufferPool.aligned(b) for b in loaded[pos]]
        total = sum(sizes_here)
        region = pool.take(total) if pool is not None and total else None
        out: list[torch.Tensor | None] = []
        at = 0
        try:
            for side, nbytes, step in zip(sides, loaded[pos], sizes_here, strict=True):
                ref = side.load[pos]
                if ref is None:
                    out.append(None)
                    continue
                into = region[at : at + nbytes] if region is not None else None
                out.append(side.reader.read(ref.info.name, into))
                at += step
        except BaseException:
            if pool is not None:
                pool.give(region)
            raise
        return out, region

    ahead: Prefetcher | None = None
    if prefetch:
        jobs = [lambda pos=pos: read(pos) for pos in range(n)]
        ahead = Prefetcher(jobs, held, [sum(x) for x in loaded], read_ahead_limit(held))
    try:
        for pos in range(n):
            check_signals()
            if ahead is not None:
                tensors, region = ahead.get(pos)  # type: ignore[misc]
            else:
                tensors, region = read(pos)
            yield Step(pos, tensors, own=True)
            if pool is not None and after is not None:
                after(functools.partial(pool.give, region))
            del tensors, region
            for k, shard in due.get(pos, ()):
                sides[k].reader.release_shard(shard)
            progress(sizes[pos] if sizes is not None else sum(loaded[pos]))
    finally:
        if pool is not None:
            pool.close()  # a read waiting for room must not outlive the run
        if ahead is not None:
            ahead.close()
        for side in sides:
            side.reader.close()


def inputs_at_peak(loaded: Sequence[Sequence[int]], held: Sequence[int], prefetch: bool) -> int:
    """The most input bytes in hand at once: one item's, plus those the prefetch rule (see
    ``Prefetcher``) reads ahead of it."""
    pad = BufferPool.ALIGN  # every tensor of a region starts aligned, and so does the region
    region = [sum(sizes) + pad * (len(sizes) + 1) for sizes in loaded]
    ahead = (
        ahead_counts(held, [sum(x) for x in loaded], read_ahead_limit(held))
        if prefetch
        else [0] * len(loaded)
    )
    cum = list(itertools.accumulate(region, initial=0))
    return max((cum[j + 1 + a] - cum[j] for j, a in enumerate(ahead)), default=0)
