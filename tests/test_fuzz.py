"""Fuzzing: mutated checkpoint files and indexes end in a clean error or in the right result.

A valid checkpoint is mutated at random (bytes of the length prefix, the header and the data;
fields of the header JSON; the index file) and then opened, read and pruned. Every outcome must
be either a ``FapmError`` with exit code 3 (bad input) or 4 (mismatch), or a result that an
independent reader (the safetensors library) and the in-memory reference agree with. Any other
exception is a bug. Files are small, and fapm bounds what it allocates by the file size, so a
mutation cannot make a run allocate much.

``make test`` runs a short, derandomized pass; ``make fuzz`` runs many more examples with fresh
randomness (``FAPM_FUZZ_EXAMPLES``, and failures kept in ``.hypothesis/`` for replay).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save
from typer.testing import CliRunner

from fapm_cli import plan
from fapm_cli.cli.app import app
from fapm_cli.errors import ExitCode, FapmError
from fapm_cli.io.reader import TensorReader, open_checkpoint
from fapm_cli.io.sources import resolve_source
from fapm_cli.verbs import prune as verbs_prune
from tests.raw import encode, stray_temps
from tests.reference import reference_mask

EXAMPLES = int(os.environ.get("FAPM_FUZZ_EXAMPLES", "0"))
LONG = EXAMPLES > 0


def fuzz_settings(short_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or short_examples,
        deadline=None,  # no timing assertions: a slow shared machine is not a failure
        derandomize=not LONG,  # the short run is the same every time
        database=None if not LONG else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=LONG,
    )


CLEAN_CODES = {ExitCode.INPUT, ExitCode.MISMATCH}
SPARSITY = Fraction(1, 2)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 5, generator=gen),
        "b.weight": torch.randn(6, generator=gen).to(torch.bfloat16),
        "c.bias": torch.randn(3, generator=gen).to(torch.float16),
        "d.ids": torch.arange(4, dtype=torch.int64),
        "e.empty": torch.zeros(0, 3),
        "f.scalar": torch.randn((), generator=gen),
    }


BASE = _tensors(0)
FT = {k: (v + 0.1 * torch.ones_like(v)) if v.is_floating_point() else v for k, v in BASE.items()}
BASE_FILE = save(BASE, metadata={"format": "pt"})
FT_FILE = save(FT, metadata={"format": "pt"})
FT_HEADER_LEN = int.from_bytes(FT_FILE[:8], "little")
FT_HEADER = json.loads(FT_FILE[8 : 8 + FT_HEADER_LEN])
FT_DATA = FT_FILE[8 + FT_HEADER_LEN :]
# The finetuned model as three shards and an index (Hugging Face layout).
SHARDS = {
    "model-00001-of-00003.safetensors": ["a.weight", "b.weight"],
    "model-00002-of-00003.safetensors": ["c.bias", "d.ids"],
    "model-00003-of-00003.safetensors": ["e.empty", "f.scalar"],
}
INDEX = {
    "metadata": {"total_size": 0},
    "weight_map": {t: shard for shard, names in SHARDS.items() for t in names},
}


@contextmanager
def workdir() -> Iterator[Path]:
    # Not tmp_path: hypothesis runs many examples inside one test function call.
    d = tempfile.mkdtemp(prefix="fapm-fuzz-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def expected_output(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What pruning must give, from tensors read by the safetensors library."""
    out = {}
    for name, f in ft.items():
        b = base[name]
        if not f.is_floating_point():
            out[name] = _bits(f)
            continue
        mask = reference_mask(b, f, SPARSITY, "fapm").reshape(-1)
        fb, bb = (
            _bits(f).view(-1, f.element_size()),
            _bits(b.to(f.dtype)).view(-1, f.element_size()),
        )
        out[name] = torch.where(mask[:, None], fb, bb).reshape(-1)
    return out


def check_prune(root: Path, ft_source: Path, oracle: dict[str, torch.Tensor] | None) -> str:
    """Prune BASE against ``ft_source``: a clean error, or exactly the expected output.

    Returns the outcome, for ``event`` (``--hypothesis-show-statistics`` counts them).
    """
    base_path = root / "base.safetensors"
    base_path.write_bytes(BASE_FILE)
    out = root / "out"
    error: FapmError | None = None
    try:
        verbs_prune.prune(
            str(base_path), str(ft_source), str(out), plan.PruneOptions(sparsity=SPARSITY)
        )
    except FapmError as err:
        error = err
    if error is not None:
        assert error.exit_code in CLEAN_CODES, error
        assert error.message and "\n" not in error.message
        assert not out.exists()
        assert not stray_temps(root)
        return f"prune: exit {int(error.exit_code)}"
    # fapm accepted the input: the independent reader must have accepted it as well.
    assert oracle is not None, "fapm accepted a checkpoint that safetensors refuses"
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    want = expected_output(BASE, oracle)
    assert set(got) == set(want)
    for name, bits in want.items():
        assert torch.equal(_bits(got[name]), bits), name
    assert not stray_temps(root)
    return "prune: ok"


def check_open(source: Path) -> dict[str, torch.Tensor] | None:
    """Open and read every tensor: a clean error (None), or the tensors fapm read."""
    error: FapmError | None = None
    try:
        ckpt = open_checkpoint(resolve_source(str(source)))
        reader = TensorReader(ckpt)
        try:
            return {name: reader.read(name) for name in ckpt.tensors}
        finally:
            reader.close()
    except FapmError as err:
        error = err
    assert error.exit_code == ExitCode.INPUT, error
    assert error.message and "\n" not in error.message
    return None


def safetensors_reads(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, OSError):
        return None


def check_file(root: Path, blob: bytes) -> str:
    path = root / "ft.safetensors"
    path.write_bytes(blob)
    ours = check_open(path)
    oracle = safetensors_reads(path)
    if ours is not None:
        assert oracle is not None, "fapm read a file that safetensors refuses"
        assert set(ours) == set(oracle)
        for name, t in ours.items():
            assert t.dtype == oracle[name].dtype and t.shape == oracle[name].shape, name
            assert torch.equal(_bits(t), _bits(oracle[name])), name
    outcome = check_prune(root, path, oracle if ours is not None else None)
    assert path.read_bytes() == blob  # the input is never touched
    return outcome


# -- mutations of one file -----------------------------------------------------------------------

positions = st.one_of(
    st.integers(0, 7),  # the length prefix
    st.integers(8, 8 + FT_HEADER_LEN - 1),  # the header JSON
    st.integers(0, len(FT_FILE) - 1),  # anywhere, data included
)


@fuzz_settings(60)
@given(
    edits=st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(FT_FILE))),
    tail=st.binary(max_size=16),
)
def test_byte_mutations(edits: list[tuple[int, int]], cut: int | None, tail: bytes) -> None:
    blob = bytearray(FT_FILE)
    for pos, value in edits:
        blob[pos] = value
    data = bytes(blob[:cut]) + tail if cut is not None else bytes(blob)
    with workdir() as root:
        event(check_file(root, data))


@fuzz_settings(30)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FT_DATA) - 1), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_data_mutations(edits: list[tuple[int, int]]) -> None:
    """Only tensor bytes change: the header stays valid, so every run must succeed, exactly,
    except one whose mutated floats hold a NaN or Inf (by the safetensors library): exit 3."""
    blob = bytearray(FT_FILE)
    for pos, value in edits:
        blob[8 + FT_HEADER_LEN + pos] = value
    finite = all(
        bool(t.isfinite().all()) for t in load(bytes(blob)).values() if t.is_floating_point()
    )
    with workdir() as root:
        outcome = check_file(root, bytes(blob))
    assert outcome == ("prune: ok" if finite else "prune: exit 3")
    event(outcome)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
small_ints = st.integers(-3, 3)
DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8",
          "BOOL", "U64", "F7", "f32", "", "C64", "F8_E8M0"]  # fmt: skip


def _two_ints(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)


@st.composite
def header_mutation(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    header = json.loads(json.dumps(FT_HEADER))
    for _ in range(draw(st.integers(1, 3))):
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            break
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        op = draw(st.sampled_from(
            ["dtype", "shape", "offsets", "shift", "field", "drop", "extra", "entry", "rename",
             "metadata"]
        ))  # fmt: skip
        if not isinstance(entry, dict) and op not in ("entry", "rename", "metadata"):
            op = "entry"
        if op == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
        elif op == "shape":
            entry["shape"] = draw(st.lists(st.integers(-1, 2**64), max_size=4) | json_values)
        elif op == "offsets" and _two_ints(entry.get("data_offsets")):
            b, e = entry["data_offsets"]
            entry["data_offsets"] = [b + draw(small_ints) * 2, e + draw(small_ints) * 2]
        elif op == "shift":
            entry["data_offsets"] = draw(st.lists(st.integers(-1, 2**65), min_size=0, max_size=3))
        elif op in ("field", "offsets"):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif op == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "extra":
            entry[draw(st.text(max_size=5))] = draw(json_values)
        elif op == "entry":
            header[name] = draw(json_values)
        elif op == "rename":
            header[draw(st.text(max_size=8))] = header.pop(name)
        else:
            header["__metadata__"] = draw(json_values)
    return header, draw(st.sampled_from([0, 0, 0, -1, 1, 8, -8]))


@fuzz_settings(60)
@given(mutation=header_mutation())
def test_header_field_mutations(mutation: tuple[dict[str, Any], int]) -> None:
    header, length_delta = mutation
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with workdir() as root:
        event(check_file(root, encode(raw, FT_DATA, length=max(0, len(raw) + length_delta))))


# -- mutations of an index -----------------------------------------------------------------------

shard_names = st.sampled_from(
    [*SHARDS, "missing.safetensors", "../model-00001-of-00003.safetensors", "/etc/passwd",
     "sub/model.safetensors", ".", "..", "", "model.safetensors.index.json"]
) | st.text(max_size=10)  # fmt: skip
tensor_names = st.sampled_from([*FT, "zzz"]) | st.text(max_size=6)


@st.composite
def index_mutation(draw: st.DrawFn) -> str:
    index = json.loads(json.dumps(INDEX))
    wm = index["weight_map"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "key", "drop", "add", "weight_map", "whole", "raw"]))
        if op == "value" and wm:
            wm[draw(st.sampled_from(sorted(wm)))] = draw(shard_names | json_values)
        elif op == "key" and wm:
            wm[draw(tensor_names)] = wm.pop(draw(st.sampled_from(sorted(wm))))
        elif op == "drop" and wm:
            del wm[draw(st.sampled_from(sorted(wm)))]
        elif op == "add":
            wm[draw(tensor_names)] = draw(shard_names)
        elif op == "weight_map":
            index["weight_map"] = draw(json_values)
        elif op == "whole":
            return json.dumps(draw(json_values))
        elif op == "raw":
            text = json.dumps(index)
            cut = draw(st.integers(0, len(text)))
            return text[:cut] + draw(st.text(max_size=4))
        if not isinstance(index.get("weight_map"), dict):
            break
        wm = index["weight_map"]
    return json.dumps(index)


