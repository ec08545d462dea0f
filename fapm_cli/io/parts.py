"""One run split into N independent parts by output shard, and the step that joins them.

Any command that writes a checkpoint can be split (``prune`` in every form, ``diff``, ``merge``):
the output's shard plan is known from the headers alone, so each part writes its own shards.

Every part computes the same shard plan from the headers alone (``writer.plan_shards`` over the
planned tensors in processing order) and writes only its own run of consecutive shards, into
``OUTPUT.fapm-parts/part-0000I-of-0000N/`` next to the output, with a marker file written last.
``finalize`` checks that every part is there, complete, and made with the same options, then
links the shards into a temporary sibling of the output, writes the index and copies the config
files exactly as a single run would, and renames it into place. The parts together are a
single run's output, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fapm_cli.errors import OutputError, UsageError

MARKER = "fapm-part.json"
MARKER_VERSION = 1
_PART_DIR = re.compile(r"part-(\d{5})-of-(\d{5})")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        """'2/8' -> Part(2, 8). Job schedulers count from 0 or 1: see docs/scale.md."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) or int(m.group(2)) > 99999:
            raise UsageError(
                f"--part {text!r} is not I/N with 1 <= I <= N",
                hint="number parts from 1, e.g. --part 1/4 ... --part 4/4 "
                "(Slurm: --part $((SLURM_ARRAY_TASK_ID+1))/N with --array=0-(N-1))",
            )
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def dirname(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def shards(self, names: list[str]) -> list[str]:
        """This part's shards: a run of consecutive shards, the runs as even as possible, so a
        part reads neighbouring tensors (the inputs' shards too, when sharded alike). With
        more parts than shards, some parts have nothing to do."""
        n = len(names)
        return names[(self.index - 1) * n // self.count : self.index * n // self.count]


def staging_dir(output: Path) -> Path:
    """Where parts go: a sibling of the output, so that finalize can hard-link and rename."""
    return output.parent / f"{output.name}.fapm-parts"


def options_hash(
    options: dict[str, str],
    metadata: dict[str, str],
    plan: list[tuple[str, list[Any]]],
    settings: dict[str, str],
) -> str:
    """A digest of everything that decides the output's bytes: the options, the shards'
    metadata (which names the sources), the shard plan (names, dtypes, shapes) and settings
    such as --max-shard-size. Parts and finalize run with different values refuse to mix."""
    doc = {
        "options": options,
        "metadata": metadata,
        "plan": [
            [name, [[t.name, t.dtype.name, list(t.shape)] for t in group]] for name, group in plan
        ],
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def options_doc(opts: object) -> dict[str, str]:
    """A dataclass of options as the text ``options_hash`` digests (None: no options)."""
    if opts is None:
        return {}
    return {f.name: repr(getattr(opts, f.name)) for f in fields(opts)}  # type: ignore[arg-type]


def marker(part: Part, digest: str, records: list[dict[str, Any]]) -> dict[str, object]:
    """What a finished part leaves beside its shards: which split, made how, and the per-tensor
    records of the command (JSON objects), so that finalize reports what one run reports."""
    return {
        "fapm_part": MARKER_VERSION,
        "part": part.index,
        "parts": part.count,
        "options_sha256": digest,
        "tensors": records,
    }


@dataclass(frozen=True)
class Collected:
    """Every part's marker, checked: where each shard lies and its index entry."""

    count: int
    shard_path: dict[str, Path]
    shard_info: dict[str, dict[str, object]]
    records: list[dict[str, Any]]  # every part's per-tensor records, in part order


def collect(staging: Path, digest: str, plan_names: list[str]) -> Collected:
    """Read and check the markers of all parts; refuse a missing, unfinished or foreign one."""
    found: dict[int, set[int]] = {}
    try:
        entries = [p for p in staging.iterdir() if _PART_DIR.fullmatch(p.name)]
    except FileNotFoundError as err:
        raise OutputError(
            f"{staging}: no parts found",
            hint="run every part first (--part I/N), then the same command with --finalize and the "
            "same arguments",
        ) from err
    except OSError as err:
        raise OutputError(
            f"{staging}: {err.strerror}", hint="check the path and permissions"
        ) from err
    for p in entries:
        m = _PART_DIR.fullmatch(p.name)
        assert m is not None
        found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise OutputError(
            f"{staging}: no parts found",
            hint="run every part first (--part I/N), then the same command with --finalize and the "
            "same arguments",
        )
    if len(found) > 1:
        splits = ", ".join(f"{n} parts" for n in sorted(found))
        raise OutputError(
            f"{staging}: parts of different splits ({splits})",
            hint="remove the directories of the split you no longer want (part-*-of-N)",
        )
    count = next(iter(found))
    missing = [i for i in range(1, count + 1) if i not in found[count]]
    if missing:
        raise OutputError(
            f"part {missing[0]}/{count} missing: {staging / Part(missing[0], count).dirname} "
            "does not exist",
            hint=f"run the command with --part {missing[0]}/{count} and the same arguments"
            + (f" (also missing: {', '.join(map(str, missing[1:]))})" if missing[1:] else ""),
        )
    shard_path: dict[str, Path] = {}
    shard_info: dict[str, dict[str, object]] = {}
    records: list[dict[str, Any]] = []
    for i in range(1, count + 1):
        part = Part(i, count)
        where = staging / part.dirname
        record = _read_marker(where, part)
        if record.get("options_sha256") != digest:
            raise OutputError(
                f"part {part} ({where}) was written with different options or inputs",
                hint=f"run --part {part} again with exactly the arguments given to --finalize",
            )
        expected = part.shards(plan_names)
        shards = record.get("shards")
        if not isinstance(shards, dict) or sorted(shards) != sorted(expected):
            raise OutputError(
                f"part {part} ({where}): its shards are not the plan's",
                hint=f"run --part {part} again with exactly the arguments given to --finalize",
            )
        for name in expected:
            shard_path[name] = where / name
            shard_info[name] = shards[name]
        records.extend(record.get("tensors", []))
    return Collected(count, shard_path, {n: shard_info[n] for n in plan_names}, records)


def _read_marker(where: Path, part: Part) -> dict[str, Any]:
    path = where / MARKER
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise OutputError(
            f"part {part} incomplete: {path} missing",
            hint=f"run --part {part} again with the same arguments",
        ) from err
    except (OSError, ValueError) as err:
        raise OutputError(
            f"part {part}: {path} is unreadable",
            hint=f"run --part {part} again with the same arguments",
        ) from err
    if not isinstance(record, dict) or record.get("fapm_part") != MARKER_VERSION:
        raise OutputError(
            f"part {part}: {path} is not a fapm part marker",
            hint=f"run --part {part} again with the same arguments",
        )
    return record
