"""Pairing rules: when two tensors of the same name can be combined, judged from headers alone.

``plan.plan_prune`` refuses a pair by these rules before reading any tensor data, and
``fapm inspect A --compare B`` reports the same differences without importing torch, so that a
CI job can learn in milliseconds whether ``prune`` would accept the two checkpoints.

- Different shapes: incompatible.
- Integer (or bool) on one side, float on the other: incompatible.
- Two different float dtypes (bf16 vs float32), or two different integer dtypes: allowed
  (prune computes in float32 and writes finetuned's dtype), reported as a warning-level difference.
- An embedding or output head with more rows in finetuned (a resized vocabulary: the fine-tune
  added tokens), the other dimensions equal: allowed; the shared rows are pruned, the added
  rows taken from finetuned (``names.is_vocabulary`` says which tensors have one row per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fapm_cli.errors import MismatchError
from fapm_cli.io.header import TensorInfo
from fapm_cli.names import is_vocabulary


class DifferenceKind(StrEnum):
    SHAPE = "shape"
    ROWS = "rows"  # a vocabulary tensor with another number of rows (added tokens)
    DTYPE_KIND = "dtype-kind"  # integer vs float
    DTYPE = "dtype"  # two float dtypes, or two integer dtypes


@dataclass(frozen=True)
class Difference:
    name: str
    kind: DifferenceKind
    a: str  # the first side's shape or dtype, as text
    b: str

    @property
    def incompatible(self) -> bool:
        return self.kind not in (DifferenceKind.DTYPE, DifferenceKind.ROWS)


def differences(name: str, a: TensorInfo, b: TensorInfo) -> list[Difference]:
    """Every way the two header entries of tensor ``name`` differ, most serious first."""
    out: list[Difference] = []
    if a.shape != b.shape:
        kind = DifferenceKind.ROWS if rows_differ(name, a, b) else DifferenceKind.SHAPE
        out.append(Difference(name, kind, str(list(a.shape)), str(list(b.shape))))
    if a.dtype.is_float != b.dtype.is_float:
        out.append(Difference(name, DifferenceKind.DTYPE_KIND, a.dtype.name, b.dtype.name))
    elif a.dtype != b.dtype:
        out.append(Difference(name, DifferenceKind.DTYPE, a.dtype.name, b.dtype.name))
    return out


def rows_differ(name: str, a: TensorInfo, b: TensorInfo) -> bool:
    """A vocabulary tensor whose row counts differ, every other dimension equal."""
    return (
        is_vocabulary(name)
        and len(a.shape) == len(b.shape) >= 1
        and a.shape[1:] == b.shape[1:]
        and a.shape[0] != b.shape[0]
    )


def rows_added(name: str, base: TensorInfo, finetuned: TensorInfo) -> bool:
    """Finetuned added tokens: more rows in this vocabulary tensor than base has."""
    return rows_differ(name, base, finetuned) and finetuned.shape[0] > base.shape[0]


def pair_error(name: str, base: TensorInfo, finetuned: TensorInfo) -> MismatchError | None:
    """The error ``prune`` raises for this pair, or None when the pair is usable."""
    for d in differences(name, base, finetuned):
        if d.kind is DifferenceKind.ROWS and not rows_added(name, base, finetuned):
            return MismatchError(
                f"tensor {name!r}: {d.b} in finetuned but {d.a} in base: fewer rows (tokens) "
                "than base",
                hint="a fine-tune can add tokens to base's vocabulary, not remove them: "
                "check that base is the model this one was fine-tuned from",
            )
        if d.kind is DifferenceKind.SHAPE:
            return MismatchError(
                f"tensor {name!r}: shape {d.a} in base but {d.b} in finetuned",
                hint="base and finetuned must be the same architecture and vocabulary size",
            )
        if d.kind is DifferenceKind.DTYPE_KIND:
            return MismatchError(
                f"tensor {name!r}: {d.a} in base but {d.b} in finetuned (integer vs float)",
                hint="base and finetuned must come from the same model family",
            )
    return None
