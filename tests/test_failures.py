"""The failure catalogue: one named fixture per bad input, each ending in a clean, documented error.

Every case runs ``fapm prune`` and checks the same contract: the documented exit code, exactly
``error: ...`` (naming the file or tensor) and ``hint: ...`` on stderr, nothing on stdout, no
traceback, and the whole temporary tree byte-for-byte as it was (no output, no temporary
directory, inputs unchanged). A few inputs that look odd but are valid (empty and scalar tensors,
a Hugging Face cache made of symlinks) are checked to give the right result instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from fapm_cli.errors import ExitCode
from tests.checkpoints import load_checkpoint, make_pair, tree_hash, write_checkpoint
from tests.raw import TMP_MARK, read_raw, stray_temps, write_raw
from tests.reference import reference_prune

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
INDEX = "model.safetensors.index.json"


@dataclass
class Pair:
    root: Path
    base: Path  # one model.safetensors
    ft: Path  # three shards, an index and a config.json
    base_tensors: dict[str, torch.Tensor]
    ft_tensors: dict[str, torch.Tensor]

    def shard(self, i: int) -> Path:
        return self.ft / SHARDS[i - 1]

    def index(self) -> dict[str, Any]:
        return json.loads((self.ft / INDEX).read_text())

    def write_index(self, index: dict[str, Any]) -> None:
        (self.ft / INDEX).write_text(json.dumps(index))


@dataclass
class Case:
    """A broken invocation and the error it must produce."""

    base: Path | str
    finetuned: Path | str
    code: ExitCode
    names: tuple[str, ...]  # each must appear in the error line
    output: Path | str | None = None  # default: <tmp>/out
    extra: tuple[str, ...] = ()
    by_typer: bool = False  # rejected by option parsing (typer's own "Error: Invalid value")
    hint: str = ""  # must appear in the hint line


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    base, ft = make_pair(seed=3)
    b = write_checkpoint(tmp_path / "base", base)
    f = write_checkpoint(tmp_path / "ft", ft, shard_bytes=3000, config={"model_type": "x"})
    assert sorted(p.name for p in f.glob("*.safetensors")) == SHARDS
    return Pair(tmp_path, b, f, base, ft)


def edit_header(path: Path, name: str | None, **changes: Any) -> None:
    """Set fields of tensor ``name``'s entry (or of the first tensor by offset)."""
    header, data = read_raw(path)
    if name is None:
        name = min(
            (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
        )
    header[name].update(changes)
    write_raw(path, header, data)


def tensors_by_offset(path: Path) -> list[str]:
    header, _ = read_raw(path)
    entries = [k for k in header if k != "__metadata__"]
    return sorted(entries, key=lambda k: header[k]["data_offsets"][0])


def run_prune(case: Case, out: Path) -> Any:
    args = ["prune", "-b", str(case.base), "-f", str(case.finetuned), "-o", str(out)]
    return CliRunner().invoke(app, [*args, *case.extra])


def all_paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- the catalogue: sources ----------------------------------------------------------------------


@pytest.fixture
def path_missing(pair: Pair) -> Case:
    return Case(pair.root / "missing-model", pair.ft, ExitCode.INPUT, ("missing-model",))


@pytest.fixture
def dir_without_safetensors(pair: Pair) -> Case:
    d = pair.root / "config-only"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return Case(d, pair.ft, ExitCode.INPUT, ("config-only", "no .safetensors"))


@pytest.fixture
def only_pickle_weights(pair: Pair) -> Case:
    d = pair.root / "pickled"
    d.mkdir()
    # Not even a real pickle: fapm must refuse by name, never open it.
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    case = Case(pair.base, d, ExitCode.INPUT, ("pickled", "pytorch_model.bin", "pickle"))
    case.hint = "safe_serialization=True"
    return case


@pytest.fixture
def pickle_file_given(pair: Pair) -> Case:
    f = pair.root / "weights.pt"
    f.write_bytes(b"\x80\x04 not read")
    case = Case(f, pair.ft, ExitCode.INPUT, ("weights.pt", "pickle"))
    case.hint = "save_file"
    return case


@pytest.fixture
def not_a_weights_file(pair: Pair) -> Case:
    f = pair.root / "notes.txt"
    f.write_text("hello")
    return Case(pair.base, f, ExitCode.INPUT, ("notes.txt",))


@pytest.fixture
def fifo_named_safetensors(pair: Pair) -> Case:
    # Opening a FIFO for reading blocks until a writer appears: fapm must not hang on one.
    fifo = pair.root / "pipe.safetensors"
    os.mkfifo(fifo)
    return Case(fifo, pair.ft, ExitCode.INPUT, ("pipe.safetensors", "regular file"))


# -- the catalogue: one file's bytes -------------------------------------------------------------


@pytest.fixture
def truncated_file(pair: Pair) -> Case:
    blob = pair.shard(2).read_bytes()
    pair.shard(2).write_bytes(blob[:-100])
    case = Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[1],))
    case.hint = "download it again"
    return case


@pytest.fixture
def file_shorter_than_its_length_prefix(pair: Pair) -> Case:
    (pair.base / "model.safetensors").write_bytes(b"\x10\x00\x00")
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "too short"))


@pytest.fixture
def header_longer_than_file(pair: Pair) -> Case:
    header, data = read_raw(pair.shard(1))
    raw = json.dumps(header).encode()
    write_raw(pair.shard(1), raw, data, length=len(raw) + len(data) + 1)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[0], "header claims"))


@pytest.fixture
def header_over_100mb(pair: Pair) -> Case:
    # The length is refused before anything is allocated from it (the file itself is small).
    header, data = read_raw(pair.shard(1))
    write_raw(pair.shard(1), json.dumps(header).encode(), data, length=100_000_001)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[0], "100000001", "limit"))


@pytest.fixture
def header_length_2_to_the_64_minus_1(pair: Pair) -> Case:
    write_raw(pair.base / "model.safetensors", b"{}", length=2**64 - 1)
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "limit"))


@pytest.fixture
def header_not_json(pair: Pair) -> Case:
    _, data = read_raw(pair.shard(2))
    write_raw(pair.shard(2), b'{"a": {"dtype": "F32",   ', data)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[1], "not valid JSON"))


@pytest.fixture
def header_not_utf8(pair: Pair) -> Case:
    write_raw(pair.base / "model.safetensors", b'{"\xff\xfe": 1}  ')
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "not valid JSON"))


@pytest.fixture
def header_not_an_object(pair: Pair) -> Case:
    _, data = read_raw(pair.shard(2))
    write_raw(pair.shard(2), b"[1, 2, 3]       ", data)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[1], "not a JSON object"))


@pytest.fixture
def header_nested_too_deep(pair: Pair) -> Case:
    write_raw(pair.base / "model.safetensors", b"[" * 200_000)
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors",))


@pytest.fixture
def header_duplicate_tensor_name(pair: Pair) -> Case:
    header, data = read_raw(pair.shard(3))
    text = json.dumps(header)
    name = tensors_by_offset(pair.shard(3))[0]
    entry = json.dumps({name: header[name]})[1:-1]
    write_raw(pair.shard(3), (text[:-1] + ", " + entry + "}").encode(), data)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[2], "duplicate", name))


@pytest.fixture
def metadata_not_strings(pair: Pair) -> Case:
    header, data = read_raw(pair.shard(1))
    header["__metadata__"] = {"format": 1}
    write_raw(pair.shard(1), header, data)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[0], "__metadata__"))


@pytest.fixture
def unknown_dtype(pair: Pair) -> Case:
    name = tensors_by_offset(pair.shard(2))[0]
    edit_header(pair.shard(2), name, dtype="F7")
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[1], name, "F7"))


