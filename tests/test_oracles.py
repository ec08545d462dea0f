"""Independent oracles for what no other test compares with an outside computation.

Every expected value here is computed in this file, with plain torch, from METHOD.md and
docs/formats.md, and never with fapm's own code: fapm is driven only through its CLI. Outputs
are compared bit for bit (integer views of the bytes), so signed zeros, subnormals and
rounding would all count.

- ``prune --dtype`` for every input x output float dtype, and mixed-dtype pairs;
- the chain on signed zeros, subnormals and exponent gaps: ``diff`` (base + stored delta is
  finetuned) and ``prune --task-vector`` (equal to the reference prune of base, finetuned);
- ``--method random`` (DARE): the documented per-block seeding rule, rescaled kept entries,
  ``--threads`` and ``--part`` / ``--finalize`` giving the same bytes;
- ``merge`` of fine-tunes with ``--method``, ``--lam``, ``--seed``, ``--dtype``;
- ``score --lam``, ``score --plot-metric``, ``prune --files-from``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import LABELS, load_checkpoint, make_pair, tree_hash, write_checkpoint

runner = CliRunner()

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    # Every CLI run sets torch's thread count for the process (see test_state.py); put it back.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fapm(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().reshape(-1)
    return t.view(_INT[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), name
    differ = int((bits(got) != bits(want)).sum())
    assert differ == 0, f"{name}: {differ} of {want.numel()} entries differ"


def assert_checkpoint(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert_same_bits(got[name], w, name)


# -- the reference (METHOD.md), whole tensors, a full stable sort -----------------------------


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def ref_scores(b: torch.Tensor, f: torch.Tensor, method: str, lam: float) -> torch.Tensor:
    """S per entry, flat, in float32 (float64 when either side is float64)."""
    cdt = compute_dtype(b.dtype, f.dtype)
    bw, fw = b.reshape(-1).to(cdt), f.reshape(-1).to(cdt)
    a = (fw - bw).abs()
    if method == "magnitude":
        return a
    rel = a / bw.abs()
    if method == "fapm":
        # m = mean |base|, summed in float64 and rounded once to the compute dtype.
        m = (bw.to(torch.float64).abs().sum() / max(bw.numel(), 1)).to(cdt)
        s = a - (torch.tensor(lam, dtype=cdt) * m) * rel
    else:  # ratio
        s = -rel
    return s.masked_fill(bw == 0, float("-inf"))


def ref_mask(
    b: torch.Tensor, f: torch.Tensor, sparsity: Fraction, method: str, lam: float = 1.0
) -> torch.Tensor:
    """Exactly floor(n * (1 - s)) entries with the highest S; ties: lowest flat index first."""
    n = b.numel()
    k = int(n * (1 - sparsity))
    order = torch.sort(ref_scores(b, f, method, lam), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def dare_mask(seed: int, name: str, n: int, sparsity: Fraction, stream: int = 0) -> torch.Tensor:
    """DARE's keep mask by its documented seeding rule: per block of 2^20 entries, a generator
    seeded with blake2b(f"{seed}\\0{name}\\0{block}", 8 bytes) little-endian & (2^63 - 1);
    the i-th fine-tune of a merge (i > 0) appends f"\\0{i}" to the key."""
    keep = float(1 - sparsity)
    block_size = 1 << 20
    parts = [torch.zeros(0, dtype=torch.bool)]
    for block, start in enumerate(range(0, n, block_size)):
        key = f"{seed}\0{name}\0{block}" + (f"\0{stream}" if stream else "")
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        parts.append(torch.rand(min(block_size, n - start), generator=gen) < keep)
    return torch.cat(parts)


def dare_scale(sparsity: Fraction) -> float:
    return float(1 / (1 - sparsity)) if 0 < sparsity < 1 else 1.0


def ref_keep(
    name: str,
    b: torch.Tensor,
    f: torch.Tensor,
    s: Fraction,
    method: str,
    lam: float,
    seed: int,
    stream: int = 0,
) -> torch.Tensor:
    if method == "random":
        return dare_mask(seed, name, b.numel(), s, stream)
    return ref_mask(b, f, s, method, lam)


def ref_prune_tensor(
    name: str,
    b: torch.Tensor,
    f: torch.Tensor,
    s: Fraction,
    method: str = "fapm",
    lam: float = 1.0,
    seed: int = 0,
    out: torch.dtype | None = None,
) -> torch.Tensor:
    """The output tensor: finetuned where kept, base elsewhere, each converted to the output
    dtype (finetuned's unless given); DARE's kept entries are b + (f - b) / (1 - s) in the
    compute dtype, converted once."""
    out = out or f.dtype
    if not f.is_floating_point():
        return f.clone()
    mask = ref_keep(name, b, f, s, method, lam, seed)
    bf, ff = b.reshape(-1), f.reshape(-1)
    scale = dare_scale(s) if method == "random" else 1.0
    if scale != 1.0:
        cdt = compute_dtype(b.dtype, f.dtype)
        kept = (bf.to(cdt) + (ff.to(cdt) - bf.to(cdt)) * scale).to(out)
    else:
        kept = ff.to(out)
    return torch.where(mask, kept, bf.to(out)).reshape(f.shape)


def ref_prune(
    base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], s: Fraction, **kw: object
) -> dict[str, torch.Tensor]:
    return {name: ref_prune_tensor(name, base[name], f, s, **kw) for name, f in ft.items()}  # type: ignore[arg-type]


def awkward(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, finetuned) rows no single float delta reproduces: signed zeros, subnormals,
    exponent gaps of 2^16 (and more where the dtype has the range), ties, zeros in base."""
    tiny = torch.finfo(dtype).smallest_normal
    rows = [
        (1.0, 2.0**-16), (2.0**8, 2.0**-8), (-(2.0**-4), 2.0**12), (1.0, -(2.0**-17)),
        (0.5, -0.0), (0.0, -0.0), (-0.0, 0.0), (-0.0, -0.0), (-0.0, 0.25), (0.0, 0.0),
        (tiny / 4, tiny / 2), (-tiny / 2, tiny / 4), (1.0, tiny / 8), (tiny / 8, 1.0),
        (1.0, -1.0), (3.0, 3.0), (0.75, 1.0 / 3.0), (0.75, 1.0 / 3.0), (-2.0, -2.0**-3),
    ]  # fmt: skip
    if dtype != torch.float16:  # float16 has no 2^-40, and 2^20 overflows it
        rows += [(1.0, 2.0**-100), (2.0**20, 2.0**-20), (2.0**-40, 2.0**10)]
    b = torch.tensor([r[0] for r in rows], dtype=torch.float64).to(dtype)
    f = torch.tensor([r[1] for r in rows], dtype=torch.float64).to(dtype)
    return b, f


def pair(
    seed: int, base_dtype: torch.dtype, ft_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """make_pair (awkward shapes, ties, zeros in base) plus the awkward rows, in two dtypes."""
    base, ft = make_pair(seed=seed, dtype=torch.float64)
    order = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # by range
    narrowest = next(d for d in order if d in (base_dtype, ft_dtype))
    ab, af = awkward(narrowest)  # subnormals of the narrower side's dtype
    base["awkward.weight"], ft["awkward.weight"] = ab.double(), af.double()
    cast = lambda t, d: t.to(d) if t.is_floating_point() else t  # noqa: E731
    return {k: cast(v, base_dtype) for k, v in base.items()}, {
        k: cast(v, ft_dtype) for k, v in ft.items()
    }


# -- prune --dtype, and mixed-dtype pairs ------------------------------------------------------


@pytest.mark.parametrize("out_name", list(DTYPES))
@pytest.mark.parametrize("in_name", list(DTYPES))
def test_prune_dtype_is_the_reference_converted(
    tmp_path: Path, in_name: str, out_name: str, kernels: str
) -> None:
    dtype, out = DTYPES[in_name], DTYPES[out_name]
    base, ft = pair(21, dtype, dtype)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=3000)
    f = write_checkpoint(tmp_path / "f", ft)
    s = Fraction(6, 10)
    fapm("prune", "-b", str(b), "-f", str(f), "-s", "0.6", "--lam", "0.7", "--dtype", out_name,
         "-o", str(tmp_path / "o"), "-q")  # fmt: skip
    got = load_checkpoint(tmp_path / "o")
    assert_checkpoint(got, ref_prune(base, ft, s, lam=0.7, out=out))
    assert got["model.position_ids"].dtype == torch.int64  # --dtype is for float tensors only


@pytest.mark.parametrize(
    ("base_name", "ft_name"),
    [
        ("float32", "bfloat16"),
        ("bfloat16", "float32"),
        ("float16", "bfloat16"),
        ("bfloat16", "float16"),
        ("float32", "float16"),
        ("float64", "bfloat16"),
        ("float32", "float64"),
    ],
)
@pytest.mark.parametrize("method", ["fapm", "magnitude", "ratio"])
def test_mixed_dtype_pairs_score_widened_and_write_finetuned_dtype(
    tmp_path: Path, base_name: str, ft_name: str, method: str, kernels: str
) -> None:
    base, ft = pair(22, DTYPES[base_name], DTYPES[ft_name])
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft, shard_bytes=2500)
    fapm("prune", "-b", str(b), "-f", str(f), "-s", "0.7", "-m", method, "--lam", "1.5",
         "-o", str(tmp_path / "o"), "-q")  # fmt: skip
    got = load_checkpoint(tmp_path / "o")
    # Scores from both sides widened to float32 (float64 when one is), output in finetuned's
    # dtype: kept entries are finetuned's bytes, dropped ones base's value rounded to it.
    assert_checkpoint(got, ref_prune(base, ft, Fraction(7, 10), method=method, lam=1.5))
    assert {t.dtype for n, t in got.items() if n != "model.position_ids"} == {DTYPES[ft_name]}


