"""`fapm inspect`: header-only summary, --compare gate, --verify integrity, no torch import."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli import plan
from fapm_cli.errors import MismatchError
from fapm_cli.io.reader import open_checkpoint
from fapm_cli.io.sources import resolve_source
from fapm_cli.verbs import prune as verbs_prune
from tests.checkpoints import make_pair, write_checkpoint

runner = CliRunner()

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "vocab_size": 37,
    "torch_dtype": "float32",
}


def fapm(*args: str) -> tuple[int, str, str]:
    from fapm_cli.cli.app import app

    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def inspect_json(*args: str) -> tuple[int, dict[str, object], str]:
    code, out, err = fapm("inspect", *args, "--json")
    return code, json.loads(out), err


def raw_headers(path: Path) -> dict[str, dict[str, object]]:
    """Every shard's header JSON, parsed by hand (not by fapm)."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        out[f.name] = json.loads(data[8 : 8 + n])
    return out


SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}


def test_summary_matches_an_independent_count_of_the_headers(tmp_path: Path) -> None:
    base, _ = make_pair(seed=3)
    base["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 16, dtype=torch.bfloat16)
    ckpt = write_checkpoint(tmp_path / "m", base, shard_bytes=1500, config=LLAMA_CONFIG)
    code, doc, err = inspect_json(str(ckpt))
    assert (code, err) == (0, "")
    headers = raw_headers(ckpt)
    by_dtype: dict[str, list[int]] = {}
    for h in headers.values():
        for name, e in h.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in e["shape"]:
                numel *= d
            row = by_dtype.setdefault(e["dtype"], [0, 0, 0])
            row[0] += 1
            row[1] += numel
            row[2] += numel * SIZES[e["dtype"]]
    assert doc["tensor_count"] == sum(r[0] for r in by_dtype.values()) == len(base)
    assert doc["parameters"] == sum(r[1] for r in by_dtype.values())
    assert doc["tensor_bytes"] == sum(r[2] for r in by_dtype.values())
    assert {
        d["dtype"]: [d["tensors"], d["parameters"], d["bytes"]] for d in doc["dtypes"]
    } == by_dtype
    assert [s["name"] for s in doc["shards"]] == sorted(headers)
    assert doc["file_bytes"] == sum((ckpt / n).stat().st_size for n in headers)
    assert doc["index"] == "model.safetensors.index.json"
    assert doc["config"] == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "hidden_size": 16,
        "layers": 2,
        "vocab_size": 37,
        "torch_dtype": "float32",
        "quantization": None,
    }
    assert doc["kind"] == "model" and doc["format"] is None and doc["written_by_fapm"] is False
    assert doc["tensors"] is None and doc["compare"] is None and doc["verify"] is None


def test_task_vector_kind_format_and_provenance_from_metadata(tmp_path: Path) -> None:
    base, _ = make_pair()
    meta = {"fapm.kind": "task-vector", "fapm.format": "compact", "fapm.version": "9.9"}
    single = write_checkpoint(tmp_path / "tv", base, metadata=meta) / "model.safetensors"
    code, doc, _ = inspect_json(str(single))  # a single file: no index, no config
    assert code == 0
    assert (doc["kind"], doc["format"], doc["written_by_fapm"]) == ("task-vector", "compact", True)
    assert doc["provenance"] == meta
    assert doc["metadata"] == {"format": "pt", **meta}
    assert doc["index"] is None and doc["config"] is None
    dense = write_checkpoint(tmp_path / "tv2", base, metadata={"fapm.kind": "task-vector"})
    assert inspect_json(str(dense))[1]["format"] == "dense"


def test_tensor_listing_and_match(tmp_path: Path) -> None:
    base, _ = make_pair()
    ckpt = write_checkpoint(tmp_path / "m", base, shard_bytes=2000)
    headers = raw_headers(ckpt)
    where = {n: shard for shard, h in headers.items() for n in h if n != "__metadata__"}
    _, doc, _ = inspect_json(str(ckpt), "--tensors")
    rows = {t["name"]: t for t in doc["tensors"]}
    assert set(rows) == set(base)
    for name, t in base.items():
        assert rows[name]["shape"] == list(t.shape)
        assert rows[name]["shard"] == where[name]
        assert rows[name]["parameters"] == t.numel()
    _, doc, _ = inspect_json(str(ckpt), "--match", r"layers\.1\.(odd|one)$")
    assert sorted(t["name"] for t in doc["tensors"]) == ["model.layers.1.odd", "model.layers.1.one"]
    code, out, err = fapm("inspect", str(ckpt), "--tensors")
    assert code == 0 and "model.layers.1.scalar" in out and "[13, 7]" in out
    code, out, err = fapm("inspect", str(ckpt), "--match", "(")
    assert code == 2 and out == "" and "not a valid regular expression" in err


