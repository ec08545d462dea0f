"""Reading task vectors (``fapm diff``, ``prune --save task-vector``): their layout from the
headers (dense deltas, whole values, or compact kept values + positions), checked against base,
and the model tensors they rebuild, one at a time (docs/formats.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fapm_cli.compute import taskvector as tv
from fapm_cli.compute.scoring import CHUNK
from fapm_cli.errors import InputError, MismatchError
from fapm_cli.io.header import DType, TensorInfo
from fapm_cli.io.reader import Checkpoint, TensorReader, TensorRef
from fapm_cli.plan import (
    COMPACT_VERSION,
    COMPACT_VERSION_KEY,
    FORMAT_KEY,
    KIND_KEY,
    MODEL_KIND,
    TASK_VECTOR_KIND,
    Format,
    Repr,
    first_names,
)


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
    if kind is None:
        # Read as deltas, a model would give base + model: a silent, plausible-looking wreck.
        raise InputError(
            f"{where}: has no fapm task-vector metadata, so it is not a task vector fapm "
            "can read (a model, or another tool's deltas)",
            hint="pass a fine-tuned model as --finetuned; make task vectors with fapm diff or "
            "fapm prune --save task-vector",
        )
    if kind != TASK_VECTOR_KIND:
        raise InputError(
            f"{where}: is a {kind!r} checkpoint written by fapm, not a task vector",
            hint="make a task vector with fapm diff or fapm prune --save task-vector",
        )
    fmt = meta.get(FORMAT_KEY, Format.DENSE.value)
    if fmt not in (Format.DENSE.value, Format.COMPACT.value):
        raise InputError(
            f"{where}: unknown task-vector format {fmt!r}", hint="upgrade fapm to read it"
        )
    try:
        common, exceptions = tv.model_dtypes_from_metadata(meta)
        values = tv.values_from_metadata(meta)
    except ValueError as err:
        raise InputError(f"{where}: bad fapm metadata ({err})", hint="rewrite it") from err
    warnings: list[str] = []

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

    version = meta.get(COMPACT_VERSION_KEY)
    if version != COMPACT_VERSION:
        raise InputError(
            f"{where}: compact format version {version!r}; this fapm reads version "
            f"{COMPACT_VERSION}",
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
        name = e.main.info.name
        # The delta is read one chunk at a time too: no full-size buffer (4 bytes per entry of
        # a float32 delta), and each chunk is still in cache when it is added to base.
        for c in range(0, b.numel(), CHUNK):
            d = self.reader.read_range(name, c, min(c + CHUNK, b.numel()))
            yield tv.reconstruct(b[c : c + CHUNK], d, out)

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

    def shards(self, name: str) -> list[str]:
        """The shards entry ``name`` reads (its values, and a compact entry's positions)."""
        e = self.tv.entries.get(name)
        if e is None:
            return []
        return list(dict.fromkeys(r.shard for r in (e.main, e.positions) if r is not None))

    def close(self) -> None:
        self.reader.close()


def check_pairs(base: Checkpoint, t: TaskVector) -> None:
    """Refuse, from headers alone, a task vector that does not fit ``base``."""
    missing = [n for n in base.tensors if n not in t.entries]
    if missing:
        raise MismatchError(
            f"{len(missing)} tensor(s) of base {base.display} missing from task vector "
            f"{t.display}: {first_names(missing)}",
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