@pytest.fixture
def shape_not_integers(pair: Pair) -> Case:
    edit_header(pair.base / "model.safetensors", "model.norm.weight", shape=[16.0])
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "model.norm.weight"))


@pytest.fixture
def shape_negative(pair: Pair) -> Case:
    edit_header(pair.base / "model.safetensors", "model.norm.weight", shape=[-16])
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "model.norm.weight"))


@pytest.fixture
def shape_overflowing_int64(pair: Pair) -> Case:
    # Zero elements (so zero bytes is "right"), but torch cannot even describe this shape.
    path = pair.base / "model.safetensors"
    header, data = read_raw(path)
    header["huge"] = {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}
    write_raw(path, header, data)
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "huge", "too large"))


@pytest.fixture
def offsets_overlapping(pair: Pair) -> Case:
    path = pair.base / "model.safetensors"
    last = tensors_by_offset(path)[-1]
    begin, end = read_raw(path)[0][last]["data_offsets"]
    shift = -4
    edit_header(path, last, data_offsets=[begin + shift, end + shift])
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", last, "overlaps"))


@pytest.fixture
def offsets_out_of_range(pair: Pair) -> Case:
    path = pair.base / "model.safetensors"
    last = tensors_by_offset(path)[-1]
    begin, end = read_raw(path)[0][last]["data_offsets"]
    shift = 4
    edit_header(path, last, data_offsets=[begin + shift, end + shift])
    return Case(
        pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", last, "outside the data buffer")
    )


@pytest.fixture
def offsets_with_a_gap(pair: Pair) -> Case:
    path = pair.base / "model.safetensors"
    header, data = read_raw(path)
    first = tensors_by_offset(path)[0]
    for name, entry in header.items():
        if name != "__metadata__" and name != first:
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    e = header[first]["data_offsets"][1]
    write_raw(path, header, data[:e] + b"\0" * 4 + data[e:])
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("model.safetensors", "gap"))


@pytest.fixture
def offsets_not_matching_shape(pair: Pair) -> Case:
    edit_header(pair.shard(1), "model.embed_tokens.weight", shape=[37, 15])
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[0], "model.embed_tokens.weight"))


@pytest.fixture
def trailing_bytes(pair: Pair) -> Case:
    with pair.shard(3).open("ab") as f:
        f.write(b"\0" * 8)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[2], "trailing"))


# -- the catalogue: shards and the index ---------------------------------------------------------


@pytest.fixture
def same_tensor_in_two_shards(pair: Pair) -> Case:
    d = pair.root / "two-shards"
    d.mkdir()
    save_file({"a": torch.ones(4), "shared.weight": torch.ones(4)}, str(d / "part-1.safetensors"))
    save_file({"b": torch.ones(4), "shared.weight": torch.ones(4)}, str(d / "part-2.safetensors"))
    return Case(d, d, ExitCode.INPUT, ("shared.weight", "part-1.safetensors", "part-2.safetensors"))


@pytest.fixture
def index_names_missing_shard(pair: Pair) -> Case:
    pair.shard(3).unlink()
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[2], "does not exist"))


@pytest.fixture
def index_names_tensor_absent_from_shard(pair: Pair) -> Case:
    index = pair.index()
    index["weight_map"]["lm_head.weight"] = SHARDS[0]  # it lives in shard 3
    pair.write_index(index)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (INDEX, "lm_head.weight", SHARDS[0]))


@pytest.fixture
def index_missing_a_tensor(pair: Pair) -> Case:
    index = pair.index()
    del index["weight_map"]["lm_head.weight"]
    pair.write_index(index)
    return Case(pair.base, pair.ft, ExitCode.INPUT, (SHARDS[2], "lm_head.weight", "index"))


@pytest.fixture
def index_not_json(pair: Pair) -> Case:
    (pair.ft / INDEX).write_text('{"weight_map": ')
    return Case(pair.base, pair.ft, ExitCode.INPUT, (INDEX, "not valid JSON"))


@pytest.fixture
def index_without_weight_map(pair: Pair) -> Case:
    pair.write_index({"metadata": {}, "weight_map": ["not", "a", "map"]})
    return Case(pair.base, pair.ft, ExitCode.INPUT, (INDEX, "weight_map"))


def _index_pointing_at(pair: Pair, target: str) -> None:
    """Point every tensor of shard 1 at ``target`` (a valid copy of shard 1 lives there)."""
    index = pair.index()
    for name, shard in index["weight_map"].items():
        if shard == SHARDS[0]:
            index["weight_map"][name] = target
    pair.write_index(index)


@pytest.fixture
def index_escapes_with_dotdot(pair: Pair) -> Case:
    shutil.copyfile(pair.shard(1), pair.root / "outside.safetensors")
    _index_pointing_at(pair, "../outside.safetensors")
    return Case(pair.base, pair.ft, ExitCode.INPUT, ("'../outside.safetensors'", "outside"))


@pytest.fixture
def index_escapes_with_absolute_path(pair: Pair) -> Case:
    target = pair.root / "outside.safetensors"
    shutil.copyfile(pair.shard(1), target)
    _index_pointing_at(pair, str(target))
    return Case(pair.base, pair.ft, ExitCode.INPUT, (str(target), "outside"))


# -- the catalogue: base vs finetuned ------------------------------------------------------------


def _pair_with(pair: Pair, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> Case:
    b = write_checkpoint(pair.root / "base2", base)
    f = write_checkpoint(pair.root / "ft2", ft)
    return Case(b, f, ExitCode.MISMATCH, ())


@pytest.fixture
def shape_mismatch(pair: Pair) -> Case:
    base = dict(pair.base_tensors, **{"lm_head.weight": torch.zeros(38, 16)})
    case = _pair_with(pair, base, pair.ft_tensors)
    case.names = ("lm_head.weight", "[38, 16]", "[37, 16]")
    return case


@pytest.fixture
def int_vs_float(pair: Pair) -> Case:
    base = dict(pair.base_tensors, **{"model.position_ids": torch.arange(12.0)})
    case = _pair_with(pair, base, pair.ft_tensors)
    case.names = ("model.position_ids", "integer vs float")
    return case


@pytest.fixture
def tensor_only_in_finetuned(pair: Pair) -> Case:
    ft = dict(pair.ft_tensors, **{"extra.weight": torch.zeros(3)})
    case = _pair_with(pair, pair.base_tensors, ft)
    case.names = ("extra.weight", "only in finetuned")
    return case


@pytest.fixture
def nan_in_finetuned(pair: Pair) -> Case:
    ft = dict(pair.ft_tensors)
    ft["model.layers.0.mlp.up_proj.weight"] = ft["model.layers.0.mlp.up_proj.weight"].clone()
    ft["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    case = _pair_with(pair, pair.base_tensors, ft)
    case.code = ExitCode.INPUT
    case.names = ("model.layers.0.mlp.up_proj.weight", "finetuned", "NaN")
    return case


@pytest.fixture
def inf_in_base(pair: Pair) -> Case:
    # The last tensor on disk: the output is well under way when the error is found.
    base = dict(pair.base_tensors)
    base["lm_head.weight"] = base["lm_head.weight"].clone()
    base["lm_head.weight"][-1, -1] = float("-inf")
    case = _pair_with(pair, base, pair.ft_tensors)
    case.code = ExitCode.INPUT
    case.names = ("lm_head.weight", "base", "Inf")
    return case


# -- the catalogue: options ----------------------------------------------------------------------


@pytest.fixture
def sparsity_above_one(pair: Pair) -> Case:
    return Case(pair.base, pair.ft, ExitCode.USAGE, ("sparsity", "1.5"), extra=("-s", "1.5"))


@pytest.fixture
def sparsity_negative(pair: Pair) -> Case:
    return Case(pair.base, pair.ft, ExitCode.USAGE, ("sparsity", "-0.1"), extra=("-s=-0.1",))


@pytest.fixture
def sparsity_not_a_number(pair: Pair) -> Case:
    return Case(pair.base, pair.ft, ExitCode.USAGE, ("sparsity", "nan"), extra=("-s", "nan"))


@pytest.fixture
def lam_negative(pair: Pair) -> Case:
    return Case(pair.base, pair.ft, ExitCode.USAGE, ("--lam",), extra=("--lam=-1",), by_typer=True)


@pytest.fixture
def lam_infinite(pair: Pair) -> Case:
    return Case(pair.base, pair.ft, ExitCode.USAGE, ("--lam", "inf"), extra=("--lam", "inf"))


# -- the catalogue: the output -------------------------------------------------------------------


@pytest.fixture
def output_exists(pair: Pair) -> Case:
    out = pair.root / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    case = Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "exists"), output=out)
    case.hint = "--overwrite"
    return case