def test_inspect_never_imports_torch(tmp_path: Path) -> None:
    base, ft = make_pair()
    b = write_checkpoint(tmp_path / "b", base, config=LLAMA_CONFIG)
    f = write_checkpoint(tmp_path / "f", ft)
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fapm_cli.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['inspect', {str(b)!r}, '--compare', {str(f)!r}, "
        "'--verify', '--tensors'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


# -- --compare: exactly what prune refuses ---------------------------------------------------


def _mutations() -> dict[str, tuple[str, bool]]:
    """name -> (what the mutation does to finetuned, whether prune refuses it)."""
    return {
        "same": ("", False),
        "only_in_finetuned": ("add model.extra", True),
        "only_in_base": ("drop model.layers.1.odd", True),
        "tied_finetuned": ("drop lm_head.weight: the fine-tune ties it", False),
        "shape": ("reshape model.layers.1.odd", True),
        "int_vs_float": ("int model.layers.1.one", True),
        "float_dtypes": ("bf16 model.norm.weight", False),
        "int_dtypes": ("i32 model.position_ids", False),
    }


def _mutate(ft: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    ft = dict(ft)
    if case == "only_in_finetuned":
        ft["model.extra"] = torch.ones(3)
    elif case == "only_in_base":
        del ft["model.layers.1.odd"]
    elif case == "tied_finetuned":
        del ft["lm_head.weight"]
    elif case == "shape":
        ft["model.layers.1.odd"] = torch.ones(11)
    elif case == "int_vs_float":
        ft["model.layers.1.one"] = torch.ones(1, dtype=torch.int32)
    elif case == "float_dtypes":
        ft["model.norm.weight"] = ft["model.norm.weight"].to(torch.bfloat16)
    elif case == "int_dtypes":
        ft["model.position_ids"] = ft["model.position_ids"].to(torch.int32)
    return ft


@pytest.mark.parametrize("case", list(_mutations()))
def test_compare_gates_exactly_what_prune_refuses(tmp_path: Path, case: str) -> None:
    base, ft = make_pair()
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", _mutate(ft, case))
    refuses = _mutations()[case][1]
    # prune's own verdict, from its planner with default options
    try:
        plan.plan_prune(
            open_checkpoint(resolve_source(str(b))),
            open_checkpoint(resolve_source(str(f))),
            plan.PruneOptions(),
        )
        prune_refused = False
    except MismatchError:
        prune_refused = True
    assert prune_refused is refuses

    from fapm_cli.cli.app import app

    r = runner.invoke(app, ["inspect", str(b), "--compare", str(f), "--json"])
    assert r.exit_code == (4 if refuses else 0), r.stderr
    cmp = json.loads(r.stdout)["compare"]
    assert cmp["compatible"] is (not refuses)
    if refuses:
        assert r.stderr.startswith("error: prune would refuse this pair")
    else:
        assert r.stderr == ""
    if case == "only_in_finetuned":
        assert cmp["only_b"] == ["model.extra"] and cmp["only_a"] == []
    if case == "only_in_base":
        assert cmp["only_a"] == ["model.layers.1.odd"] and cmp["only_b"] == []
    diffs = {(d["name"], d["kind"], d["a"], d["b"], d["incompatible"]) for d in cmp["differences"]}
    expected = {
        "same": set(),
        "only_in_finetuned": set(),
        "only_in_base": set(),
        "tied_finetuned": set(),
        "shape": {("model.layers.1.odd", "shape", "[10]", "[11]", True)},
        "int_vs_float": {("model.layers.1.one", "dtype-kind", "F32", "I32", True)},
        "float_dtypes": {("model.norm.weight", "dtype", "F32", "BF16", False)},
        "int_dtypes": {("model.position_ids", "dtype", "I64", "I32", False)},
    }[case]
    assert diffs == expected


def test_compare_human_output_names_the_difference(tmp_path: Path) -> None:
    base, ft = make_pair()
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", _mutate(ft, "shape"))
    code, out, err = fapm("inspect", str(b), "--compare", str(f))
    assert code == 4
    assert "INCOMPATIBLE" in out and "model.layers.1.odd" in out
    assert "model.layers.1.odd" in err and "shape" in err and "Traceback" not in err


# -- --verify --------------------------------------------------------------------------------


@pytest.fixture
def fapm_output(tmp_path: Path) -> Path:
    """A checkpoint written by fapm (prune), in several shards."""
    base, ft = make_pair(seed=4)
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    out = tmp_path / "out"
    verbs_prune.prune(str(b), str(f), str(out), plan.PruneOptions(), max_shard_size=2000)
    return out


def test_verify_accepts_an_intact_fapm_output(fapm_output: Path) -> None:
    shards = sorted(p.name for p in fapm_output.glob("*.safetensors"))
    assert len(shards) > 1
    code, doc, err = inspect_json(str(fapm_output), "--verify")
    assert (code, err) == (0, "")
    v = doc["verify"]
    assert v["ok"] is True and v["recorded"] is True and v["problems"] == []
    assert [s["name"] for s in v["shards"]] == shards
    for s in v["shards"]:
        data = (fapm_output / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() == s["expected_sha256"]
        assert s["bytes"] == len(data) == s["expected_bytes"]
        assert s["status"] == "ok"
    assert doc["written_by_fapm"] is True and doc["provenance"]["fapm.kind"] == "model"


def test_verify_finds_one_flipped_byte_and_names_the_shard(fapm_output: Path) -> None:
    shards = sorted(fapm_output.glob("*.safetensors"))
    victim = shards[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01  # inside tensor data: the header still parses
    victim.write_bytes(bytes(data))
    code, out, err = fapm("inspect", str(fapm_output), "--verify")
    assert code == 3
    assert victim.name in err and "sha256" in err and err.startswith("error:")
    assert "corrupted" in out
    code, doc, _ = inspect_json(str(fapm_output), "--verify")
    assert code == 3
    status = {s["name"]: s["status"] for s in doc["verify"]["shards"]}
    assert status[victim.name] == "corrupted"
    assert [n for n, st in status.items() if st != "ok"] == [victim.name]


def test_verify_refuses_a_truncated_shard(fapm_output: Path) -> None:
    victim = sorted(fapm_output.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-4])
    code, out, err = fapm("inspect", str(fapm_output), "--verify")
    assert code == 3 and victim.name in err and out == ""


def test_verify_detects_an_edited_index_record(fapm_output: Path) -> None:
    index_path = fapm_output / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = sorted(index["metadata"]["shards"])[0]
    index["metadata"]["shards"][name]["bytes"] += 1
    index_path.write_text(json.dumps(index))
    code, _, err = fapm("inspect", str(fapm_output), "--verify")
    assert code == 3 and name in err


def test_verify_without_records_reads_everything_and_passes(tmp_path: Path) -> None:
    base, _ = make_pair()
    ckpt = write_checkpoint(tmp_path / "m", base, shard_bytes=2000)
    code, doc, _ = inspect_json(str(ckpt), "--verify")
    assert code == 0
    v = doc["verify"]
    assert v["recorded"] is False and v["ok"] is True
    assert {s["status"] for s in v["shards"]} == {"unrecorded"}
    for s in v["shards"]:
        assert s["sha256"] == hashlib.sha256((ckpt / s["name"]).read_bytes()).hexdigest()


def test_verify_reads_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = make_pair()
    ckpt = write_checkpoint(tmp_path / "m", base, shard_bytes=2000)
    read: list[int] = []
    real = os.readv

    def counting(fd: int, buffers: list[memoryview]) -> int:
        n = real(fd, buffers)
        read.append(n)
        return n

    monkeypatch.setattr(os, "readv", counting)
    assert fapm("inspect", str(ckpt), "--verify", "--quiet")[0] == 0
    assert sum(read) == sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
