"""``diff``, ``prune`` on task vectors, and ``merge``: the same reader, engine and writer.

- ``diff(base, finetuned)`` writes the dense task vector ``finetuned - base``.
- ``prune(..., task_vector=TV)`` rebuilds finetuned from base + TV tensor by tensor and runs the
  engine's own loop (``engine.run_prune``); ``save=TASK_VECTOR`` writes the pruned task vector
  (dense or compact) instead of the merged model.
- ``merge(base, inputs)`` writes ``base + sum_i w_i * tau_i`` in one pass, where each input is a
  task vector (dense or compact) or a fine-tune pruned on the fly with ``engine.iter_keep_masks``.

Every function plans from headers first (mismatches refused before tensor data is read), then
streams one tensor at a time: memory is a few times the largest tensor, never a state dict.

Exactness (docs/formats.md): a dense delta is written only after checking, tensor by tensor, that
``taskvector.reconstruct(base, delta)`` gives the target bytes back. The output layout is planned
before any data is seen, so the first pass assumes the narrowest delta dtype; if a tensor fails
the check, that pass is abandoned (nothing is left on disk), every tensor's representation is
decided by a checking pass that writes nothing, and the output is written again. Real checkpoints
take the first pass only; adversarial values (negative zeros, 2^16 exponent gaps) cost two more.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import torch

from fapm_cli import engine, scoring
from fapm_cli import taskvector as tv
from fapm_cli.engine import Action, Item, PruneOptions, PruneReport, TensorResult
from fapm_cli.errors import InputError, MismatchError, UsageError
from fapm_cli.header import DType, PlannedTensor, TensorInfo
from fapm_cli.reader import KIND_KEY, Checkpoint, TensorReader, TensorRef, open_checkpoint
from fapm_cli.scoring import CHUNK, Method
from fapm_cli.sources import resolve_source
from fapm_cli.taskvector import Format, Repr

TASK_VECTOR_KIND = "task-vector"
MODEL_KIND = "model"


class Save(StrEnum):
    MODEL = "model"
    TASK_VECTOR = "task-vector"


# -- reading task vectors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One model tensor as a task vector stores it."""

    name: str
    repr: Repr
    shape: tuple[int, ...]
    model_dtype: DType  # the dtype base + this entry gives
    main: TensorRef  # the delta, the whole values, or (compact) ``<name>::values``
    positions: TensorRef | None = None  # compact: ``<name>::mask`` or ``<name>::idx``

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class TaskVector:
    checkpoint: Checkpoint
    format: Format
    entries: dict[str, Entry]
    warnings: list[str] = field(default_factory=list)

    @property
    def display(self) -> str:
        return self.checkpoint.display

    def finetuned_view(self) -> Checkpoint:
        """The checkpoint the engine would see for finetuned: model names, shapes and dtypes
        (data is rebuilt by ``TaskVectorReader.model``, never read through this view)."""
        tensors = {}
        for name, e in self.entries.items():
            info = TensorInfo(
                name, e.model_dtype, e.shape, e.main.info.start, e.numel * e.model_dtype.itemsize
            )
            tensors[name] = TensorRef(e.main.shard, info)
        c = self.checkpoint
        return Checkpoint(c.source, c.shards, tensors, c.index_name, c.index_metadata, [])


def open_task_vector(checkpoint: Checkpoint, base: Checkpoint) -> TaskVector:
    """Read a task vector's layout (headers, and the tiny shape tensors of a compact one)."""
    meta = checkpoint.metadata
    where = checkpoint.display
    kind = meta.get(KIND_KEY)
    if kind == MODEL_KIND:
        raise InputError(
            f"{where}: is a model written by fapm, not a task vector",
            hint="pass it as --finetuned, or make a task vector with fapm diff",
        )
    fmt = meta.get(tv.FORMAT_KEY, Format.DENSE.value)
    if fmt not in (Format.DENSE.value, Format.COMPACT.value):
        raise InputError(
            f"{where}: unknown task-vector format {fmt!r}", hint="upgrade fapm to read it"
        )
    try:
        common, exceptions = tv.model_dtypes_from_metadata(meta)
        values = tv.values_from_metadata(meta)
    except ValueError as err:
        raise InputError(f"{where}: bad fapm metadata ({err})", hint="rewrite it") from err
    warnings = []
    if kind is None:
        warnings.append(
            f"{where} has no fapm metadata: read as a dense task vector of deltas "
            "(model dtypes taken from base)"
        )

    def model_dtype(name: str, fallback: DType) -> DType:
        if name in exceptions:
            return exceptions[name]
        if common is not None:
            return common
        b = base.tensors.get(name)
        return b.info.dtype if b is not None else fallback

    if fmt == Format.DENSE.value:
        entries = {}
        for name, ref in checkpoint.tensors.items():
            if name in values or not ref.info.dtype.is_float:
                entries[name] = Entry(name, Repr.VALUES, ref.info.shape, ref.info.dtype, ref)
            else:
                dt = model_dtype(name, ref.info.dtype)
                entries[name] = Entry(name, Repr.DELTA, ref.info.shape, dt, ref)
        return TaskVector(checkpoint, Format.DENSE, entries, warnings)

    version = meta.get(tv.COMPACT_VERSION_KEY)
    if version != tv.COMPACT_VERSION:
        raise InputError(
            f"{where}: compact format version {version!r}; this fapm reads version "
            f"{tv.COMPACT_VERSION}",
            hint="upgrade fapm, or rewrite the task vector with this version",
        )
    return TaskVector(checkpoint, Format.COMPACT, _compact_entries(checkpoint), warnings)