@pytest.fixture
def overwrite_a_folder_fapm_did_not_write(pair: Pair) -> Case:
    # --overwrite pointed at a folder of notes: refused, nothing deleted.
    out = pair.root / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("precious")
    (out / "model.safetensors").write_bytes(b"not fapm's")
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "not written by fapm"),
                output=out, extra=("--overwrite",))  # fmt: skip


@pytest.fixture
def overwrite_another_tools_model(pair: Pair) -> Case:
    # A real checkpoint, but not fapm's: its shards carry no fapm metadata.
    out = pair.root / "theirs"
    write_checkpoint(out, pair.base_tensors)
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "not written by fapm"),
                output=out, extra=("--overwrite",))  # fmt: skip


@pytest.fixture
def overwrite_a_folder_with_subfolders(pair: Pair) -> Case:
    out = pair.root / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')")
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "folders"),
                output=out, extra=("--overwrite",))  # fmt: skip


@pytest.fixture
def overwrite_a_file(pair: Pair) -> Case:
    # Never turn a file into a directory.
    out = pair.root / "report.txt"
    out.write_text("keep me")
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "is a file"),
                output=out, extra=("--overwrite",))  # fmt: skip


@pytest.fixture
def output_under_a_regular_file(pair: Pair) -> Case:
    # Tests run as root, which chmod cannot stop: a path through a regular file stops anyone.
    (pair.root / "a-file").write_text("x")
    out = pair.root / "a-file" / "out"
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out),), output=out)


@pytest.fixture
def output_in_proc(pair: Pair) -> Case:
    out = Path("/proc/fapm-test-output")
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out),), output=out)


@pytest.fixture
def output_on_read_only_mount(pair: Pair) -> Any:
    ro = pair.root / "ro"
    ro.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot make a read-only bind mount here (needs root and CAP_SYS_ADMIN)")
    # A bind mount ignores "ro" on some kernels until remounted.
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True, check=False)
    try:
        out = ro / "out"
        yield Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "Read-only"), output=out)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.fixture
def output_inside_input(pair: Pair) -> Case:
    out = pair.ft / "pruned"
    return Case(pair.base, pair.ft, ExitCode.OUTPUT, (str(out), "overlaps"), output=out)


@pytest.fixture
def output_is_input_even_with_overwrite(pair: Pair) -> Case:
    return Case(
        pair.base,
        pair.ft,
        ExitCode.OUTPUT,
        (str(pair.ft), "overlaps"),
        output=pair.ft,
        extra=("--overwrite",),
    )


@pytest.fixture
def output_contains_input(pair: Pair) -> Case:
    # --overwrite would replace the directory that holds the inputs.
    return Case(
        pair.base,
        pair.ft,
        ExitCode.OUTPUT,
        (str(pair.root), "overlaps"),
        output=pair.root,
        extra=("--overwrite",),
    )


CATALOGUE = [
    "path_missing",
    "dir_without_safetensors",
    "only_pickle_weights",
    "pickle_file_given",
    "not_a_weights_file",
    "fifo_named_safetensors",
    "truncated_file",
    "file_shorter_than_its_length_prefix",
    "header_longer_than_file",
    "header_over_100mb",
    "header_length_2_to_the_64_minus_1",
    "header_not_json",
    "header_not_utf8",
    "header_not_an_object",
    "header_nested_too_deep",
    "header_duplicate_tensor_name",
    "metadata_not_strings",
    "unknown_dtype",
    "shape_not_integers",
    "shape_negative",
    "shape_overflowing_int64",
    "offsets_overlapping",
    "offsets_out_of_range",
    "offsets_with_a_gap",
    "offsets_not_matching_shape",
    "trailing_bytes",
    "same_tensor_in_two_shards",
    "index_names_missing_shard",
    "index_names_tensor_absent_from_shard",
    "index_missing_a_tensor",
    "index_not_json",
    "index_without_weight_map",
    "index_escapes_with_dotdot",
    "index_escapes_with_absolute_path",
    "shape_mismatch",
    "int_vs_float",
    "tensor_only_in_finetuned",
    "nan_in_finetuned",
    "inf_in_base",
    "sparsity_above_one",
    "sparsity_negative",
    "sparsity_not_a_number",
    "lam_negative",
    "lam_infinite",
    "output_exists",
    "overwrite_a_folder_fapm_did_not_write",
    "overwrite_another_tools_model",
    "overwrite_a_folder_with_subfolders",
    "overwrite_a_file",
    "output_under_a_regular_file",
    "output_in_proc",
    "output_on_read_only_mount",
    "output_inside_input",
    "output_is_input_even_with_overwrite",
    "output_contains_input",
]


@pytest.mark.parametrize("failure", CATALOGUE)
def test_failure_is_a_clean_documented_error(
    failure: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    case: Case = request.getfixturevalue(failure)
    out = Path(case.output) if case.output is not None else tmp_path / "out"
    existed = out.exists()
    paths, hashes = all_paths(tmp_path), tree_hash(tmp_path)

    result = run_prune(case, out)

    assert result.exit_code == case.code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    if case.by_typer:
        assert lines[-1].startswith("Error: Invalid value for")
        assert all(n in lines[-1] for n in case.names), lines
    else:
        assert len(lines) == 2, lines
        assert lines[0].startswith("error: "), lines
        assert lines[1].startswith("hint: "), lines
        missing = [n for n in case.names if n not in lines[0]]
        assert not missing, f"{missing} not named in {lines[0]!r}"
        assert case.hint in lines[1]
    assert "internal error" not in result.stderr
    # Nothing written, nothing left behind, nothing changed (inputs included).
    assert out.exists() == existed
    assert all_paths(tmp_path) == paths
    assert tree_hash(tmp_path) == hashes
    if out.parent.is_dir():  # outside tmp_path (e.g. /proc): no temporary sibling either
        assert not [p for p in out.parent.iterdir() if TMP_MARK in p.name]


def test_every_catalogue_entry_is_a_fixture() -> None:
    assert len(set(CATALOGUE)) == len(CATALOGUE)
    assert all(callable(globals()[name]) for name in CATALOGUE)


# -- inputs that look odd but are valid ----------------------------------------------------------


def _prune_ok(base: Path, ft: Path, out: Path, *extra: str) -> None:
    args = ["prune", "-b", str(base), "-f", str(ft), "-o", str(out), "--quiet", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("sparsity", ["0", "0.5", "1"])
def test_empty_and_scalar_tensors_are_handled(tmp_path: Path, sparsity: str) -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = {"empty": (0,), "empty2d": (3, 0), "scalar": (), "one": (1,), "w": (5, 3)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    b = write_checkpoint(tmp_path / "base", base)
    f = write_checkpoint(tmp_path / "ft", ft)
    _prune_ok(b, f, tmp_path / "out", "-s", sparsity)

    out = load_checkpoint(tmp_path / "out")
    expected = reference_prune(base, ft, Fraction(sparsity))
    assert set(out) == set(expected)
    for name, t in expected.items():
        assert out[name].shape == t.shape, name
        assert torch.equal(out[name], t), name
    # By hand: one entry, keep floor(1 * (1 - s)) of it.
    keeps_one = sparsity == "0"
    assert torch.equal(out["scalar"], ft["scalar"] if keeps_one else base["scalar"])


def test_hugging_face_cache_symlinks_are_accepted(tmp_path: Path) -> None:
    """The HF cache: snapshots/<rev>/<file> are relative symlinks to ../../blobs/<hash>."""
    base, ft = make_pair(seed=4)
    plain = write_checkpoint(tmp_path / "plain-ft", ft, shard_bytes=3000, config={"a": 1})
    b = write_checkpoint(tmp_path / "base", base)
    repo = tmp_path / "hub" / "models--org--ft"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, src in enumerate(sorted(plain.iterdir())):
        blob = repo / "blobs" / f"blob{i:02d}"
        shutil.copyfile(src, blob)
        (snapshot / src.name).symlink_to(Path("..", "..", "blobs", blob.name))
    cache_hashes = tree_hash(repo)

    _prune_ok(b, snapshot, tmp_path / "from-cache")
    _prune_ok(b, plain, tmp_path / "from-plain")

    assert tree_hash(repo) == cache_hashes
    assert all(p.is_symlink() for p in snapshot.iterdir())
    got = load_checkpoint(tmp_path / "from-cache")
    expected = reference_prune(base, ft, Fraction(9, 10))
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    # Same bytes as from a plain directory, apart from the recorded source path.
    assert load_checkpoint(tmp_path / "from-plain").keys() == got.keys()
    assert json.loads((tmp_path / "from-cache" / "config.json").read_text()) == {"a": 1}
    assert not (tmp_path / "from-cache" / "config.json").is_symlink()


def test_overwrite_replaces_an_existing_output(pair: Pair) -> None:
    out = pair.root / "out"
    _prune_ok(pair.base, pair.ft, out, "-s", "0.5", "--max-shard-size", "1kB")  # fapm's own
    stale = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(stale) > 1
    inputs = tree_hash(pair.base), tree_hash(pair.ft)
    _prune_ok(pair.base, pair.ft, out, "--overwrite")
    assert not any((out / name).exists() for name in stale[1:])  # the earlier run's shards
    expected = reference_prune(pair.base_tensors, pair.ft_tensors, Fraction(9, 10))
    got = load_checkpoint(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert (tree_hash(pair.base), tree_hash(pair.ft)) == inputs
    assert not stray_temps(pair.root)


def test_empty_output_directory_is_used(pair: Pair) -> None:
    out = pair.root / "out"
    out.mkdir()
    _prune_ok(pair.base, pair.ft, out)
    assert (out / "model.safetensors.index.json").is_file()


def test_pickle_files_beside_safetensors_are_neither_read_nor_copied(pair: Pair) -> None:
    (pair.ft / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    (pair.ft / "training_args.bin").write_bytes(b"\x80\x04 never unpickled")
    _prune_ok(pair.base, pair.ft, pair.root / "out")
    names = {p.name for p in (pair.root / "out").iterdir()}
    assert "config.json" in names
    assert not {n for n in names if n.endswith(".bin")}


def test_output_files_are_0644_whatever_the_umask(pair: Pair) -> None:
    old = os.umask(0o077)
    try:
        _prune_ok(pair.base, pair.ft, pair.root / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (pair.root / "out").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert (pair.root / "out").stat().st_mode & 0o777 == 0o755
