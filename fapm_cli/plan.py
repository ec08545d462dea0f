"""What a run will do, decided from headers alone: options, tensor pairing, one action per tensor,
the keep count ``k``, read order and shard release, and the metadata every output carries.

Nothing here imports torch, so the CLI uses these enums and records directly and ``fapm
inspect`` plans in milliseconds. Every command plans with ``plan_prune`` (the one pairing rule,
see ``pairing``) before any tensor data is read, so a mismatch is refused up front.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Protocol, TypeVar

from fapm_cli.errors import MismatchError, ResourceError, UsageError
from fapm_cli.io.header import DType, PlannedTensor
from fapm_cli.io.reader import Checkpoint, TensorRef
from fapm_cli.pairing import pair_error

T = TypeVar("T")

# -- options ------------------------------------------------------------------------------------


class Method(StrEnum):
    FAPM = "fapm"
    MAGNITUDE = "magnitude"
    RATIO = "ratio"
    RANDOM = "random"


def keep_count(numel: int, sparsity: Fraction) -> int:
    """``floor(numel * (1 - s))`` computed exactly (numel 10, s 0.9 -> 1, not 0), in integers:
    Fraction arithmetic (or a cache keyed by a Fraction, whose hash is computed each time) cost
    7 us per tensor of a six-sparsity sweep, 0.07 s on 10,000 tensors."""
    p, q = sparsity.numerator, sparsity.denominator
    return numel * (q - p) // q if p < q else 0


def parse_sparsity(text: str | float) -> Fraction:
    """Sparsity as an exact fraction of its decimal spelling ("0.9" -> 9/10)."""
    try:
        value = Fraction(str(text))
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"sparsity {text!r} is not a number") from err
    if not 0 <= value <= 1:
        raise ValueError(f"sparsity {text} is outside [0, 1]")
    return value


class OnFinetunedOnly(StrEnum):
    ERROR = "error"
    COPY = "copy"


class OnBaseOnly(StrEnum):
    ERROR = "error"
    KEEP = "keep"


class Action(StrEnum):
    PRUNE = "prune"  # scored and pruned
    BASE = "base"  # left at its base value (a --keep-base pattern, or only in base)
    FINETUNED = "finetuned"  # taken whole from finetuned (a --keep-finetuned pattern)
    COPY = "copy"  # not a float tensor, or only in finetuned: copied from finetuned


class FilesFrom(StrEnum):
    FINETUNED = "finetuned"
    BASE = "base"
    NONE = "none"


class Save(StrEnum):
    MODEL = "model"
    TASK_VECTOR = "task-vector"


class Format(StrEnum):
    DENSE = "dense"
    COMPACT = "compact"


class Repr(StrEnum):
    """How one tensor of a task vector is stored."""

    DELTA = "delta"  # dense: model - base in a float dtype
    VALUES = "values"  # the model's values, whole
    SPARSE = "sparse"  # compact: the model's values at kept positions + the positions


@dataclass(frozen=True)
class PruneOptions:
    method: Method = Method.FAPM
    sparsity: Fraction = Fraction(9, 10)
    lam: float = 1.0
    seed: int = 0
    keep_base: tuple[str, ...] = ()
    keep_finetuned: tuple[str, ...] = ()
    on_finetuned_only: OnFinetunedOnly = OnFinetunedOnly.ERROR
    on_base_only: OnBaseOnly = OnBaseOnly.ERROR
    dtype: DType | None = None  # output dtype of float tensors; None: finetuned's

    def __post_init__(self) -> None:
        # Checked here, not only in the CLI, so every command and library caller gets it.
        if not 0 <= self.sparsity <= 1:
            raise UsageError(
                f"sparsity {float(self.sparsity)} is outside [0, 1]",
                hint="sparsity is the fraction of each task vector removed: 0.9 keeps 10%",
            )
        if not math.isfinite(self.lam) or self.lam < 0:
            raise UsageError(
                f"--lam {self.lam} is not a finite number >= 0",
                hint="give a finite --lam >= 0 (default 1.0)",
            )


# -- items: one output tensor each ---------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One output tensor and where its inputs come from."""

    name: str
    action: Action
    base: TensorRef | None
    finetuned: TensorRef | None
    out: PlannedTensor

    @property
    def read_bytes(self) -> int:
        return sum(r.info.nbytes for r in (self.base, self.finetuned) if r is not None)

    @property
    def resized(self) -> bool:
        """Finetuned has more rows here (added tokens): base's rows are pruned as one tensor,
        the added rows taken from finetuned whole (``pairing.rows_added``)."""
        return (
            self.base is not None
            and self.finetuned is not None
            and self.base.info.shape != self.finetuned.info.shape
        )


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def first_names(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def plan_prune(base: Checkpoint, finetuned: Checkpoint, opts: PruneOptions) -> list[Item]:
    """Pair tensors by name and decide each one's action; refuse mismatches up front."""
    tied_base, untied = tied_heads(base, finetuned)
    only_ft = [n for n in finetuned.tensors if n not in base.tensors and n not in tied_base]
    only_base = [n for n in base.tensors if n not in finetuned.tensors and n not in untied]
    if only_ft and only_base:
        renamed = name_prefix(base.tensors, finetuned.tensors)
        if renamed is not None:
            side, prefix = renamed
            raise MismatchError(
                f"tensor names differ by a prefix: {side}'s names are the other's with "
                f"{prefix!r} in front (e.g. {only_ft[0]!r} in finetuned, {only_base[0]!r} "
                "in base)",
                hint="the two were saved by different model classes (e.g. AutoModel and "
                "AutoModelForCausalLM); load the one with the prefix into the other's class "
                "and save_pretrained it, so that both use the same names",
            )
    if only_ft and opts.on_finetuned_only is OnFinetunedOnly.ERROR:
        raise MismatchError(
            f"{len(only_ft)} tensor(s) only in finetuned {finetuned.display}: "
            f"{first_names(only_ft)}",
            hint="check that both are the same architecture; --on-finetuned-only copy "
            "copies them as they are",
        )
    if only_base and opts.on_base_only is OnBaseOnly.ERROR:
        raise MismatchError(
            f"{len(only_base)} tensor(s) only in base {base.display}: {first_names(only_base)}",
            hint="check that both are the same architecture; --on-base-only keep "
            "keeps their base values",
        )
    both = [p for p in opts.keep_base if p in opts.keep_finetuned]
    if both:
        raise UsageError(
            f"pattern {both[0]!r} given to both --keep-base and --keep-finetuned",
            hint="a tensor either keeps its base value or its whole task vector: pick one",
        )

    items: list[Item] = []
    for name, f in finetuned.tensors.items():
        b = base.tensors.get(name) or tied_base.get(name)
        if b is None:
            items.append(Item(name, Action.COPY, None, f, _planned(name, f, opts)))
            continue
        refused = pair_error(name, b.info, f.info)  # shared with `fapm inspect --compare`
        if refused is not None:
            raise refused
        if not f.info.dtype.is_float:
            action = Action.COPY
        elif _match(name, opts.keep_base) and _match(name, opts.keep_finetuned):
            raise UsageError(
                f"tensor {name!r} matches both --keep-base and --keep-finetuned",
                hint="make the patterns disjoint",
            )
        elif _match(name, opts.keep_base):
            action = Action.BASE
        elif _match(name, opts.keep_finetuned):
            action = Action.FINETUNED
        else:
            action = Action.PRUNE
        items.append(Item(name, action, b, f, _planned(name, f, opts)))
    for name in only_base:
        b = base.tensors[name]
        items.append(Item(name, Action.BASE, b, None, _planned(name, b, opts)))
    return items


# The output head a model may tie to its input embedding (``tie_word_embeddings``).
HEAD = "lm_head.weight"
_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")


def tied_heads(base: Checkpoint, finetuned: Checkpoint) -> tuple[dict[str, TensorRef], set[str]]:
    """Tied embeddings on one side only. A side that ties its output head to its input
    embedding saves no ``lm_head.weight``: then base's head *is* its embedding. Returns the
    base tensor to pair with finetuned's head when base ties it, and base's head (left out
    of the output, which follows finetuned's config) when finetuned ties it."""
    embedding = next((e for e in _EMBEDDINGS if e in base.tensors and e in finetuned.tensors), None)
    if embedding is None:
        return {}, set()
    if HEAD in finetuned.tensors and HEAD not in base.tensors:
        return {HEAD: base.tensors[embedding]}, set()
    if HEAD in base.tensors and HEAD not in finetuned.tensors:
        return {}, {HEAD}
    return {}, set()


def name_prefix(base: Collection[str], finetuned: Collection[str]) -> tuple[str, str] | None:
    """``("finetuned", "transformer.")`` when every finetuned name is a base name with that
    prefix (or the same for base): the same model saved by two classes."""
    for side, short, long in (("finetuned", base, finetuned), ("base", finetuned, base)):
        shorts = set(short)
        for name in long:
            for cut in range(name.find(".") + 1, len(name)):
                if name[cut - 1] == "." and name[cut:] in shorts:
                    prefix = name[:cut]
                    if all(n.startswith(prefix) and n[len(prefix) :] in shorts for n in long):
                        return side, prefix
            break  # the first name decides the candidate prefixes
    return None


def plan_warnings(items: Sequence[Item], opts: PruneOptions) -> list[str]:
    """What a plan that runs can still get wrong without a word, said before any work."""
    warnings = [f"pattern {p!r} matches no tensor" for p in unmatched_patterns(items, opts)]
    pruned = [i for i in items if i.action is Action.PRUNE]
    if items and not pruned:
        warnings.append(
            "no tensor is pruned: every one is kept at base, taken whole from finetuned, or "
            "copied (check --keep-base / --keep-finetuned, and that the tensors are floats)"
        )
    mixed = [
        i
        for i in pruned
        if i.base is not None
        and i.finetuned is not None
        and i.base.info.dtype != i.finetuned.info.dtype
    ]
    if mixed:
        i = mixed[0]
        assert i.base is not None and i.finetuned is not None
        warnings.append(
            f"{len(mixed)} tensor(s) have another dtype in base than in finetuned (e.g. "
            f"{i.name!r}: {i.base.info.dtype.name} vs {i.finetuned.info.dtype.name}): their "
            "task vector includes the rounding between the two dtypes, which pruning ranks "
            "as an update; use the base the fine-tune was made from, in its dtype"
        )
    return warnings


def _planned(name: str, main: TensorRef, opts: PruneOptions) -> PlannedTensor:
    dtype = main.info.dtype
    if opts.dtype is not None and dtype.is_float:
        dtype = opts.dtype
    return PlannedTensor(name, dtype, main.info.shape)


def unmatched_patterns(items: Sequence[Item], opts: PruneOptions) -> list[str]:
    """Patterns that select no tensor: almost always a typo worth a warning."""
    names = [i.name for i in items]
    return [
        p
        for p in (*opts.keep_base, *opts.keep_finetuned)
        if not any(fnmatch.fnmatchcase(n, p) for n in names)
    ]


# -- read order, memory and shard release ---------------------------------------------------


def held_bytes(item: Item) -> int:
    """Bytes held while ``item`` is processed, at the peak: its inputs, plus the score keys
    (one int32 or int64 per entry) of a pruned tensor."""
    held = item.read_bytes
    if item.action is Action.PRUNE and item.finetuned is not None:
        wide = item.finetuned.info.dtype.itemsize > 4 or (
            item.base is not None and item.base.info.dtype.itemsize > 4
        )
        held += item.finetuned.info.numel * (8 if wide else 4)
    return held


def item_shards(item: Item) -> list[tuple[str, str]]:
    """(side, shard) of every input shard an item reads, in read order: base, then finetuned."""
    return [
        (side, ref.shard)
        for side, ref in (("base", item.base), ("finetuned", item.finetuned))
        if ref is not None
    ]


def order_for_disk(
    items: Sequence[T],
    cost: Callable[[str, str], int],
    budget: int,
    shards: Callable[[T], Sequence[tuple[str, str]]] = item_shards,  # type: ignore[assignment]
) -> list[T]:
    """Reorder items so that downloaded shards are deleted early and disk use fits ``budget``.

    ``cost(side, shard)`` is what reading that shard puts on disk (0 when local or cached);
    ``shards(item)`` the (side, shard) pairs an item reads. The loop (``reader.stream``)
    fetches a shard at its first read and releases it after its last use, so the order decides
    which shards are on disk together. Items are grouped by the shards they read, and groups
    are taken greedily: fewest new fetches first, then most shards completed; ties keep the
    plan's order, so aligned shardings keep it entirely. Refuses, before anything is fetched,
    a budget that this order cannot keep.
    """
    groups: dict[tuple[tuple[str, str], ...], list[T]] = {}
    for item in items:
        groups.setdefault(tuple(shards(item)), []).append(item)

    def costly(key: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        return [s for s in key if cost(*s) > 0]

    users: dict[tuple[str, str], int] = {}
    for key in groups:
        for shard in costly(key):
            users[shard] = users.get(shard, 0) + 1
    held: set[tuple[str, str]] = set()
    pending = list(groups)
    ordered: list[T] = []
    while pending:

        def rank(entry: tuple[int, tuple[tuple[str, str], ...]]) -> tuple[int, int, int]:
            pos, key = entry
            here = costly(key)
            new = sum(s not in held for s in here)
            completed = sum(users[s] == 1 for s in here)
            return new, -completed, pos

        pos, key = min(enumerate(pending), key=rank)
        pending.pop(pos)
        ordered.extend(groups[key])
        for shard in costly(key):
            users[shard] -= 1
            if users[shard]:
                held.add(shard)
            else:
                held.discard(shard)

    need = disk_needed(ordered, cost, shards)
    if need > budget:
        raise ResourceError(
            f"--disk-budget {budget} bytes is too small: {need} bytes of shards must stay on "
            "disk while the next one is fetched",
            hint=f"raise --disk-budget to at least {need} bytes, or download the checkpoints first",
        )
    return ordered


def disk_needed(
    items: Sequence[T],
    cost: Callable[[str, str], int],
    shards: Callable[[T], Sequence[tuple[str, str]]] = item_shards,  # type: ignore[assignment]
) -> int:
    """The smallest budget ``items`` fit in, processed in this order: the most bytes held at
    the moment a shard is fetched (peak use is that plus the fetched shard)."""
    last: dict[tuple[str, str], int] = {}
    for pos, item in enumerate(items):
        for s in shards(item):
            last[s] = pos
    held: dict[tuple[str, str], int] = {}
    need = 0
    for pos, item in enumerate(items):
        for s in shards(item):  # read order
            if s in held:
                continue
            nbytes = cost(*s)
            if nbytes:
                need = max(need, sum(held.values()))
                held[s] = nbytes
        for s in [s for s in held if last[s] == pos]:
            del held[s]
    return need


# -- progress --------------------------------------------------------------------------------


class Progress(Protocol):
    """Progress callbacks (report.BarProgress draws a bar on a terminal)."""

    def start(self, total_bytes: int, label: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, total_bytes: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


# -- metadata: the keys every output's ``__metadata__`` uses, and the one place that fills them ---

KIND_KEY = "fapm.kind"  # what a checkpoint written by fapm holds: one of the kinds below
MODEL_KIND = "model"
TASK_VECTOR_KIND = "task-vector"
SCORES_KIND = "scores"
KNOWN_KINDS = (MODEL_KIND, TASK_VECTOR_KIND, SCORES_KIND)
PROVENANCE_PREFIX = "fapm."
VERSION_KEY = "fapm.version"
METHOD_KEY = "fapm.method"
LAM_KEY = "fapm.lam"
# Task vectors (docs/formats.md).
FORMAT_KEY = "fapm.format"  # "compact" for compact task vectors; absent means dense
COMPACT_VERSION_KEY = "fapm.compact_version"
COMPACT_VERSION = "1"
DENSE_VERSION_KEY = "fapm.dense_version"
DENSE_VERSION = "1"
# The dtype base + delta gives (one for all tensors, and a JSON object of the exceptions).
MODEL_DTYPE_KEY = "fapm.model_dtype"
MODEL_DTYPES_KEY = "fapm.model_dtypes"
# JSON list of tensors stored as whole values instead of deltas.
VALUES_KEY = "fapm.values"
EXACT_KEY = "fapm.exact"


def provenance(
    kind: str,
    opts: PruneOptions | None = None,
    *,
    lam: float | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``__metadata__`` every output shard carries (safetensors allows str -> str only):
    what it is, how it was made (``opts`` for a pruned output, ``lam`` for scores) and from
    which sources (``fapm.<key>`` for each entry of ``sources``, in order)."""
    from fapm_cli import __version__

    meta = {"format": "pt", VERSION_KEY: __version__, KIND_KEY: kind}
    if opts is not None:
        meta[METHOD_KEY] = opts.method.value
        meta["fapm.sparsity"] = str(
            opts.sparsity if opts.sparsity.denominator != 1 else int(opts.sparsity)
        )
        meta["fapm.sparsity_decimal"] = repr(float(opts.sparsity))
        if opts.method is Method.FAPM:
            meta[LAM_KEY] = repr(opts.lam)
        if opts.method is Method.RANDOM:
            meta["fapm.seed"] = str(opts.seed)
        if opts.keep_base:
            meta["fapm.keep_base"] = ",".join(opts.keep_base)
        if opts.keep_finetuned:
            meta["fapm.keep_finetuned"] = ",".join(opts.keep_finetuned)
    elif lam is not None:  # scores: always FAPM's, and they do not depend on the sparsity
        meta[METHOD_KEY] = Method.FAPM.value
        meta[LAM_KEY] = repr(lam)
    meta.update({f"{PROVENANCE_PREFIX}{k}": v for k, v in (sources or {}).items()})
    return meta
