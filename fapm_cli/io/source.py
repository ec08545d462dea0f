"""What every checkpoint location answers, wherever its bytes live (``Source``), and the file
name rules shared by the local and the Hub sources. Neither kind is imported here, so both can
import this module (``sources`` picks the kind; ``hub`` implements one)."""

from __future__ import annotations

import os
from typing import Protocol

from fapm_cli.io.header import Header

# Files holding pickled weights: unpickling can run arbitrary code, so fapm never loads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weight files of other formats, never copied next to the output as "non-weight files".
OTHER_WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".h5", ".gguf", ".onnx", ".tflite", ".npz")


class Source(Protocol):
    display: str  # what the user typed, for messages

    def list_files(self) -> list[str]: ...  # top-level file names

    def read_text(self, name: str, limit: int = 50_000_000) -> str: ...

    def read_header(self, name: str) -> Header: ...

    def local_path(self, name: str) -> str: ...  # fetches remote shards first

    def release(self, name: str) -> None: ...  # a shard is no longer needed

    def provenance(self) -> str: ...  # recorded in output metadata


def is_plain_filename(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )
