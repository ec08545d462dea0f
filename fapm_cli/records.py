"""The records every command returns: one per tensor, one per run. Plain data, no torch, so the
CLI and ``report`` render them without importing the engine (``fapm --help`` stays fast).

Score figures are ratios of additive sums (``Sums``), so roll-ups per layer, module type and
(layer, module) cell are exact, not averages of averages.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from fractions import Fraction
from typing import Any, TypeVar

from fapm_cli.names import MODULES
from fapm_cli.plan import Action, Format, PruneOptions, Repr, Save

K = TypeVar("K")


def _plain(record: object) -> dict[str, Any]:
    """A per-tensor record as a JSON object (split runs keep them in their part markers)."""
    out = {f.name: getattr(record, f.name) for f in fields(record)}  # type: ignore[arg-type]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# -- prune ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorResult:
    name: str
    shape: tuple[int, ...]
    dtype: str
    action: Action
    numel: int
    kept: int  # entries of the task vector kept (numel for finetuned/copy, 0 for base)
    sq_norm_kept: float  # sum of tau^2 over kept entries
    sq_norm: float  # sum of tau^2 over all entries

    def to_json(self) -> dict[str, Any]:
        return {**_plain(self), "action": self.action.value}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorResult:
        return cls(**{**d, "shape": tuple(d["shape"]), "action": Action(d["action"])})


def summarize(results: Sequence[TensorResult]) -> dict[str, float | int]:
    pruned = [r for r in results if r.action is Action.PRUNE]
    numel = sum(r.numel for r in pruned)
    kept = sum(r.kept for r in pruned)
    sq = sum(r.sq_norm for r in results)
    sq_kept = sum(r.sq_norm_kept for r in results)
    return {
        "tensors": len(results),
        "pruned_tensors": len(pruned),
        "parameters": sum(r.numel for r in results),
        "pruned_parameters": numel,
        "kept": kept,
        "kept_fraction": kept / numel if numel else 0.0,
        "sq_norm_kept_fraction": sq_kept / sq if sq > 0 else 1.0,
    }


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

    def to_json(self) -> dict[str, Any]:
        return {**_plain(self), "repr": self.repr.value}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TVTensor:
        return cls(**{**d, "shape": tuple(d["shape"]), "repr": Repr(d["repr"])})


@dataclass(frozen=True)
class PruneReport:
    output: str
    base: str
    finetuned: str
    options: PruneOptions
    tensors: list[TensorResult]
    shards: dict[str, dict[str, object]]
    seconds: float
    warnings: list[str]
    save: Save = Save.MODEL
    format: Format = Format.DENSE
    task_vector: str | None = None  # the input task vector, when one replaced finetuned
    stored: list[TVTensor] = field(default_factory=list)  # how each tensor was stored (--save)
    passes: int = 1  # passes over the inputs (a dense task vector may need 3, see encode)


# -- diff and merge -------------------------------------------------------------------------


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

    def to_json(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MergeTensor:
        return cls(**{**d, "shape": tuple(d["shape"])})


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


# -- score: names -> layer and module type, and the figures ---------------------------------


@dataclass(frozen=True)
class Sums:
    """Additive totals over a set of entries; every reported figure is a ratio of two of these."""

    numel: int = 0
    abs_tau: float = 0.0  # sum |tau|
    abs_base: float = 0.0  # sum |base|
    rel: float = 0.0  # sum |tau| / |base| over entries with base != 0
    base_nonzero: int = 0
    positive: int = 0  # entries with FAPM score > 0
    sq: float = 0.0  # sum tau^2
    sq_fapm: float = 0.0  # sum tau^2 over the fapm mask
    sq_magnitude: float = 0.0  # sum tau^2 over the magnitude mask
    kept: int = 0  # entries each mask keeps (both keep exactly floor(numel * (1 - s)))
    overlap: int = 0  # entries both masks keep

    def __add__(self, o: Sums) -> Sums:
        # Written out: the generic form over dataclasses.fields() cost ~5 us a call, and a
        # report adds every tensor's sums four times (total, per layer, per module, grid).
        return Sums(
            self.numel + o.numel,
            self.abs_tau + o.abs_tau,
            self.abs_base + o.abs_base,
            self.rel + o.rel,
            self.base_nonzero + o.base_nonzero,
            self.positive + o.positive,
            self.sq + o.sq,
            self.sq_fapm + o.sq_fapm,
            self.sq_magnitude + o.sq_magnitude,
            self.kept + o.kept,
            self.overlap + o.overlap,
        )

    @property
    def mean_abs_tau(self) -> float | None:
        return self.abs_tau / self.numel if self.numel else None

    @property
    def mean_abs_base(self) -> float | None:
        return self.abs_base / self.numel if self.numel else None

    @property
    def mean_rel_change(self) -> float | None:
        return self.rel / self.base_nonzero if self.base_nonzero else None

    @property
    def base_zero(self) -> int:
        return self.numel - self.base_nonzero

    @property
    def positive_score_fraction(self) -> float | None:
        return self.positive / self.numel if self.numel else None

    @property
    def fapm_sq_norm_kept_fraction(self) -> float | None:
        return self.sq_fapm / self.sq if self.sq > 0 else None

    @property
    def magnitude_sq_norm_kept_fraction(self) -> float | None:
        return self.sq_magnitude / self.sq if self.sq > 0 else None

    @property
    def mask_jaccard(self) -> float | None:
        union = 2 * self.kept - self.overlap
        return self.overlap / union if union else None


# Columns of every row, in display order; --sort takes one of these names.
FIGURES = (
    "numel",
    "mean_abs_tau",
    "mean_abs_base",
    "mean_rel_change",
    "base_zero",
    "positive_score_fraction",
    "fapm_sq_norm_kept_fraction",
    "magnitude_sq_norm_kept_fraction",
    "mask_jaccard",
    "kept",
)


class SortKey(StrEnum):
    NAME = "name"
    LAYER = "layer"
    NUMEL = "numel"
    MEAN_ABS_TAU = "mean_abs_tau"
    MEAN_ABS_BASE = "mean_abs_base"
    MEAN_REL_CHANGE = "mean_rel_change"
    POSITIVE = "positive_score_fraction"
    FAPM_KEPT = "fapm_sq_norm_kept_fraction"
    MAGNITUDE_KEPT = "magnitude_sq_norm_kept_fraction"
    JACCARD = "mask_jaccard"


class PlotMetric(StrEnum):
    MEAN_REL_CHANGE = "mean_rel_change"
    MEAN_ABS_TAU = "mean_abs_tau"
    POSITIVE = "positive_score_fraction"
    FAPM_KEPT = "fapm_sq_norm_kept_fraction"
    JACCARD = "mask_jaccard"


def figures(s: Sums, row: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row of FIGURES for ``s``: the properties' values, computed here in one go and added
    to ``row`` (a new dict by default; a report's row brings its name columns first). A
    sweep's report makes this row for every tensor at every sparsity."""
    row = {} if row is None else row
    n, sq, union = s.numel, s.sq, 2 * s.kept - s.overlap
    row["numel"] = n
    row["mean_abs_tau"] = s.abs_tau / n if n else None
    row["mean_abs_base"] = s.abs_base / n if n else None
    row["mean_rel_change"] = s.rel / s.base_nonzero if s.base_nonzero else None
    row["base_zero"] = n - s.base_nonzero
    row["positive_score_fraction"] = s.positive / n if n else None
    row["fapm_sq_norm_kept_fraction"] = s.sq_fapm / sq if sq > 0 else None
    row["magnitude_sq_norm_kept_fraction"] = s.sq_magnitude / sq if sq > 0 else None
    row["mask_jaccard"] = s.overlap / union if union else None
    row["kept"] = s.kept
    return row


