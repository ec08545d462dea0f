"""Where a command's checkpoint goes: the whole output, one part of it (``--part I/N``), or the
join of every part (``--finalize``), for every command that writes one.

A command plans its output tensors from headers alone, then hands them to ``Output.open``,
which plans the shards, picks this part's, and opens the writer. The command streams only the
items ``wanted`` by the job, then ``finish``es it; on any error it ``abort``s, and nothing is
left behind. ``finish`` returns the per-tensor records of the whole output: the command's own,
or on ``--finalize`` every part's, read back from their markers.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fapm_cli.errors import OutputError, UsageError
from fapm_cli.io import parts
from fapm_cli.io.header import PlannedTensor
from fapm_cli.io.parts import Part
from fapm_cli.io.writer import CheckpointWriter, check_output_path, plan_shards, shard_names


@dataclass(frozen=True)
class Output:
    """The ``--output``, ``--max-shard-size``, ``--overwrite``, ``--part`` and ``--finalize``
    of one command."""

    path: Path
    max_shard_size: int = 5 * 10**9
    overwrite: bool = False
    part: Part | None = None
    finalize: bool = False
    # Where the inputs are (full local paths, Hub commits): outputs record only their names,
    # so parts and finalize also compare this, not to mix runs on two inputs of one name.
    identity: str = ""

    def __post_init__(self) -> None:
        if self.part is not None and self.finalize:
            raise UsageError(
                "--part and --finalize go in separate runs",
                hint="run each --part I/N, then the same command with --finalize and no --part",
            )

    @property
    def target(self) -> Path:
        """Where this run's files go: the output, or this part's directory."""
        if self.part is None:
            return self.path
        return parts.staging_dir(self.path) / self.part.dirname

    def check(self, inputs: Iterable[Path]) -> None:
        """Refuse, before any work, an output that exists or overlaps an input."""
        check_output_path(self.path, inputs, self.overwrite)

    def open(
        self,
        planned: Sequence[PlannedTensor],
        metadata: dict[str, str],
        options: dict[str, str],
        settings: dict[str, str],
        *,
        background: bool = False,
    ) -> Job:
        """Plan the shards of ``planned`` (in processing order) and open the writer of this
        run's share. ``options`` and ``settings`` (with ``metadata`` and the plan) decide the
        bytes, so parts and finalize made with different values refuse to mix."""
        groups = plan_shards(list(planned), self.max_shard_size)
        plan = list(zip(shard_names(len(groups)), groups, strict=True))
        settings = {"max_shard_size": str(self.max_shard_size), "inputs": self.identity, **settings}
        digest = parts.options_hash(options, metadata, plan, settings)
        mine: list[str] | None = None
        if self.part is not None:
            mine = self.part.shards([name for name, _ in plan])
            staging = parts.staging_dir(self.path)
            try:  # made here, not by the writer: a failed part must not remove its siblings'
                staging.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputError(
                    f"{staging}: cannot create the parts directory ({err.strerror})",
                    hint="choose an output inside a writable directory",
                ) from err
        writer = CheckpointWriter(
            self.target,
            [t for _, group in plan for t in group],
            max_shard_size=self.max_shard_size,
            metadata=metadata,
            overwrite=self.overwrite,
            background=background,
            shards=mine,
        )
        wanted = None
        if mine is not None:
            chosen = set(mine)
            wanted = {t.name for name, group in plan if name in chosen for t in group}
        return Job(self, writer, plan, digest, wanted)


@dataclass
class Job:
    """One opened output: write the ``wanted`` tensors to ``writer``, then ``finish``."""

    output: Output
    writer: CheckpointWriter
    plan: list[tuple[str, list[PlannedTensor]]]
    digest: str
    wanted: Collection[str] | None  # tensor names this run writes (None: every one)

    @property
    def writes_data(self) -> bool:
        """False on --finalize: the tensors are already written, by the parts."""
        return not self.output.finalize

    def wants(self, names: Iterable[str]) -> bool:
        """Whether this run writes any of these stored tensor names (all of an item's)."""
        if not self.writes_data:
            return False
        return self.wanted is None or any(n in self.wanted for n in names)

    def finish(
        self,
        records: list[dict[str, Any]],
        files: Sequence[tuple[str, Callable[[], str]]] = (),
        generated: Callable[[list[dict[str, Any]]], list[tuple[str, str]]] | None = None,
    ) -> list[dict[str, Any]]:
        """Complete the output (or this part, with its marker) and move it into place.
        ``generated(records)`` gives files fapm writes itself (name, text), from the records
        of the whole output (a model card). Returns the per-tensor records of what is now in
        place: on --finalize, every part's."""
        out = self.output
        if out.part is not None:
            self.writer.finish_part(parts.MARKER, parts.marker(out.part, self.digest, records))
            return records
        staging = None
        if out.finalize:
            staging = parts.staging_dir(out.path)
            joined = parts.collect(staging, self.digest, [name for name, _ in self.plan])
            for name, _ in self.plan:
                self.writer.adopt(name, joined.shard_path[name], joined.shard_info[name])
            records = joined.records
        self.writer.finish(files, generated(records) if generated is not None else ())
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        return records

    def abort(self) -> None:
        self.writer.abort()

    @property
    def shard_info(self) -> dict[str, dict[str, object]]:
        return self.writer.shard_info
