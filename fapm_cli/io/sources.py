"""Sources: what the user typed (a directory, a file, a Hub id) -> files we can read.

A ``Source`` answers a handful of questions about one checkpoint location: which files it has,
the text of a small file (index, config), the header of a shard, and a local path for a shard's
bytes (fetching it first when it is remote). ``reader.open_checkpoint`` turns that into a
checkpoint; it never needs to know where the bytes live.

Hub ids are handed to ``hub``, the only module that talks to huggingface_hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fapm_cli.errors import InputError
from fapm_cli.io.header import Header, read_header
from fapm_cli.io.source import PICKLE_SUFFIXES, Source, is_plain_filename

if TYPE_CHECKING:
    from fapm_cli.io.hub import DiskBudget


class LocalDir:
    """A checkpoint directory. Symlinked files are fine (the Hugging Face cache is made of them)."""

    def __init__(self, path: Path, display: str) -> None:
        self.path = path
        self.display = display

    def list_files(self) -> list[str]:
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as err:
            raise InputError(
                f"{self.display}: cannot list directory ({err.strerror})",
                hint="check the path and its permissions",
            ) from err
        return [e.name for e in entries if e.is_file()]

    def _file(self, name: str) -> str:
        # ``name`` comes from an index file: it must stay inside the checkpoint directory.
        if not is_plain_filename(name):
            raise InputError(
                f"{self.display}: index names file {name!r} outside the checkpoint directory",
                hint="the index is corrupted or hostile: weight_map values must be file names",
            )
        return str(self.path / name)

    def read_text(self, name: str, limit: int = 50_000_000) -> str:
        path = self._file(name)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as err:
            raise InputError(f"{self.display}/{name}: cannot read ({err.strerror})") from err
        if len(data) > limit:
            raise InputError(
                f"{self.display}/{name}: larger than {limit} bytes, refusing to read",
                hint="this is not an index or config file; restore it from the original",
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"{self.display}/{name}: not UTF-8 text", hint="restore it from the original"
            ) from err

    def read_header(self, name: str) -> Header:
        path = self._file(name)
        if not os.path.isfile(path):
            raise InputError(
                f"{self.display}: shard {name!r} named by the index does not exist",
                hint="the download is incomplete; fetch the missing shard again",
            )
        return read_header(path, f"{self.display}/{name}")

    def local_path(self, name: str) -> str:
        return self._file(name)

    def release(self, name: str) -> None:
        pass

    def provenance(self) -> str:
        return local_name(self.path)


class LocalFile:
    """A single ``.safetensors`` file, seen as a checkpoint with one shard."""

    def __init__(self, path: Path, display: str) -> None:
        self.path = path
        self.display = display

    def list_files(self) -> list[str]:
        return [self.path.name]

    def read_text(self, name: str, limit: int = 50_000_000) -> str:
        raise InputError(
            f"{self.display}: a single file has no {name}",
            hint="pass the checkpoint directory instead of one file",
        )

    def read_header(self, name: str) -> Header:
        return read_header(str(self.path), self.display)

    def local_path(self, name: str) -> str:
        return str(self.path)

    def release(self, name: str) -> None:
        pass

    def provenance(self) -> str:
        return local_name(self.path)


def resolve_source(
    text: str, *, budget: DiskBudget | None = None, show_progress: bool = False
) -> Source:
    """Turn a ``--base``/``--finetuned``/``--task-vector`` value into a Source.

    A path that exists locally always wins; ``./org/name`` is therefore always local. Anything
    else that looks like ``org/name[@revision]`` or ``hf://org/name[@revision]`` is a Hub repo;
    ``budget`` and ``show_progress`` only concern Hub downloads (see ``hub``).
    """
    path = Path(text).expanduser()
    if not text.startswith("hf://") and path.exists():
        if path.is_dir():
            return LocalDir(path, text)
        if path.suffix != ".safetensors":
            if path.suffix in PICKLE_SUFFIXES:
                raise InputError(
                    f"{text}: pickle weights are refused (unpickling can run arbitrary code)",
                    hint="convert them once in a trusted environment, e.g. with "
                    "safetensors.torch.save_file(torch.load(f, weights_only=True), out)",
                )
            raise InputError(
                f"{text}: not a .safetensors file or a checkpoint directory",
                hint="point to a directory with *.safetensors or to one .safetensors file",
            )
        return LocalFile(path, text)
    from fapm_cli.io import (
        hub as hub_source,  # deferred: huggingface_hub is only needed for Hub ids
    )

    if hub_source.looks_like_repo_id(text):
        return hub_source.HubSource.from_text(text, budget=budget, show_progress=show_progress)
    raise InputError(
        f"{text}: no such file or directory",
        hint="give a checkpoint directory, a .safetensors file or a Hub id like org/name@revision",
    )


def local_name(path: Path) -> str:
    """How a local input is recorded in outputs: its directory or file name, never the path
    (outputs get published; the path says where someone's disk keeps their files)."""
    return path.name or Path(os.path.realpath(path)).name or "checkpoint"
