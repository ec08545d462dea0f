"""Rendering results: JSON objects for scripts, tables for people, progress bars on a terminal.

Results go to stdout; progress, warnings and errors go to stderr. Colour and progress bars only
appear on a terminal, and never when ``NO_COLOR`` is set (colour) or ``--quiet`` is given.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from fapm_cli.engine import PruneReport, TensorResult

JSON_SCHEMA_VERSION = 1


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def console(stream: TextIO | None = None) -> Any:
    from rich.console import Console

    stream = stream or sys.stdout
    return Console(
        file=stream,
        no_color="NO_COLOR" in os.environ,
        force_terminal=None,
        highlight=False,
        soft_wrap=not is_terminal(stream),
    )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


class BarProgress:
    """A tqdm bar by bytes with ETA on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and is_terminal(sys.stderr)
        self._bar: Any = None

    def start(self, total_bytes: int, label: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


def tensor_json(r: TensorResult) -> dict[str, Any]:
    return {
        "name": r.name,
        "shape": list(r.shape),
        "dtype": r.dtype,
        "action": r.action.value,
        "numel": r.numel,
        "kept": r.kept,
        "kept_fraction": _ratio(r.kept, r.numel, 0.0),
        "sq_norm_kept_fraction": _ratio(r.sq_norm_kept, r.sq_norm, 1.0 if r.kept else 0.0),
    }


def prune_json(report: PruneReport) -> dict[str, Any]:
    from fapm_cli import __version__
    from fapm_cli.engine import summarize

    o = report.options
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": "prune",
        "fapm_version": __version__,
        "output": report.output,
        "base": report.base,
        "finetuned": report.finetuned,
        "method": o.method.value,
        "sparsity": float(o.sparsity),
        "lam": o.lam,
        "seed": o.seed,
        "totals": summarize(report.tensors),
        "shards": [{"name": k, **v} for k, v in report.shards.items()],
        "tensors": [tensor_json(r) for r in report.tensors],
        "warnings": report.warnings,
        "seconds": round(report.seconds, 3),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_prune(report: PruneReport) -> None:
    from rich.table import Table

    from fapm_cli.engine import Action, summarize

    totals = summarize(report.tensors)
    counts = {a: sum(1 for r in report.tensors if r.action is a) for a in Action}
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    o = report.options
    table.add_row("output", report.output)
    table.add_row("method", f"{o.method.value}, sparsity {float(o.sparsity):g}"
                  + (f", lam {o.lam:g}" if o.method.value == "fapm" else ""))  # fmt: skip
    table.add_row(
        "tensors",
        f"{counts[Action.PRUNE]} pruned, {counts[Action.BASE]} at base value, "
        f"{counts[Action.FINETUNED]} whole from finetuned, {counts[Action.COPY]} copied",
    )
    table.add_row(
        "task vector kept",
        f"{totals['kept']:,} of {totals['pruned_parameters']:,} entries "
        f"({totals['kept_fraction']:.2%}), "
        f"{totals['sq_norm_kept_fraction']:.2%} of its squared norm",
    )
    size = sum(int(v["bytes"]) for v in report.shards.values())  # type: ignore[call-overload]
    table.add_row(
        "written", f"{len(report.shards)} shard(s), {human_bytes(size)} in {report.seconds:.1f} s"
    )
    console().print(table)