def _compact_entries(checkpoint: Checkpoint) -> dict[str, Entry]:
    where = checkpoint.display
    groups: dict[str, dict[str, TensorRef]] = {}
    entries: dict[str, Entry] = {}
    for stored, ref in checkpoint.tensors.items():
        name, sep, part = stored.rpartition(tv.SEP)
        if sep and part in tv.SUFFIXES:
            groups.setdefault(name, {})[part] = ref
        else:  # stored whole
            entries[stored] = Entry(stored, Repr.VALUES, ref.info.shape, ref.info.dtype, ref)
    reader = TensorReader(checkpoint)
    try:
        for name, parts in groups.items():

            def bad(what: str, name: str = name) -> InputError:
                return InputError(
                    f"{where}: compact tensor {name!r}: {what}",
                    hint="the task vector is damaged; write it again with fapm prune",
                )

            if name in entries:
                raise bad("stored both whole and compact")
            if not {tv.VALUES, tv.SHAPE} <= set(parts) or (tv.MASK in parts) == (tv.IDX in parts):
                raise bad(f"needs ::values, ::shape and one of ::mask, ::idx (has {sorted(parts)})")
            shape_ref, values = parts[tv.SHAPE], parts[tv.VALUES]
            if shape_ref.info.dtype.name != "I64" or len(shape_ref.info.shape) != 1:
                raise bad("::shape must be a 1-D int64 tensor")
            if shape_ref.info.numel > 64:
                raise bad(f"::shape has {shape_ref.info.numel} dimensions")
            shape = tuple(int(d) for d in reader.read(f"{name}{tv.SEP}{tv.SHAPE}").tolist())
            if any(d < 0 for d in shape):
                raise bad(f"negative dimension in shape {list(shape)}")
            if len(values.info.shape) != 1 or not values.info.dtype.is_float:
                raise bad("::values must be a 1-D float tensor")
            numel = 1
            for d in shape:
                numel *= d
            kept = values.info.numel
            if tv.MASK in parts:
                pos = parts[tv.MASK]
                if pos.info.dtype.name != "U8" or pos.info.shape != ((numel + 7) // 8,):
                    raise bad(f"::mask must be uint8 of {(numel + 7) // 8} bytes")
            else:
                pos = parts[tv.IDX]
                if pos.info.dtype.is_float or pos.info.shape != (kept,):
                    raise bad(f"::idx must be {kept} integers, one per value")
            if kept > numel:
                raise bad(f"{kept} values for {numel} entries")
            entries[name] = Entry(name, Repr.SPARSE, shape, values.info.dtype, values, pos)
    finally:
        reader.close()
    return entries


class TaskVectorReader:
    """Rebuilds model tensors (or their task-vector contributions) from a task vector."""

    def __init__(self, taskvec: TaskVector) -> None:
        self.tv = taskvec
        self.reader = TensorReader(taskvec.checkpoint)

    def _read(self, ref: TensorRef) -> torch.Tensor:
        return self.reader.read(ref.info.name)

    def mask(self, e: Entry) -> torch.Tensor:
        """The flat keep mask of a compact entry."""
        assert e.positions is not None
        kind = e.positions.info.name.rpartition(tv.SEP)[2]
        try:
            return tv.positions_mask(kind, self._read(e.positions), e.numel, e.main.info.numel)
        except ValueError as err:
            raise InputError(
                f"{self.tv.display}: compact tensor {e.name!r}: {err}",
                hint="the task vector is damaged; write it again with fapm prune",
            ) from err

    def model(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        """The model tensor base + this task vector gives, in the entry's model dtype."""
        e = self.tv.entries[name]
        out = tv.torch_dtype(e.model_dtype)
        if e.repr is Repr.VALUES:
            return self._read(e.main)
        assert base is not None
        if e.repr is Repr.DELTA:
            return tv.reconstruct(base, self._read(e.main), out)
        return tv.apply_sparse(base, self.mask(e), self._read(e.main), out)

    def model_chunks(self, name: str, base: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """``model(name, base)`` flattened, in consecutive chunks: the same bytes, without a
        full-size float32 temporary (a dense delta is added to base one chunk at a time)."""
        e = self.tv.entries[name]
        if e.repr is not Repr.DELTA:
            yield self.model(name, base).reshape(-1)
            return
        assert base is not None
        out = tv.torch_dtype(e.model_dtype)
        b = base.reshape(-1)
        d = self._read(e.main).reshape(-1)
        for c in range(0, b.numel(), CHUNK):
            yield tv.reconstruct(b[c : c + CHUNK], d[c : c + CHUNK], out)

    def contribution(
        self, name: str, base: torch.Tensor, cdt: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau, touched), flat: this task vector's update in ``cdt`` and where it applies."""
        e = self.tv.entries[name]
        b = base.reshape(-1)
        if e.repr is Repr.DELTA:
            d = self._read(e.main).reshape(-1)
            return d.to(cdt), d != 0
        if e.repr is Repr.VALUES:
            v = self._read(e.main).reshape(-1)
            return v.to(cdt) - b.to(cdt), torch.ones(b.numel(), dtype=torch.bool)
        mask = self.mask(e)
        tau = torch.zeros(b.numel(), dtype=cdt)
        tau[mask] = self._read(e.main).to(cdt) - b[mask].to(cdt)
        return tau, mask

    def release_after(self, names: Sequence[str]) -> Callable[[int], None]:
        """A callback releasing each shard after the position of its last use in ``names``."""
        last: dict[str, int] = {}
        for pos, name in enumerate(names):
            e = self.tv.entries.get(name)
            if e is not None:
                for ref in (e.main, e.positions):
                    if ref is not None:
                        last[ref.shard] = pos
        by_pos: dict[int, list[str]] = {}
        for shard, pos in last.items():
            by_pos.setdefault(pos, []).append(shard)

        def release(pos: int) -> None:
            for shard in by_pos.get(pos, ()):
                self.reader.release_shard(shard)

        return release

    def close(self) -> None:
        self.reader.close()


# -- writing task vectors ----------------------------------------------------------------------


class _Unexact(Exception):
    """A delta dtype does not give a tensor back bit for bit (internal: triggers a re-plan)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class TVTensor:
    """How one tensor was written into a task vector (for reports)."""

    name: str
    shape: tuple[int, ...]
    repr: Repr
    dtype: str  # stored dtype (of ::values for compact)
    model_dtype: str
    numel: int
    kept: int  # entries that change base: nonzero deltas, kept positions, or numel for values
    positions: str | None  # compact: "mask" or "idx"
    nbytes: int  # bytes stored for this tensor


@dataclass(frozen=True)
class _Plan:
    item: Item
    repr: Repr
    dtype: DType  # delta dtype (DELTA), model dtype (VALUES), values dtype (SPARSE)
    layout: tv.CompactLayout | None = None

    def planned(self) -> list[PlannedTensor]:
        if self.layout is not None:
            return self.layout.planned()
        return [PlannedTensor(self.item.name, self.dtype, self.item.out.shape)]


def _input_dtypes(item: Item) -> list[DType]:
    refs = (item.base, item.finetuned)
    return [item.out.dtype] + [r.info.dtype for r in refs if r is not None]


def _kept_count(item: Item, opts: PruneOptions | None) -> int:
    n = item.out.nbytes // item.out.dtype.itemsize
    if item.action is Action.BASE:
        return 0
    if item.action is Action.PRUNE and opts is not None:
        return scoring.keep_count(n, opts.sparsity)
    return n


def _plan(
    item: Item,
    fmt: Format,
    opts: PruneOptions | None,
    chosen: dict[str, DType | None],
    forced: DType | None,
) -> _Plan:
    if item.action is Action.COPY:
        return _Plan(item, Repr.VALUES, item.out.dtype)
    if fmt is Format.COMPACT:
        layout = tv.compact_layout(
            item.name, item.out.shape, _kept_count(item, opts), item.out.dtype
        )
        return _Plan(item, Repr.SPARSE, item.out.dtype, layout)
    if forced is not None:
        return _Plan(item, Repr.DELTA, forced)
    dtype = chosen.get(item.name, tv.delta_dtypes(*_input_dtypes(item))[0])
    if dtype is None:
        return _Plan(item, Repr.VALUES, item.out.dtype)
    return _Plan(item, Repr.DELTA, dtype)


def _tv_metadata(plans: Sequence[_Plan], fmt: Format, exact: bool) -> dict[str, str]:
    meta = {tv.FORMAT_KEY: fmt.value}
    if fmt is Format.COMPACT:
        meta[tv.COMPACT_VERSION_KEY] = tv.COMPACT_VERSION
    else:
        meta[tv.DENSE_VERSION_KEY] = tv.DENSE_VERSION
        values = [p.item.name for p in plans if p.repr is Repr.VALUES]
        if values:
            meta[tv.VALUES_KEY] = json.dumps(values, separators=(",", ":"))
    meta.update(tv.model_dtype_metadata({p.item.name: p.item.out.dtype for p in plans}))
    meta["fapm.exact"] = "true" if exact else "false"
    return meta


@dataclass
class _Encoder:
    """Turns one item's target chunks (the model values base + TV must give) into stored
    tensors; for dense deltas it checks that ``reconstruct`` gives each target back."""

    plan: _Plan
    base: torch.Tensor | None  # flat
    finetuned: torch.Tensor | None  # flat
    scale: float
    verify: bool
    begin: Callable[[str], None]
    write: Callable[[torch.Tensor], None]
    kept: int = 0
    _parts: list[torch.Tensor] = field(default_factory=list)
    _previous: int = -1

    def start(self) -> None:
        self.begin(self.plan.planned()[0].name)

    def chunk(self, start: int, stop: int, mask: torch.Tensor | None, target: torch.Tensor) -> None:
        """``mask`` None: every entry kept (BASE items pass an all-False mask)."""
        p = self.plan
        if p.repr is Repr.VALUES:
            self.kept += target.numel()
            self.write(target)
            return
        if p.repr is Repr.SPARSE:
            self._sparse(start, stop, mask, target)
            return
        if p.item.action is Action.BASE or self.finetuned is None:
            delta = torch.zeros(stop - start, dtype=tv.torch_dtype(p.dtype))
        else:
            assert self.base is not None
            bc, fc = self.base[start:stop], self.finetuned[start:stop]
            dd = tv.torch_dtype(p.dtype)
            if self.scale != 1.0:  # DARE's rescaled update, in prune_tensor's arithmetic
                cdt = scoring.compute_dtype(bc.dtype, fc.dtype)
                tau = (fc.to(cdt) - bc.to(cdt)).mul_(self.scale)
            else:  # in the delta dtype when wider: float64 is the fallback for lost bits
                cdt = scoring.compute_dtype(bc.dtype, fc.dtype, dd)
                tau = fc.to(cdt) - bc.to(cdt)
            delta = tau.to(dd)
            if mask is not None:
                delta.masked_fill_(~mask, 0)
        if self.verify:
            assert self.base is not None
            back = tv.reconstruct(self.base[start:stop], delta, target.dtype)
            if not tv.same_bits(back, target):
                raise _Unexact(p.item.name)
        self.kept += int((delta != 0).sum())
        self.write(delta)

    def _sparse(
        self, start: int, stop: int, mask: torch.Tensor | None, target: torch.Tensor
    ) -> None:
        layout = self.plan.layout
        assert layout is not None
        if mask is None:
            mask = torch.ones(stop - start, dtype=torch.bool)
        values = target[mask]
        self.kept += values.numel()
        if self.kept > layout.kept:
            raise AssertionError(f"{layout.name}: more kept entries than planned")
        self.write(values)
        if layout.positions == tv.MASK:
            self._parts.append(tv.pack_mask(mask))
        else:
            where = mask.nonzero().reshape(-1) + start
            dtype = tv.torch_dtype(tv.idx_dtype(layout.numel))
            self._parts.append(tv.encode_gaps(where, self._previous, dtype))
            if where.numel():
                self._previous = int(where[-1])

    def finish(self) -> None:
        layout = self.plan.layout
        if layout is None:
            return
        if self.kept != layout.kept:
            raise AssertionError(f"{layout.name}: kept {self.kept}, planned {layout.kept}")
        pos, shape = layout.planned()[1:]
        self.begin(pos.name)
        for part in self._parts:
            self.write(part)
        self.begin(shape.name)
        self.write(torch.tensor(layout.shape, dtype=torch.int64))

    def record(self) -> TVTensor:
        p = self.plan
        nbytes = sum(t.nbytes for t in p.planned())
        return TVTensor(
            p.item.name,
            p.item.out.shape,
            p.repr,
            p.dtype.name,
            p.item.out.dtype.name,
            p.item.out.nbytes // p.item.out.dtype.itemsize,
            self.kept,
            p.layout.positions if p.layout else None,
            nbytes,
        )


def _dare_scale(opts: PruneOptions | None) -> float:
    """DARE rescales what it keeps by 1 / (1 - s), exactly as ``engine.prune_tensor`` does."""
    if opts is None or opts.method is not Method.RANDOM or not 0 < opts.sparsity < 1:
        return 1.0
    return float(1 / (1 - opts.sparsity))


def _encode_item(
    plan: _Plan,
    base: torch.Tensor | None,
    finetuned: torch.Tensor | None,
    opts: PruneOptions | None,
    verify: bool,
    begin: Callable[[str], None],
    write: Callable[[torch.Tensor], None],
) -> tuple[TensorResult | None, TVTensor]:
    """Write one item of a task vector. ``opts`` None: a diff (everything kept, no scoring)."""
    item = plan.item
    b = base.reshape(-1) if base is not None else None
    f = finetuned.reshape(-1) if finetuned is not None else None
    scale = _dare_scale(opts) if item.action is Action.PRUNE else 1.0
    enc = _Encoder(plan, b, f, scale, verify, begin, write)
    enc.start()
    result: TensorResult | None = None
    if opts is None:  # diff: the target is finetuned itself
        assert f is not None
        out = tv.torch_dtype(item.out.dtype)
        for c in range(0, f.numel(), CHUNK):
            enc.chunk(c, min(c + CHUNK, f.numel()), None, f[c : c + CHUNK].to(out))
    else:
        state: dict[str, object] = {"pos": 0, "mask": None}
        none_kept = item.action is Action.BASE

        def on_mask(start: int, stop: int, mask: torch.Tensor) -> None:
            state["mask"] = (start, mask)

        def on_target(chunk: torch.Tensor) -> None:
            start = int(state["pos"])  # type: ignore[call-overload]
            stop = start + chunk.numel()
            state["pos"] = stop
            pending = state["mask"]
            mask: torch.Tensor | None = None
            if pending is not None:
                assert isinstance(pending, tuple) and pending[0] == start
                mask = pending[1]
            elif none_kept:
                mask = torch.zeros(stop - start, dtype=torch.bool)
            enc.chunk(start, stop, mask, chunk.reshape(-1))

        result = engine.process_item(item, base, finetuned, opts, on_target, on_mask=on_mask)
    enc.finish()
    return result, enc.record()


def _pairs(
    base: Checkpoint,
    finetuned: Checkpoint,
    items: Sequence[Item],
    read_finetuned: Callable[[Item, torch.Tensor | None], torch.Tensor] | None,
    progress: Callable[[int], None],
    after: Callable[[int], None] = lambda pos: None,
) -> Iterator[tuple[Item, torch.Tensor | None, torch.Tensor | None]]:
    """(item, base tensor, finetuned tensor) one at a time, shards released after last use."""
    base_reader = TensorReader(base)
    ft_reader = TensorReader(finetuned)
    last_use = engine._last_uses(items)
    try:
        for pos, item in enumerate(items):
            b = base_reader.read(item.name) if item.base is not None else None
            f = None
            if item.finetuned is not None:
                f = read_finetuned(item, b) if read_finetuned else ft_reader.read(item.name)
            yield item, b, f
            del b, f
            for reader, side in ((base_reader, "base"), (ft_reader, "finetuned")):
                for shard in last_use.get((side, pos), ()):
                    reader.release_shard(shard)
            after(pos)
            progress(item.read_bytes)
    finally:
        base_reader.close()
        ft_reader.close()


@dataclass(frozen=True)
class _TVOutput:
    results: list[TensorResult]
    tensors: list[TVTensor]
    shards: dict[str, dict[str, object]]
    passes: int


def _write_task_vector(
    base: Checkpoint,
    finetuned: Checkpoint,
    items: Sequence[Item],
    opts: PruneOptions | None,
    fmt: Format,
    forced: DType | None,
    metadata: dict[str, str],
    output: Path,
    *,
    read_finetuned: Callable[[Item, torch.Tensor | None], torch.Tensor] | None,
    after: Callable[[int], None],
    max_shard_size: int,
    overwrite: bool,
    progress: engine.Progress,
) -> _TVOutput:
    """Stream a task vector to ``output``; re-plan once if a delta dtype is not exact."""
    from fapm_cli.writer import CheckpointWriter

    verify = forced is None
    chosen: dict[str, DType | None] = {}
    for attempt in range(2):
        plans = [_plan(i, fmt, opts, chosen, forced) for i in items]
        writer = CheckpointWriter(
            output,
            [t for p in plans for t in p.planned()],
            max_shard_size=max_shard_size,
            metadata={**metadata, **_tv_metadata(plans, fmt, verify)},
            overwrite=overwrite,
        )
        results: list[TensorResult] = []
        records: list[TVTensor] = []
        try:
            progress.start(sum(i.read_bytes for i in items), "task vector")
            stream = _pairs(base, finetuned, items, read_finetuned, progress.advance, after)
            for plan, (_, b, f) in zip(plans, stream, strict=True):
                result, record = _encode_item(plan, b, f, opts, verify, writer.begin, writer.write)
                if result is not None:
                    results.append(result)
                records.append(record)
            writer.finish(())
            return _TVOutput(results, records, writer.shard_info, 1 + 2 * attempt)
        except _Unexact:
            writer.abort()
            if attempt:
                raise AssertionError("a checked representation failed its own check") from None
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.close()
        chosen = _choose_representations(base, finetuned, items, opts, read_finetuned, after)
    raise AssertionError("unreachable")


def _choose_representations(
    base: Checkpoint,
    finetuned: Checkpoint,
    items: Sequence[Item],
    opts: PruneOptions | None,
    read_finetuned: Callable[[Item, torch.Tensor | None], torch.Tensor] | None,
    after: Callable[[int], None],
) -> dict[str, DType | None]:
    """For every delta tensor, the narrowest dtype that gives it back exactly (None: values)."""
    chosen: dict[str, DType | None] = {}

    def discard(_: object) -> None:
        pass

    for item, b, f in _pairs(base, finetuned, items, read_finetuned, discard, after):
        if item.action is Action.COPY:
            continue
        chosen[item.name] = None
        for dtype in tv.delta_dtypes(*_input_dtypes(item)):
            try:
                _encode_item(_Plan(item, Repr.DELTA, dtype), b, f, opts, True, discard, discard)
            except _Unexact:
                continue
            chosen[item.name] = dtype
            break
    return chosen


# -- diff --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffReport:
    output: str
    base: str
    finetuned: str
    tensors: list[TVTensor]
    shards: dict[str, dict[str, object]]
    exact: bool
    passes: int
    seconds: float
    warnings: list[str]


def _open(text: str) -> Checkpoint:
    return open_checkpoint(resolve_source(text))


def diff(
    base_source: str,
    finetuned_source: str,
    output: str,
    *,
    dtype: DType | None = None,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: engine.Progress | None = None,
) -> DiffReport:
    """Write the task vector ``finetuned - base`` (dense) to ``output``.

    ``dtype`` None: per tensor the narrowest exact delta dtype (see module docstring); a dtype
    stores every delta in it, which is lossy unless it happens to be exact.
    """
    from fapm_cli.writer import check_output_path

    started = time.monotonic()
    base = _open(base_source)
    finetuned = _open(finetuned_source)
    items = engine.plan_prune(base, finetuned, PruneOptions())
    out = Path(output)
    check_output_path(out, engine._local_paths(base, finetuned), overwrite)
    metadata = _base_metadata(
        base=base.source.provenance(), finetuned=finetuned.source.provenance()
    )
    written = _write_task_vector(
        base,
        finetuned,
        items,
        None,
        Format.DENSE,
        dtype,
        metadata,
        out,
        read_finetuned=None,
        after=lambda pos: None,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress or engine.NoProgress(),
    )
    warnings = []
    if dtype is not None:
        warnings.append(
            f"--dtype {dtype.name.lower()}: deltas are rounded, so base + task vector may differ "
            "from finetuned (the default dtype is exact)"
        )
    return DiffReport(
        str(out),
        base.source.provenance(),
        finetuned.source.provenance(),
        written.tensors,
        written.shards,
        dtype is None,
        written.passes,
        time.monotonic() - started,
        warnings,
    )


def _base_metadata(**sources: str) -> dict[str, str]:
    from fapm_cli import __version__

    meta = {"format": "pt", "fapm.version": __version__, KIND_KEY: TASK_VECTOR_KIND}
    meta.update({f"fapm.{k}": v for k, v in sources.items()})
    return meta


# -- prune on task vectors -------------------------------------------------------------------


@dataclass(frozen=True)
class TVPruneReport:
    prune: PruneReport
    save: Save
    format: Format
    task_vector: str | None  # the input task vector, when one replaced finetuned
    tv_tensors: list[TVTensor]  # how each tensor was stored (save=task-vector)
    passes: int


def prune(
    base_source: str,
    output: str,
    opts: PruneOptions,
    *,
    finetuned_source: str | None = None,
    task_vector_source: str | None = None,
    save: Save = Save.MODEL,
    fmt: Format = Format.DENSE,
    max_shard_size: int = 5 * 10**9,
    files_from: engine.FilesFrom = engine.FilesFrom.FINETUNED,
    overwrite: bool = False,
    progress: engine.Progress | None = None,
) -> TVPruneReport:
    """``engine.prune`` with a task vector in place of finetuned and/or a task vector output.

    With a task vector input each finetuned tensor is rebuilt exactly (``TaskVectorReader``)
    and goes through the engine's own loop, so the result is ``prune(base, finetuned)`` bit
    for bit whenever the task vector is ``diff(base, finetuned)``.
    """
    from fapm_cli.writer import check_output_path

    if (finetuned_source is None) == (task_vector_source is None):
        raise UsageError("give exactly one of --finetuned and --task-vector")
    if save is Save.MODEL and fmt is Format.COMPACT:
        raise UsageError(
            "--format compact applies to --save task-vector only",
            hint="a model is always written dense",
        )
    if fmt is Format.COMPACT and opts.method is Method.RANDOM:
        raise UsageError(
            "--format compact needs a ranked method (fapm, magnitude, ratio)",
            hint="--method random keeps a random number of entries, so the compact layout "
            "cannot be planned before scoring; use --format dense",
        )
    started = time.monotonic()
    progress = progress or engine.NoProgress()
    base = _open(base_source)
    warnings: list[str] = []
    tv_reader: TaskVectorReader | None = None
    if task_vector_source is not None:
        taskvec = open_task_vector(_open(task_vector_source), base)
        warnings += taskvec.warnings
        finetuned = taskvec.finetuned_view()
        tv_reader = TaskVectorReader(taskvec)
        provenance = {"task_vector": finetuned.source.provenance()}
    else:
        assert finetuned_source is not None
        finetuned = _open(finetuned_source)
        provenance = {"finetuned": finetuned.source.provenance()}
    try:
        items = engine.plan_prune(base, finetuned, opts)
        warnings += [
            f"pattern {p!r} matches no tensor" for p in engine.unmatched_patterns(items, opts)
        ]
        if fmt is Format.COMPACT:
            _check_compact_names(items)
        out = Path(output)
        check_output_path(out, engine._local_paths(base, finetuned), overwrite)
        read_ft = None
        after: Callable[[int], None] = _nothing
        if tv_reader is not None:
            reader = tv_reader
            read_ft = lambda item, b: reader.model(item.name, b)  # noqa: E731
            after = reader.release_after([i.name for i in items])
        base_prov = base.source.provenance()
        if save is Save.MODEL:
            results, shards = _prune_model(
                base, finetuned, items, opts, out, read_ft, after,
                engine.provenance(MODEL_KIND, opts, base=base_prov, **provenance),
                files_from, max_shard_size, overwrite, progress,
            )  # fmt: skip
            records: list[TVTensor] = []
            passes = 1
        else:
            written = _write_task_vector(
                base, finetuned, items, opts, fmt, None,
                engine.provenance(TASK_VECTOR_KIND, opts, base=base_prov, **provenance),
                out, read_finetuned=read_ft, after=after, max_shard_size=max_shard_size,
                overwrite=overwrite, progress=progress,
            )  # fmt: skip
            results, shards, records, passes = (
                written.results, written.shards, written.tensors, written.passes,
            )  # fmt: skip
    finally:
        if tv_reader is not None:
            tv_reader.close()
    report = PruneReport(
        str(out),
        base.source.provenance(),
        finetuned.source.provenance(),
        opts,
        results,
        shards,
        time.monotonic() - started,
        warnings,
    )
    return TVPruneReport(report, save, fmt, provenance.get("task_vector"), records, passes)


def _nothing(pos: int) -> None:
    pass


def _check_compact_names(items: Sequence[Item]) -> None:
    for item in items:
        if tv.SEP in item.name:
            raise UsageError(
                f"tensor {item.name!r} has '{tv.SEP}' in its name, which the compact format "
                "reserves",
                hint="use --format dense",
            )


def _prune_model(
    base: Checkpoint,
    finetuned: Checkpoint,
    items: Sequence[Item],
    opts: PruneOptions,
    out: Path,
    read_ft: Callable[[Item, torch.Tensor | None], torch.Tensor] | None,
    after: Callable[[int], None],
    metadata: dict[str, str],
    files_from: engine.FilesFrom,
    max_shard_size: int,
    overwrite: bool,
    progress: engine.Progress,
) -> tuple[list[TensorResult], dict[str, dict[str, object]]]:
    """The merged model, through ``engine.run_prune`` (finetuned rebuilt by ``read_ft``)."""
    from fapm_cli.writer import CheckpointWriter

    writer = CheckpointWriter(
        out, [i.out for i in items], max_shard_size=max_shard_size, metadata=metadata,
        overwrite=overwrite,
    )  # fmt: skip
    pos = {"n": -1}

    def advance(nbytes: int) -> None:  # run_prune calls this once per item, in order
        pos["n"] += 1
        after(pos["n"])
        progress.advance(nbytes)

    try:
        progress.start(sum(i.read_bytes for i in items), "prune")
        results = engine.run_prune(
            base, finetuned, items, opts, engine.Sink(writer.begin, writer.write), advance,
            read_finetuned=read_ft,
        )  # fmt: skip
        # A task vector has no config or tokenizer of its own: "finetuned" files come from base.
        copy_from = base if files_from is not engine.FilesFrom.NONE else None
        if files_from is engine.FilesFrom.FINETUNED and read_ft is None:
            copy_from = finetuned
        writer.finish(engine.extra_files(copy_from) if copy_from else ())
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    return results, writer.shard_info


# -- merge ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeInput:
    kind: str  # "task-vector" or "finetuned"
    source: str  # what the user typed
    weight: float


@dataclass(frozen=True)
class MergeTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    changed: int  # entries whose output bytes differ from base's
    inputs: int  # inputs that hold this tensor


@dataclass(frozen=True)
class MergeReport:
    output: str
    base: str
    inputs: list[dict[str, object]]  # kind, source, provenance, weight, format
    options: PruneOptions | None  # how fine-tunes were pruned, when there are any
    tensors: list[MergeTensor]
    shards: dict[str, dict[str, object]]
    seconds: float
    warnings: list[str]


@dataclass
class _Opened:
    spec: MergeInput
    checkpoint: Checkpoint
    taskvec: TaskVector | None = None
    items: dict[str, Item] = field(default_factory=dict)  # fine-tunes: the engine's plan
    tv_reader: TaskVectorReader | None = None
    reader: TensorReader | None = None

    def has(self, name: str) -> bool:
        return name in (self.taskvec.entries if self.taskvec else self.items)

    def model_dtype(self, name: str) -> DType:
        if self.taskvec is not None:
            return self.taskvec.entries[name].model_dtype
        return self.items[name].out.dtype

    def is_values(self, name: str) -> bool:
        if self.taskvec is not None:
            return self.taskvec.entries[name].repr is Repr.VALUES
        return self.items[name].action is Action.COPY

    def refs(self, name: str) -> list[TensorRef]:
        if self.taskvec is not None:
            e = self.taskvec.entries.get(name)
            return [r for r in (e.main, e.positions) if r is not None] if e else []
        item = self.items.get(name)
        return [item.finetuned] if item and item.finetuned else []


def _check_taskvec_pairs(base: Checkpoint, t: TaskVector) -> None:
    """Refuse, from headers alone, a task vector that does not fit ``base``."""
    missing = [n for n in base.tensors if n not in t.entries]
    if missing:
        raise MismatchError(
            f"{len(missing)} tensor(s) of base {base.display} missing from task vector "
            f"{t.display}: {engine._first(missing)}",
            hint="was the task vector made from this base model?",
        )
    for name, e in t.entries.items():
        b = base.tensors.get(name)
        if b is None:
            if e.repr is not Repr.VALUES:
                raise MismatchError(
                    f"tensor {name!r} of task vector {t.display} is not in base {base.display}",
                    hint="was the task vector made from this base model?",
                )
            continue
        if b.info.shape != e.shape:
            raise MismatchError(
                f"tensor {name!r}: shape {list(b.info.shape)} in base but {list(e.shape)} in "
                f"task vector {t.display}",
                hint="was the task vector made from this base model?",
            )
        if b.info.dtype.is_float != e.model_dtype.is_float:
            raise MismatchError(
                f"tensor {name!r}: {b.info.dtype.name} in base but {e.model_dtype.name} in "
                f"task vector {t.display} (integer vs float)",
                hint="was the task vector made from this base model?",
            )


def merge(
    base_source: str,
    output: str,
    inputs: Sequence[MergeInput],
    *,
    opts: PruneOptions | None = None,
    dtype: DType | None = None,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: engine.Progress | None = None,
) -> MergeReport:
    """Write ``base + sum_i w_i * tau_i`` to ``output`` in one streaming pass.

    Task-vector inputs give tau directly; fine-tune inputs are pruned with ``opts`` (FAPM by
    default) and their kept update is tau. A single input of weight 1 is applied exactly
    (its model bytes: finetuned's kept bytes, or the task vector rebuilt bit for bit); otherwise
    the sum is taken in float32 (float64 if any input is float64) and rounded once to the
    output dtype, and entries no input touches keep base's bytes.
    """
    from fapm_cli.writer import CheckpointWriter, check_output_path

    if not inputs:
        raise UsageError("give at least one --task-vector or --finetuned")
    started = time.monotonic()
    progress = progress or engine.NoProgress()
    opts = replace(opts or PruneOptions(), dtype=dtype)
    base = _open(base_source)
    opened: list[_Opened] = []
    warnings: list[str] = []
    for spec in inputs:
        c = _open(spec.source)
        o = _Opened(spec, c)
        if spec.kind == TASK_VECTOR_KIND:
            o.taskvec = open_task_vector(c, base)
            warnings += o.taskvec.warnings
            _check_taskvec_pairs(base, o.taskvec)
        else:
            o.items = {i.name: i for i in engine.plan_prune(base, c, opts)}
        opened.append(o)

    names = list(base.tensors)
    for o in opened:
        names += [n for n in (o.taskvec.entries if o.taskvec else o.items) if n not in names]
    planned = []
    for name in names:
        first = next(o for o in opened if o.has(name))
        model = first.model_dtype(name)
        out_dtype = dtype if dtype is not None and model.is_float else model
        shape = base.tensors[name].info.shape if name in base.tensors else _shape(first, name)
        planned.append(PlannedTensor(name, out_dtype, shape))

    out = Path(output)
    check_output_path(out, engine._local_paths(base, *(o.checkpoint for o in opened)), overwrite)
    finetunes = [o for o in opened if o.taskvec is None]
    metadata = {
        **(engine.provenance(MODEL_KIND, opts) if finetunes else _model_metadata()),
        "fapm.base": base.source.provenance(),
        "fapm.inputs": json.dumps(
            [
                {
                    "kind": o.spec.kind,
                    "source": o.checkpoint.source.provenance(),
                    "weight": o.spec.weight,
                }
                for o in opened
            ],
            separators=(",", ":"),
        ),
    }
    copy_from = finetunes[0].checkpoint if finetunes else base
    writer = CheckpointWriter(
        out, planned, max_shard_size=max_shard_size, metadata=metadata, overwrite=overwrite
    )
    records: list[MergeTensor] = []
    base_reader = TensorReader(base)
    for o in opened:
        if o.taskvec is not None:
            o.tv_reader = TaskVectorReader(o.taskvec)
        else:
            o.reader = TensorReader(o.checkpoint)
    releases = _release_plan(base, opened, names)
    try:
        total = sum(r.info.nbytes for r in base.tensors.values())
        total += sum(r.info.nbytes for o in opened for n in names for r in o.refs(n))
        progress.start(total, "merge")
        for pos, target in enumerate(planned):
            name = target.name
            b = base_reader.read(name) if name in base.tensors else None
            holders = [o for o in opened if o.has(name)]
            writer.begin(name)
            changed = _merge_tensor(target, b, holders, opts, writer.write)
            records.append(
                MergeTensor(name, target.shape, target.dtype.name, target.nbytes //
                            max(target.dtype.itemsize, 1), changed, len(holders))
            )  # fmt: skip
            nbytes = b.nbytes if b is not None else 0
            nbytes += sum(r.info.nbytes for o in holders for r in o.refs(name))
            del b
            for release in releases.get(pos, ()):
                release()
            progress.advance(nbytes)
        writer.finish(engine.extra_files(copy_from))
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
        base_reader.close()
        for o in opened:
            for r in (o.tv_reader, o.reader):
                if r is not None:
                    r.close()
    return MergeReport(
        str(out),
        base.source.provenance(),
        [
            {
                "kind": o.spec.kind,
                "source": o.spec.source,
                "provenance": o.checkpoint.source.provenance(),
                "weight": o.spec.weight,
                "format": o.taskvec.format.value if o.taskvec else "model",
            }
            for o in opened
        ],
        opts if finetunes else None,
        records,
        writer.shard_info,
        time.monotonic() - started,
        warnings,
    )


def _model_metadata() -> dict[str, str]:
    from fapm_cli import __version__

    return {"format": "pt", "fapm.version": __version__, KIND_KEY: MODEL_KIND}


def _shape(o: _Opened, name: str) -> tuple[int, ...]:
    if o.taskvec is not None:
        return o.taskvec.entries[name].shape
    return o.items[name].out.shape


def _release_plan(
    base: Checkpoint, opened: Sequence[_Opened], names: Sequence[str]
) -> dict[int, list[Callable[[], None]]]:
    """Per position in ``names``, the shard releases due after it (last use of each shard)."""
    last: dict[tuple[int, str], int] = {}
    for pos, name in enumerate(names):
        if name in base.tensors:
            last[(-1, base.tensors[name].shard)] = pos
        for k, o in enumerate(opened):
            for ref in o.refs(name):
                last[(k, ref.shard)] = pos
    plan: dict[int, list[Callable[[], None]]] = {}
    for (k, shard), pos in last.items():
        if k < 0:
            continue  # base is read in place, through its own reader
        o = opened[k]
        reader = o.tv_reader.reader if o.tv_reader is not None else o.reader
        assert reader is not None
        plan.setdefault(pos, []).append(functools.partial(reader.release_shard, shard))
    return plan


def _merge_tensor(
    target: PlannedTensor,
    base: torch.Tensor | None,
    holders: Sequence[_Opened],
    opts: PruneOptions,
    write: Callable[[torch.Tensor], None],
) -> int:
    """Write one merged tensor; returns how many entries differ from base (bitwise)."""
    out = tv.torch_dtype(target.dtype)
    name = target.name
    first = holders[0]
    exact = len(holders) == 1 and first.spec.weight == 1.0
    # Non-float tensors, and tensors only in the inputs, are the first input's values.
    if base is None or not target.dtype.is_float or exact:
        # Chunk by chunk: the peak is the inputs, never a full-size copy of the output.
        changed = 0
        done = 0

        def keep(chunk: torch.Tensor) -> None:
            nonlocal changed, done
            chunk = chunk.reshape(-1)
            write(chunk.contiguous())
            here = base.reshape(-1)[done : done + chunk.numel()] if base is not None else None
            changed += _changed(chunk, here, out)
            done += chunk.numel()

        if first.taskvec is not None:
            assert first.tv_reader is not None
            for chunk in first.tv_reader.model_chunks(name, base):
                keep(chunk.to(out))
        else:
            assert first.reader is not None
            f = first.reader.read(name)
            engine.process_item(first.items[name], base, f, opts, keep)
        return changed

    b = base.reshape(-1)
    cdt = tv.compute_dtype(b.dtype, *(tv.torch_dtype(r.info.dtype) for o in holders
                                      for r in o.refs(name)))  # fmt: skip
    acc = torch.zeros(b.numel(), dtype=cdt)
    touched = torch.zeros(b.numel(), dtype=torch.bool)
    for o in holders:
        weight = o.spec.weight
        if o.tv_reader is not None:
            tau, where = o.tv_reader.contribution(name, base, cdt)
            acc.add_(tau.masked_fill_(~where, 0), alpha=weight)
            touched |= where
            continue
        assert o.reader is not None
        item = o.items[name]
        f = o.reader.read(name).reshape(-1)
        scale = _dare_scale(opts)
        for start, stop, mask in engine.iter_keep_masks(item.name, base, f, opts):
            tau = f[start:stop].to(cdt) - b[start:stop].to(cdt)
            if scale != 1.0:
                tau.mul_(scale)
            acc[start:stop].add_(tau.masked_fill_(~mask, 0), alpha=weight)
            touched[start:stop] |= mask
        del f
    result = torch.where(touched, (b.to(cdt) + acc).to(out), b.to(out))
    write(result)
    return _changed(result, base, out)


def _changed(result: torch.Tensor, base: torch.Tensor | None, out: torch.dtype) -> int:
    r = result.reshape(-1)
    if base is None:
        return r.numel()
    b = base.reshape(-1).to(out)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[r.element_size()]
    return int((r.view(width) != b.view(width)).sum())