def write_sharded(root: Path) -> Path:
    d = root / "ft"
    d.mkdir()
    for shard, names in SHARDS.items():
        (d / shard).write_bytes(save({n: FT[n] for n in names}, metadata={"format": "pt"}))
    (d / "config.json").write_text("{}")
    return d


def index_oracle(d: Path, text: str) -> dict[str, torch.Tensor] | None:
    """The tensors an index designates, read with json and the safetensors library."""
    try:
        index = json.loads(text)
        wm = index["weight_map"]
        shards = {s: load_file(str(d / s)) for s in set(wm.values())}
        return {name: shards[s][name] for name, s in wm.items()}
    except Exception:  # any way in which the index does not describe valid shards
        return None


@fuzz_settings(60)
@given(text=index_mutation())
def test_index_mutations(text: str) -> None:
    with workdir() as root:
        d = write_sharded(root)
        (d / "model.safetensors.index.json").write_text(text)
        before = {p.name: p.read_bytes() for p in d.iterdir()}
        ours = check_open(d)
        oracle = index_oracle(d, text)
        if ours is not None:
            assert oracle is not None, "fapm accepted an index that does not describe the shards"
            # Every value is a plain file name inside the directory, and the pairing is exact.
            wm = json.loads(text)["weight_map"]
            assert all("/" not in s and s not in ("", ".", "..") for s in wm.values())
            assert set(ours) == set(oracle)
            assert all(torch.equal(_bits(ours[n]), _bits(oracle[n])) for n in ours)
        event(check_prune(root, d, oracle if ours is not None else None))
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before


# -- the same through the command line -----------------------------------------------------------


@fuzz_settings(12)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 8 + FT_HEADER_LEN - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_cli_on_mutated_headers(edits: list[tuple[int, int]]) -> None:
    blob = bytearray(FT_FILE)
    for pos, value in edits:
        blob[pos] = value
    with workdir() as root:
        (root / "base.safetensors").write_bytes(BASE_FILE)
        (root / "ft.safetensors").write_bytes(bytes(blob))
        args = ["prune", "-b", str(root / "base.safetensors"), "-f", str(root / "ft.safetensors")]
        result = CliRunner().invoke(app, [*args, "-o", str(root / "out"), "-s", "0.5", "-q"])
        assert result.exit_code in {0, *CLEAN_CODES}, result.stderr
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        assert result.stdout == ""
        if result.exit_code:
            lines = result.stderr.splitlines()
            assert len(lines) == 2 and lines[0].startswith("error: "), lines
            assert lines[1].startswith("hint: "), lines
            assert not (root / "out").exists()
        assert (root / "ft.safetensors").read_bytes() == bytes(blob)
        assert not stray_temps(root)


def test_the_unmutated_inputs_prune_correctly() -> None:
    """The fuzzers' starting point is valid: otherwise they would test only errors."""
    with workdir() as root:
        check_file(root, FT_FILE)
        assert (root / "out").is_dir()
    with workdir() as root:
        d = write_sharded(root)
        text = json.dumps(INDEX)
        (d / "model.safetensors.index.json").write_text(text)
        assert check_open(d) is not None
        check_prune(root, d, index_oracle(d, text))
        assert (root / "out").is_dir()


@pytest.mark.parametrize("length", [2**64 - 1, 100_000_001, 99_999_999])
def test_length_prefix_is_bounded_before_allocating(length: int) -> None:
    with workdir() as root:
        path = root / "x.safetensors"
        path.write_bytes(encode(b"{}", length=length))
        assert check_open(path) is None
