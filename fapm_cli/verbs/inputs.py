"""The checkpoints a run reads: opened from what the user typed, sharing one disk budget for
Hub downloads, and what a verb asks of them (local paths, files to copy, fetch costs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fapm_cli.io.reader import Checkpoint, open_checkpoint
from fapm_cli.io.sources import resolve_source

if TYPE_CHECKING:
    from fapm_cli.io.hub import DiskBudget


class Inputs:
    """Opens sources for one run; ``close`` removes downloaded shards still held."""

    def __init__(self, disk_budget: int | None = None, show_progress: bool = False) -> None:
        self.budget: DiskBudget | None = None
        if disk_budget is not None:
            from fapm_cli.io.hub import DiskBudget

            self.budget = DiskBudget(disk_budget)
        self.show_progress = show_progress
        self.opened: dict[str, Checkpoint] = {}  # side label -> checkpoint

    def open(self, side: str, text: str) -> Checkpoint:
        source = resolve_source(text, budget=self.budget, show_progress=self.show_progress)
        checkpoint = open_checkpoint(source)
        self.opened[side] = checkpoint
        return checkpoint

    def local_paths(self) -> list[Path]:
        """Every local input, which the output must not overlap."""
        paths = []
        for c in self.opened.values():
            p = getattr(c.source, "path", None)
            if p is not None:
                paths.append(Path(p))
        return paths

    def fetch_costs(self) -> Callable[[str, str], int]:
        """Bytes each (side, shard) would add to the disk when read (0 unless a download)."""
        from fapm_cli.io.hub import fetch_size

        costs = {
            (side, shard): fetch_size(c.source, shard, header)
            for side, c in self.opened.items()
            for shard, header in c.shards.items()
        }
        return lambda side, shard: costs.get((side, shard), 0)

    def close(self) -> None:
        if self.budget is not None:
            self.budget.close()  # removes shards still held, e.g. after an error

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def extra_files(checkpoint: Checkpoint | None) -> list[tuple[str, Callable[[], str]]]:
    """Non-weight files (config, tokenizer, ...) to copy, with a way to get each locally."""
    if checkpoint is None:
        return []
    return [
        (name, lambda name=name: checkpoint.source.local_path(name))  # type: ignore[misc]
        for name in checkpoint.extra_files
    ]