@pytest.mark.parametrize(
    ("base_name", "ft_name", "out_name"),
    [
        ("float32", "bfloat16", None),
        ("bfloat16", "float32", "float16"),
        ("float64", "float64", "bfloat16"),
        ("float16", "float16", "float32"),
        ("bfloat16", "bfloat16", None),
    ],
)
def test_whole_tensors_are_converted_like_pruned_ones(
    tmp_path: Path, base_name: str, ft_name: str, out_name: str | None
) -> None:
    """--keep-base / --keep-finetuned tensors: one side taken whole, converted to the output
    dtype (finetuned's unless --dtype), as a pruned tensor's kept or dropped entries are."""
    base, ft = pair(32, DTYPES[base_name], DTYPES[ft_name])
    b = write_checkpoint(tmp_path / "b", base)
    f = write_checkpoint(tmp_path / "f", ft)
    args = ["--keep-base", "*norm*", "--keep-finetuned", "lm_head.weight"]
    args += ["--dtype", out_name] if out_name else []
    fapm("prune", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "o"), "-q", *args)
    out = DTYPES[out_name] if out_name else None
    want = ref_prune(base, ft, Fraction(9, 10), out=out)
    target = out or DTYPES[ft_name]
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        want[name] = base[name].to(target)
    want["lm_head.weight"] = ft["lm_head.weight"].to(target)
    assert_checkpoint(load_checkpoint(tmp_path / "o"), want)


# -- the chain on awkward floats: diff, then prune --task-vector --------------------------------


def gaps(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows a float32 or float64 delta does reproduce (docs/formats.md): exponent gaps of up to
    2^16 (2^30 needs float64 for float32 inputs), subnormals, an untouched -0.0."""
    tiny = torch.finfo(dtype).smallest_normal
    rows = [
        (1.0, 2.0**-16), (2.0**8, 2.0**-8), (-(2.0**-4), 2.0**12), (tiny / 4, tiny / 2),
        (-tiny / 2, tiny / 4), (tiny / 8, tiny), (3.0, 3.0), (0.75, 1.0 / 3.0), (0.5, 0.0),
        (-0.0, -0.0),  # untouched: the zero delta keeps base's -0.0 (base + 0 would be +0.0)
    ]  # fmt: skip
    if dtype != torch.float16:
        rows += [(1.0, 2.0**-30), (2.0**-30, 1.0)]
    b = torch.tensor([r[0] for r in rows], dtype=torch.float64).to(dtype)
    f = torch.tensor([r[1] for r in rows], dtype=torch.float64).to(dtype)
    return b, f


def read_dense(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = load_checkpoint(path)
    metas = []
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            metas.append(fh.metadata())
    assert metas and all(m == metas[0] for m in metas)  # every shard carries the same keys
    return tensors, metas[0]


def model_from_dense(
    tv: dict[str, torch.Tensor], meta: dict[str, str], base: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """docs/formats.md, dense: model = base where d == 0 (base's bytes, converted), else
    fl_model(fl_c(base + d)), c = float32 or float64; ``fapm.values`` tensors are the model."""
    values = json.loads(meta.get("fapm.values", "[]"))
    dtypes = json.loads(meta.get("fapm.model_dtypes", "{}"))
    by_code = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
               "F64": torch.float64}  # fmt: skip
    out = {}
    for name, d in tv.items():
        if name in values or not d.is_floating_point():
            out[name] = d
            continue
        model = by_code[dtypes.get(name, meta["fapm.model_dtype"])]
        b = base[name]
        c = compute_dtype(b.dtype, d.dtype)
        out[name] = torch.where(d == 0, b.to(model), (b.to(c) + d.to(c)).to(model))
    return out, values


@pytest.mark.parametrize("name", list(DTYPES))
def test_diff_then_prune_task_vector_on_awkward_floats(tmp_path: Path, name: str) -> None:
    dtype = DTYPES[name]
    base, ft = pair(23, dtype, dtype)
    base["gaps.weight"], ft["gaps.weight"] = gaps(dtype)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=2000)
    f = write_checkpoint(tmp_path / "f", ft, shard_bytes=3000)
    fapm("diff", "-b", str(b), "-f", str(f), "-o", str(tmp_path / "tv"), "-q",
         "--max-shard-size", "2kB")  # fmt: skip
    tv, meta = read_dense(tmp_path / "tv")
    assert (meta["fapm.kind"], meta["fapm.format"]) == ("task-vector", "dense")
    rebuilt, values = model_from_dense(tv, meta, base)
    assert_checkpoint(rebuilt, ft)  # base + stored delta is finetuned, bit for bit
    # A -0.0 of finetuned (or +0.0 over a -0.0 of base) has no delta: stored as values; the
    # gaps have one (float32, or float64 for 2^30), so they are stored as deltas.
    assert "awkward.weight" in values and "gaps.weight" not in values
    assert tv["gaps.weight"].dtype in (torch.float32, torch.float64)
    for s, method in (("0", "fapm"), ("0.5", "fapm"), ("0.9", "fapm"), ("0.6", "magnitude")):
        out = tmp_path / f"p-{s}-{method}"
        fapm("prune", "-b", str(b), "-t", str(tmp_path / "tv"), "-s", s, "-m", method,
             "-o", str(out), "-q")  # fmt: skip
        want = ref_prune(base, ft, Fraction(s), method=method)
        assert_checkpoint(load_checkpoint(out), want)


# -- --method random (DARE) ------------------------------------------------------------------


def dare_pair(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """make_pair plus a tensor of more than one 2^20-entry block (the mask is drawn per block)."""
    base, ft = pair(24, dtype, dtype)
    gen = torch.Generator().manual_seed(25)
    n = (1 << 20) + 4099
    b = torch.randn(n, generator=gen) * 0.02
    base["big.weight"] = b.to(dtype)
    ft["big.weight"] = (b + torch.randn(n, generator=gen) * 1e-3).to(dtype)
    return base, ft


@pytest.mark.parametrize("sparsity", ["0.3", "0.5", "0.9", "0", "1"])
@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_dare_is_the_seeded_mask_with_rescaled_updates(
    tmp_path: Path, name: str, sparsity: str
) -> None:
    dtype = DTYPES[name]
    base, ft = dare_pair(dtype)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=1 << 20)
    f = write_checkpoint(tmp_path / "f", ft)
    fapm("prune", "-b", str(b), "-f", str(f), "-m", "random", "--seed", "11", "-s", sparsity,
         "-o", str(tmp_path / "o"), "-q")  # fmt: skip
    got = load_checkpoint(tmp_path / "o")
    s = Fraction(sparsity)
    assert_checkpoint(got, ref_prune(base, ft, s, method="random", seed=11))
    # And spelled out on the big tensor: dropped entries are base's bytes, kept ones the
    # rescaled update computed in float32 and converted once.
    bb, fb, ob = base["big.weight"], ft["big.weight"], got["big.weight"]
    keep = dare_mask(11, "big.weight", bb.numel(), s)
    assert torch.equal(bits(ob)[~keep], bits(bb)[~keep])
    scaled = (bb.float() + (fb.float() - bb.float()) * dare_scale(s)).to(dtype)
    assert torch.equal(bits(ob)[keep], bits(scaled)[keep])
    if 0 < s < 1:  # the mask really is Bernoulli(1 - s) in each block, not all or nothing
        first, second = keep[: 1 << 20], keep[1 << 20 :]
        for part in (first, second):
            assert abs(float(part.float().mean()) - float(1 - s)) < 0.05
        assert not torch.equal(first[: second.numel()], second)  # blocks are seeded apart
    if s == 0:
        assert_checkpoint(got, ft)


def test_dare_bytes_do_not_depend_on_threads_or_parts(tmp_path: Path) -> None:
    base, ft = dare_pair(torch.bfloat16)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=1 << 20)
    f = write_checkpoint(tmp_path / "f", ft, shard_bytes=3000)
    args = ["-b", str(b), "-f", str(f), "-m", "random", "--seed", "3", "-s", "0.7", "-q",
            "--max-shard-size", "2kB"]  # fmt: skip
    fapm("prune", *args, "-o", str(tmp_path / "single"))
    fapm("prune", *args, "-o", str(tmp_path / "one-thread"), "--threads", "1")
    fapm("prune", *args, "-o", str(tmp_path / "two-threads"), "--threads", "2")
    for i in (1, 2):
        fapm("prune", *args, "-o", str(tmp_path / "joined"), "--part", f"{i}/2")
    fapm("prune", *args, "-o", str(tmp_path / "joined"), "--finalize")
    single = tree_hash(tmp_path / "single")
    assert len([p for p in single if p.endswith(".safetensors")]) >= 3  # really several shards
    for other in ("one-thread", "two-threads", "joined"):
        assert tree_hash(tmp_path / other) == single, other
    want = ref_prune(base, ft, Fraction(7, 10), method="random", seed=3)
    assert_checkpoint(load_checkpoint(tmp_path / "single"), want)


# -- merge of fine-tunes with --method, --lam, --seed, --dtype ----------------------------------


def ref_merge(
    base: dict[str, torch.Tensor],
    fts: list[dict[str, torch.Tensor]],
    weights: list[float],
    s: Fraction,
    method: str,
    lam: float,
    seed: int,
    out: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """One input of weight 1: that prune's bytes. Otherwise, per tensor, each input's masked
    tau (rescaled for DARE) summed with its weight in float32 (float64 if any side is), in
    input order; base + sum rounded once where any input kept an entry, base elsewhere."""
    if len(fts) == 1 and weights == [1.0]:
        return ref_prune(base, fts[0], s, method=method, lam=lam, seed=seed, out=out)
    result = {}
    for name, b in base.items():
        if not b.is_floating_point():
            result[name] = fts[0][name].clone()
            continue
        target = out or fts[0][name].dtype
        bf = b.reshape(-1)
        cdt = compute_dtype(b.dtype, *(ft[name].dtype for ft in fts))
        acc = torch.zeros(bf.numel(), dtype=cdt)
        touched = torch.zeros(bf.numel(), dtype=torch.bool)
        for i, (ft, w) in enumerate(zip(fts, weights, strict=True)):
            f = ft[name]
            mask = ref_keep(name, b, f, s, method, lam, seed, stream=i)  # DARE: independent
            tau = f.reshape(-1).to(cdt) - bf.to(cdt)
            if method == "random":
                tau = tau * dare_scale(s)
            # torch's add with alpha: on CPU one fused multiply-add (acc + w * tau rounded once),
            # which differs from rounding w * tau first in the last bit of ~18% of entries.
            acc.add_(tau.masked_fill(~mask, 0), alpha=w)
            touched |= mask
        merged = torch.where(touched, (bf.to(cdt) + acc).to(target), bf.to(target))
        result[name] = merged.reshape(b.shape)
    return result


@pytest.fixture
def three_bf16(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """A bf16 base and two bf16 fine-tunes of it with different updates."""
    base, ft1 = pair(26, torch.bfloat16, torch.bfloat16)
    _, ft2 = make_pair(seed=27, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(28)
    for name, b in base.items():
        if b.is_floating_point():
            ft2[name] = (b.float() + torch.randn(b.shape, generator=gen) * 2e-3).to(b.dtype)
    dirs = [
        write_checkpoint(tmp_path / "b", base, shard_bytes=1500),
        write_checkpoint(tmp_path / "f1", ft1),
        write_checkpoint(tmp_path / "f2", ft2, shard_bytes=2500),
    ]
    return dirs, [base, ft1, ft2]


@pytest.mark.parametrize(
    ("method", "lam", "seed", "dtype", "weights"),
    [
        ("fapm", 0.5, 0, None, (0.6, 0.4)),
        ("fapm", 2.0, 0, "float32", (1.0, 1.0)),
        ("magnitude", 1.0, 0, "float16", (0.7, -0.2)),
        ("ratio", 1.0, 0, None, (0.5, 0.5)),
        ("random", 1.0, 9, None, (0.6, 0.4)),
        ("random", 1.0, 10, "float32", (1.0, 0.3)),
        ("fapm", 0.5, 0, "float64", (1.0,)),  # one input of weight 1: prune's bytes
        ("random", 1.0, 4, "float32", (1.0,)),
        ("magnitude", 1.0, 0, None, (1.0,)),
    ],
)
def test_merge_of_finetunes_is_the_reference(
    tmp_path: Path,
    three_bf16: tuple[list[Path], list[dict[str, torch.Tensor]]],
    method: str,
    lam: float,
    seed: int,
    dtype: str | None,
    weights: tuple[float, ...],
) -> None:
    (b, f1, f2), (base, ft1, ft2) = three_bf16
    inputs = [f1, f2][: len(weights)]
    args = ["merge", "-b", str(b), *(a for f in inputs for a in ("-f", str(f)))]
    args += [a for w in weights for a in ("-w", repr(w))]
    args += ["-s", "0.6", "-m", method, "--lam", repr(lam), "--seed", str(seed)]
    args += ["--dtype", dtype] if dtype else []
    fapm(*args, "-o", str(tmp_path / "m"), "-q")
    want = ref_merge(base, [ft1, ft2][: len(weights)], list(weights), Fraction(6, 10), method,
                     lam, seed, DTYPES[dtype] if dtype else None)  # fmt: skip
    assert_checkpoint(load_checkpoint(tmp_path / "m"), want)
    if len(weights) == 1:  # and the same bytes as prune with the same options
        args = ["prune", "-b", str(b), "-f", str(f1), "-s", "0.6", "-m", method,
                "--lam", repr(lam), "--seed", str(seed)]  # fmt: skip
        args += ["--dtype", dtype] if dtype else []
        fapm(*args, "-o", str(tmp_path / "p"), "-q")
        assert_checkpoint(load_checkpoint(tmp_path / "m"), load_checkpoint(tmp_path / "p"))


# -- score --lam and --plot-metric ---------------------------------------------------------------


def ref_sums(b: torch.Tensor, f: torch.Tensor, s: Fraction, lam: float) -> dict[str, float]:
    """The additive totals behind every figure of `fapm score`, for one tensor."""
    bw, fw = b.reshape(-1).float(), f.reshape(-1).float()
    tau = fw - bw
    a = tau.abs()
    nz = bw != 0
    fm, mm = ref_mask(b, f, s, "fapm", lam), ref_mask(b, f, s, "magnitude")
    sq = (tau * tau).double()
    return {
        "numel": b.numel(),
        "abs_tau": float(a.double().sum()),
        "rel": float((a[nz] / bw[nz].abs()).double().sum()),
        "nonzero": int(nz.sum()),
        "positive": int((ref_scores(b, f, "fapm", lam) > 0).sum()),
        "sq": float(sq.sum()),
        "sq_fapm": float(sq[fm].sum()),
        "sq_magnitude": float(sq[mm].sum()),
        "kept": int(fm.sum()),
        "overlap": int((fm & mm).sum()),
    }


def ref_figures(t: dict[str, float]) -> dict[str, float | None]:
    union = 2 * t["kept"] - t["overlap"]
    return {
        "mean_abs_tau": t["abs_tau"] / t["numel"],
        "mean_rel_change": t["rel"] / t["nonzero"] if t["nonzero"] else None,
        "positive_score_fraction": t["positive"] / t["numel"],
        "fapm_sq_norm_kept_fraction": t["sq_fapm"] / t["sq"] if t["sq"] > 0 else None,
        "magnitude_sq_norm_kept_fraction": t["sq_magnitude"] / t["sq"] if t["sq"] > 0 else None,
        "mask_jaccard": t["overlap"] / union if union else None,
    }


@pytest.fixture
def scored_pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict]:
    base, ft = make_pair(seed=29)
    # Updates as large as base in places: the penalty term decides whether S > 0 there.
    gen = torch.Generator().manual_seed(30)
    for name, bt in base.items():
        if bt.is_floating_point():
            ft[name] = ft[name] + torch.randn(bt.shape, generator=gen) * 0.01
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=2000)
    f = write_checkpoint(tmp_path / "f", ft)
    return b, f, base, ft


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 3.0])
def test_score_lam_moves_the_figures_as_the_reference_predicts(
    scored_pair: tuple[Path, Path, dict, dict], lam: float
) -> None:
    b, f, base, ft = scored_pair
    s = Fraction(8, 10)
    doc = json.loads(fapm("score", "-b", str(b), "-f", str(f), "-s", "0.8", "--lam", repr(lam),
                          "--json"))  # fmt: skip
    assert doc["lam"] == lam
    rows = {t["name"]: t for t in doc["tensors"]}
    assert set(rows) == set(LABELS) and doc["skipped"] == ["model.position_ids"]
    for name, row in rows.items():
        want = ref_sums(base[name], ft[name], s, lam)
        fig = ref_figures(want)
        assert row["kept"] == want["kept"] == int(want["numel"] * (1 - s)), name
        assert row["positive_score_fraction"] == fig["positive_score_fraction"], name
        assert row["mask_jaccard"] == fig["mask_jaccard"], name
        for key in ("fapm_sq_norm_kept_fraction", "magnitude_sq_norm_kept_fraction"):
            assert row[key] == pytest.approx(fig[key], rel=1e-9), (name, key)
    # The figures really depend on lam here: lam 1 predicts other values for some tensors.
    at_one = {n: ref_figures(ref_sums(base[n], ft[n], s, 1.0)) for n in rows}
    if lam != 1.0:
        changed = [
            n for n in rows
            if rows[n]["positive_score_fraction"] != at_one[n]["positive_score_fraction"]
        ]  # fmt: skip
        kept_changed = [
            n for n in rows
            if rows[n]["fapm_sq_norm_kept_fraction"] != pytest.approx(
                at_one[n]["fapm_sq_norm_kept_fraction"], rel=1e-9)
        ]  # fmt: skip
        assert len(changed) >= 3 and len(kept_changed) >= 3, (changed, kept_changed)


def _fmt(v: float | None) -> str:  # the plot's number format: 4 significant digits
    return "n/a" if v is None else f"{v:.4g}"


@pytest.mark.parametrize(
    "metric",
    ["mean_rel_change", "mean_abs_tau", "positive_score_fraction", "fapm_sq_norm_kept_fraction",
     "mask_jaccard"],
)  # fmt: skip
def test_plot_metric_html_shows_each_cell_of_that_metric(
    tmp_path: Path, scored_pair: tuple[Path, Path, dict, dict], metric: str
) -> None:
    b, f, base, ft = scored_pair
    s = Fraction(9, 10)
    plot = tmp_path / "plot.html"
    doc = json.loads(fapm("score", "-b", str(b), "-f", str(f), "--lam", "0.5", "--json",
                          "--plot", str(plot), "--plot-metric", metric))  # fmt: skip
    assert doc["plot"] == str(plot)
    page = plot.read_text()
    assert f"<b>{metric}</b>" in page
    cells: dict[tuple[int | None, str], dict[str, float]] = {}
    for name, cell in LABELS.items():
        t = ref_sums(base[name], ft[name], s, 0.5)
        cells[cell] = {k: cells.get(cell, {}).get(k, 0) + v for k, v in t.items()}
    for (layer, module), sums in cells.items():
        label = "no layer" if layer is None else str(layer)
        tip = f"<title>layer {label}, {module}: {metric} = {_fmt(ref_figures(sums)[metric])}"
        assert tip in page, tip
    # A cell with no tensors is grey, and says so.
    assert f"<title>layer 1, q: {metric} = n/a</title>" in page


def test_plot_files_differ_by_metric(
    tmp_path: Path, scored_pair: tuple[Path, Path, dict, dict]
) -> None:
    b, f, *_ = scored_pair
    pytest.importorskip("matplotlib")
    pages = {}
    for metric in ("mean_abs_tau", "mask_jaccard"):
        for suffix in ("html", "png"):
            path = tmp_path / f"{metric}.{suffix}"
            fapm("score", "-b", str(b), "-f", str(f), "-q", "--plot", str(path),
                 "--plot-metric", metric)  # fmt: skip
            pages[(metric, suffix)] = path.read_bytes()
    assert pages[("mean_abs_tau", "png")].startswith(b"\x89PNG\r\n\x1a\n")
    assert pages[("mean_abs_tau", "png")] != pages[("mask_jaccard", "png")]
    assert pages[("mean_abs_tau", "html")] != pages[("mask_jaccard", "html")]
    assert b"<b>mask_jaccard</b>" not in pages[("mean_abs_tau", "html")]


# -- prune --files-from ----------------------------------------------------------------------


def test_files_from_chooses_the_non_weight_files(tmp_path: Path) -> None:
    base, ft = make_pair(seed=31)
    b = write_checkpoint(tmp_path / "b", base, shard_bytes=2000, config={"side": "base"})
    f = write_checkpoint(tmp_path / "f", ft, config={"side": "ft"})
    extra = {
        b: {"tokenizer.json": '{"t": "base"}', "generation_config.json": "{}"},
        f: {"tokenizer.json": '{"t": "ft"}', "tokenizer_config.json": "{}", "README.md": "ft"},
    }
    for d, files in extra.items():
        for name, text in files.items():
            (d / name).write_text(text)
        # Never copied: hidden files, other weight formats, pickles, subdirectories.
        (d / ".gitattributes").write_text("*.safetensors filter=lfs")
        (d / "flax_model.msgpack").write_bytes(b"\0")
        (d / "pytorch_model.bin").write_bytes(b"\0")
        (d / "sub").mkdir()
        (d / "sub" / "notes.txt").write_text("x")
    want = ref_prune(base, ft, Fraction(9, 10))
    copied = {  # README.md: fapm's own model card, whatever the choice (never the fine-tune's)
        "finetuned": {"config.json", "tokenizer.json", "tokenizer_config.json"},
        "base": {"config.json", "tokenizer.json", "generation_config.json"},
        "none": set(),
    }
    for choice, names in copied.items():
        out = tmp_path / choice
        fapm("prune", "-b", str(b), "-f", str(f), "--files-from", choice, "-o", str(out), "-q")
        weights = {p.name for p in out.glob("*.safetensors")}
        assert weights and all(n.startswith("model") for n in weights)
        listed = {p.relative_to(out).as_posix() for p in out.rglob("*")}
        assert listed == weights | {"model.safetensors.index.json", "README.md"} | names, choice
        source = f if choice == "finetuned" else b
        for name in names:
            assert (out / name).read_bytes() == (source / name).read_bytes(), (choice, name)
        assert (out / "README.md").read_text().startswith("---\nlibrary_name:"), choice
        assert_checkpoint(load_checkpoint(out), want)  # the weights do not depend on it


def test_merge_random_draws_each_fine_tunes_mask_independently(
    tmp_path: Path, three_bf16: tuple[list[Path], list[dict[str, torch.Tensor]]]
) -> None:
    """DARE drops each model's entries independently: the same fine-tune given twice with
    weights 1/2 keeps (almost surely) a different set of entries for each copy, so the merge
    is not the single-input DARE prune (which it would be with one shared mask)."""
    dirs, _ = three_bf16
    b, f1 = dirs[0], dirs[1]
    args = ["-m", "random", "--seed", "5", "-s", "0.5", "-q"]
    fapm("merge", "-b", str(b), "-f", str(f1), "-f", str(f1), "-w", "0.5", *args,
         "-o", str(tmp_path / "twice"))  # fmt: skip
    fapm("prune", "-b", str(b), "-f", str(f1), *args, "-o", str(tmp_path / "once"))
    twice, once = load_checkpoint(tmp_path / "twice"), load_checkpoint(tmp_path / "once")
    name = "model.embed_tokens.weight"
    assert not torch.equal(twice[name].view(torch.int16), once[name].view(torch.int16))