@dataclass(frozen=True)
class TensorScore:
    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: int | None
    module: str
    sums: Sums


@dataclass(frozen=True)
class ForgettingReport:
    base: str
    finetuned: str
    sparsity: Fraction
    lam: float
    tensors: list[TensorScore]  # in the finetuned checkpoint's on-disk order
    skipped: list[str]  # tensors not scored: integer/bool tensors, copied by prune
    scores_output: str | None
    seconds: float

    @functools.cached_property
    def total(self) -> Sums:
        return total(t.sums for t in self.tensors)

    def by_layer(self) -> list[tuple[int | None, Sums]]:
        """Per layer, in layer order; tensors outside any layer last (key None)."""
        groups = self._group(operator.attrgetter("layer"))
        return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))

    def by_module(self) -> list[tuple[str, Sums]]:
        groups = self._group(operator.attrgetter("module"))
        return [(m, groups[m]) for m in MODULES if m in groups]

    def grid(self) -> dict[tuple[int | None, str], Sums]:
        return self._group(operator.attrgetter("layer", "module"))

    def _group(self, key: Callable[[TensorScore], K]) -> dict[K, Sums]:
        keys = list(map(key, self.tensors))
        if len(set(keys)) == 1:
            # One group of every tensor (the one layer, module and cell of a grid of experts)
            # adds the values the total adds, in the same order: that sum once, not four times.
            return {keys[0]: self.total}
        members: dict[K, list[Sums]] = {}
        for k, t in zip(keys, self.tensors, strict=True):
            members.setdefault(k, []).append(t.sums)
        return {k: total(v) for k, v in members.items()}


# Each field of Sums, and whether it counts (an int: exact in any order, summed by sum()).
_FIELDS = [(operator.attrgetter(f.name), type(f.default) is int) for f in fields(Sums)]


def total(parts: Iterable[Sums]) -> Sums:
    """``Sums() + a + b + ...``, field by field in C: the counts by sum(), the floats by reduce
    over operator.add (the same additions in the same order; builtin sum would not promise
    that order for floats, and 3.12's does not keep it)."""
    rows = list(parts)
    values: list[Any] = [
        sum(map(get, rows)) if counts else functools.reduce(operator.add, map(get, rows), 0.0)
        for get, counts in _FIELDS
    ]
    return Sums(*values)


def sort_tensors(
    rows: Sequence[TensorScore], key: SortKey | None, top: int | None
) -> list[TensorScore]:
    """Numbers largest first (undefined values last), names and layers in ascending order."""
    out = list(rows)
    if key is SortKey.NAME:
        out.sort(key=lambda t: t.name)
    elif key is SortKey.LAYER:
        out.sort(key=lambda t: (t.layer is None, t.layer or 0))
    elif key is not None:
        values = {t.name: getattr(t.sums, key.value) for t in out}
        out.sort(key=lambda t: (values[t.name] is None, -(values[t.name] or 0)))
    return out[:top] if top is not None else out
