"""FP8 checkpoints (METHOD.md, "FP8 weights" and "Other quantized checkpoints").

Plain float8 tensors are floats: scored in float32 on exactly widened inputs, written in their
own dtype, kept entries finetuned's bits. Block-quantized FP8 (``quant_method: fp8`` with
``weight_block_size``) is dequantized on read; other quantizations are refused (exit 3).
The references here are independent: a full stable argsort (tests/reference.py) on inputs
widened in the test, and a dequantizer written below.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fapm_cli.cli.app import app
from tests.checkpoints import load_checkpoint, write_checkpoint
from tests.reference import reference_mask

runner = CliRunner()
F8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def fapm(*args: str, code: int = 0) -> str:
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == code, r.output
    return r.output


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def f8_pair(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(7)
    base = {
        "layer.weight": (torch.randn(9, 13, generator=g) * 0.5).to(dtype),
        "norm.weight": (torch.randn(11, generator=g)).to(dtype),
    }
    base["layer.weight"].view(-1)[:5] = 0  # zeros in base score -inf
    ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.2).to(dtype)
          for k, v in base.items()}  # fmt: skip
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "ft", ft)


def expected_prune(base: Path, ft: Path, sparsity: Fraction) -> dict[str, torch.Tensor]:
    b, f = load_checkpoint(base), load_checkpoint(ft)
    out = {}
    for name, bt in b.items():
        mask = reference_mask(bt.float(), f[name].float(), sparsity, "fapm")
        out[name] = torch.where(mask.reshape(-1), bits(f[name]), bits(bt))
    return out


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_prune_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    fapm("prune", "--base", str(base), "--finetuned", str(ft), "-o", str(tmp_path / "out"),
         "-s", "0.6")  # fmt: skip
    got = load_checkpoint(tmp_path / "out")
    want = expected_prune(base, ft, Fraction(3, 5))
    assert set(got) == set(want)
    for name, t in got.items():
        assert t.dtype == dtype, name
        assert torch.equal(bits(t), want[name]), name
    # something was actually pruned and something kept
    b, f = load_checkpoint(base), load_checkpoint(ft)
    w = got["layer.weight"]
    assert not torch.equal(bits(w), bits(f["layer.weight"]))
    assert not torch.equal(bits(w), bits(b["layer.weight"]))


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_diff_round_trip_and_prune_t(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    fapm("diff", "--base", str(base), "--finetuned", str(ft), "-o", str(tmp_path / "tv"))
    fapm("prune", "--base", str(base), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "s0"),
         "-s", "0")  # fmt: skip
    f = load_checkpoint(ft)
    for name, t in load_checkpoint(tmp_path / "s0").items():
        assert t.dtype == dtype and torch.equal(bits(t), bits(f[name])), name
    fapm("prune", "--base", str(base), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "p"),
         "-s", "0.6")  # fmt: skip
    want = expected_prune(base, ft, Fraction(3, 5))
    for name, t in load_checkpoint(tmp_path / "p").items():
        assert torch.equal(bits(t), want[name]), name


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_merge_equals_prune(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    fapm("merge", "--base", str(base), "--finetuned", str(ft), "-s", "0.6",
         "-o", str(tmp_path / "m"))  # fmt: skip
    want = expected_prune(base, ft, Fraction(3, 5))
    for name, t in load_checkpoint(tmp_path / "m").items():
        assert t.dtype == dtype and torch.equal(bits(t), want[name]), name


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_plain_fp8_score(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = f8_pair(tmp_path, dtype)
    doc = json.loads(fapm("score", "--base", str(base), "--finetuned", str(ft), "--json"))
    row = next(t for t in doc["tensors"] if t["name"] == "layer.weight")
    b, f = load_checkpoint(base), load_checkpoint(ft)
    bw, fw = b["layer.weight"].float(), f["layer.weight"].float()
    assert row["dtype"] == {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]
    assert row["mean_abs_tau"] == pytest.approx(float((fw - bw).abs().mean()), rel=1e-6)
    assert row["mean_abs_base"] == pytest.approx(float(bw.abs().mean()), rel=1e-6)
    assert row["base_zero"] == int((bw == 0).sum()) >= 5


# -- block-quantized FP8 (DeepSeek-V3 / Qwen3-FP8 layout) ----------------------------------------

BLOCK = [4, 4]
FP8_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": BLOCK,
    },
}
BF16_CONFIG = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
SHAPES = {"proj.weight": (10, 7), "up.weight": (8, 8)}  # partial edge blocks in proj


def ref_dequant(q: torch.Tensor, scale: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Block by block, the slow obvious way."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = q[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].to(torch.float32)
            out[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = blk * float(scale[i, j])
    return out


def fp8_model(seed: int) -> dict[str, torch.Tensor]:
    """Quantized weights with their per-block scales, plus an unquantized norm."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (r, c) in SHAPES.items():
        out[name] = (torch.randn(r, c, generator=g) * 100).to(torch.float8_e4m3fn)
        blocks = (-(-r // BLOCK[0]), -(-c // BLOCK[1]))
        out[name + "_scale_inv"] = torch.rand(blocks, generator=g) * 1e-3 + 1e-4
    out["norm.weight"] = torch.randn(5, generator=g).to(torch.bfloat16)
    return out


def dequantized(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name: ref_dequant(t, model[name + "_scale_inv"], *BLOCK).to(torch.bfloat16)
        if name + "_scale_inv" in model else t
        for name, t in model.items() if not name.endswith("_scale_inv")
    }  # fmt: skip


def bf16_near(model: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + torch.randn(t.shape, generator=g) * 0.01).to(torch.bfloat16)
            for n, t in dequantized(model).items()}  # fmt: skip


def expect_prune(b: dict[str, torch.Tensor], f: dict[str, torch.Tensor], s: Fraction) -> dict:
    out = {}
    for name, bt in b.items():
        mask = reference_mask(bt.float(), f[name].float(), s, "fapm").reshape(-1)
        out[name] = torch.where(mask, f[name].reshape(-1).view(torch.int16),
                                bt.reshape(-1).view(torch.int16))  # fmt: skip
    return out


def check_output(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_checkpoint(out)
    assert not [n for n in got if n.endswith("_scale_inv")]
    assert set(got) == set(want)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t.reshape(-1).view(torch.int16), want[name]), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_block_fp8_base_against_bf16_finetune(tmp_path: Path) -> None:
    q = fp8_model(1)
    ft = bf16_near(q, 2)
    base = write_checkpoint(tmp_path / "base", q, config=FP8_CONFIG)
    fine = write_checkpoint(tmp_path / "ft", ft, config=BF16_CONFIG)
    for files_from in ("finetuned", "base"):
        out = tmp_path / f"out-{files_from}"
        fapm("prune", "--base", str(base), "--finetuned", str(fine), "-o", str(out),
             "-s", "0.5", "--files-from", files_from)  # fmt: skip
        check_output(out, expect_prune(dequantized(q), ft, Fraction(1, 2)))
    # s = 1 gives base back: the dequantized base, bit for bit
    fapm("prune", "--base", str(base), "--finetuned", str(fine), "-o", str(tmp_path / "s1"),
         "-s", "1")  # fmt: skip
    deq = dequantized(q)
    check_output(tmp_path / "s1", {n: t.reshape(-1).view(torch.int16) for n, t in deq.items()})


def test_block_fp8_finetune_against_bf16_base(tmp_path: Path) -> None:
    q = fp8_model(3)
    b = bf16_near(q, 4)
    base = write_checkpoint(tmp_path / "base", b, config=BF16_CONFIG)
    fine = write_checkpoint(tmp_path / "ft", q, config=FP8_CONFIG)
    fapm("prune", "--base", str(base), "--finetuned", str(fine), "-o", str(tmp_path / "out"),
         "-s", "0.5")  # fmt: skip
    check_output(tmp_path / "out", expect_prune(b, dequantized(q), Fraction(1, 2)))
    # diff then prune -t: the same model
    fapm("diff", "--base", str(base), "--finetuned", str(fine), "-o", str(tmp_path / "tv"))
    fapm("prune", "--base", str(base), "-t", str(tmp_path / "tv"), "-o", str(tmp_path / "p"),
         "-s", "0.5")  # fmt: skip
    got = load_checkpoint(tmp_path / "p")
    want = expect_prune(b, dequantized(q), Fraction(1, 2))
    for name, t in got.items():
        assert torch.equal(t.reshape(-1).view(torch.int16), want[name]), name
    doc = json.loads(fapm("score", "--base", str(base), "--finetuned", str(fine), "--json"))
    assert {t["name"] for t in doc["tensors"]} == {"proj.weight", "up.weight", "norm.weight"}


def test_both_block_fp8_meet_in_bfloat16(tmp_path: Path) -> None:
    qb, qf = fp8_model(5), fp8_model(6)
    base = write_checkpoint(tmp_path / "base", qb, config=FP8_CONFIG)
    fine = write_checkpoint(tmp_path / "ft", qf, config=FP8_CONFIG)
    fapm("prune", "--base", str(base), "--finetuned", str(fine), "-o", str(tmp_path / "out"),
         "-s", "0.5")  # fmt: skip
    check_output(tmp_path / "out", expect_prune(dequantized(qb), dequantized(qf), Fraction(1, 2)))


def test_block_fp8_scale_shape_mismatch_refused(tmp_path: Path) -> None:
    q = fp8_model(1)
    q["proj.weight_scale_inv"] = torch.ones(2, 2)  # needs 3 x 2 for 10 x 7 in 4 x 4 blocks
    base = write_checkpoint(tmp_path / "base", q, config=FP8_CONFIG)
    fine = write_checkpoint(tmp_path / "ft", bf16_near(fp8_model(1), 2), config=BF16_CONFIG)
    out = fapm("prune", "--base", str(base), "--finetuned", str(fine), "-o",
               str(tmp_path / "out"), code=3)  # fmt: skip
    assert "proj.weight_scale_inv" in out and "[3, 2]" in out
    assert not (tmp_path / "out").exists()


def test_inspect_shows_quantization(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "q", fp8_model(1), config=FP8_CONFIG)
    doc = json.loads(fapm("inspect", str(ckpt), "--json"))
    assert doc["config"]["quantization"] == {"method": "fp8", "weight_block_size": [4, 4]}
    table = runner.invoke(app, ["inspect", str(ckpt)], terminal_width=200)
    assert table.exit_code == 0 and "fp8, 4x4 blocks" in table.output, table.output
    plain = write_checkpoint(tmp_path / "p", dequantized(fp8_model(1)), config=BF16_CONFIG)
    assert json.loads(fapm("inspect", str(plain), "--json"))["config"]["quantization"] is None


# -- other quantizations: refused up front ------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "method"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "awq"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8"),  # per-tensor FP8
    ],
)
@pytest.mark.parametrize("side", ["base", "finetuned"])
def test_other_quantization_refused(
    tmp_path: Path, config: dict[str, object], method: str, side: str
) -> None:
    base, ft = f8_pair(tmp_path, torch.float8_e4m3fn)
    quantized = base if side == "base" else ft
    (quantized / "config.json").write_text(json.dumps({"quantization_config": config}))
    for verb in ("prune", "diff"):
        out = fapm(verb, "--base", str(base), "--finetuned", str(ft), "-o",
                   str(tmp_path / verb), code=3)  # fmt: skip
        assert repr(method) in out and "unquantized checkpoint" in out
        assert not (tmp_path / verb).exists()
    out = fapm("score", "--base", str(base), "--finetuned", str(ft), code=3)
    assert repr(method) in out


@pytest.mark.parametrize("scale", ["weight_scale", "scales"])
def test_int8_weight_with_scale_refused_without_config(tmp_path: Path, scale: str) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "proj.weight": torch.randint(-128, 127, (4, 6), generator=g, dtype=torch.int8),
        f"proj.{scale}": torch.rand(4, 1, generator=g),
    }
    base = write_checkpoint(tmp_path / "base", tensors)
    ft = write_checkpoint(tmp_path / "ft", tensors)
    out = fapm("prune", "--base", str(base), "--finetuned", str(ft), "-o",
               str(tmp_path / "out"), code=3)  # fmt: skip
    assert "'proj.weight'" in out and f"proj.{scale}" in out and "quantized" in out


def test_gptq_packed_tensors_refused_without_config(tmp_path: Path) -> None:
    tensors = {"proj.qweight": torch.zeros(4, 4, dtype=torch.int32), "n.weight": torch.ones(3)}
    base = write_checkpoint(tmp_path / "base", tensors)
    out = fapm("prune", "--base", str(base), "--finetuned", str(base), "-o",
               str(tmp_path / "out"), code=3)  # fmt: skip
    assert "proj.qweight" in out


def test_merge_block_fp8_either_side_equals_prune(tmp_path: Path) -> None:
    q = fp8_model(1)
    ft = bf16_near(q, 2)
    fp8 = write_checkpoint(tmp_path / "fp8", q, config=FP8_CONFIG)
    bf16 = write_checkpoint(tmp_path / "bf16", ft, config=BF16_CONFIG)
    for name, (base, fine) in {"b": (fp8, bf16), "f": (bf16, fp8)}.items():
        fapm("prune", "--base", str(base), "--finetuned", str(fine), "-s", "0.5",
             "-o", str(tmp_path / f"p{name}"))  # fmt: skip
        fapm("merge", "--base", str(base), "--finetuned", str(fine), "-s", "0.5",
             "-o", str(tmp_path / f"m{name}"))  # fmt: skip
        want, got = load_checkpoint(tmp_path / f"p{name}"), load_checkpoint(tmp_path / f"m{name}")
        assert set(got) == set(want) == {"proj.weight", "up.weight", "norm.weight"}
        for n, t in got.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, want[n]), (name, n)
        config = json.loads((tmp_path / f"m{name}" / "config.json").read_text())
        assert "quantization_config" not in config


def test_merge_two_inputs_one_block_fp8(tmp_path: Path) -> None:
    """base + 0.5 tau_1 + 0.5 tau_2, each pruned, summed in float32 and rounded once."""
    q = fp8_model(20)
    b = bf16_near(q, 21)
    other = bf16_near(q, 22)
    base = write_checkpoint(tmp_path / "base", b, config=BF16_CONFIG)
    f1 = write_checkpoint(tmp_path / "f1", q, config=FP8_CONFIG)
    f2 = write_checkpoint(tmp_path / "f2", other, config=BF16_CONFIG)
    fapm("merge", "--base", str(base), "--finetuned", str(f1), "--finetuned", str(f2),
         "-w", "0.5", "-w", "0.5", "-s", "0.5", "-o", str(tmp_path / "m"))  # fmt: skip
    got = load_checkpoint(tmp_path / "m")
    deq = dequantized(q)
    for name, bt in b.items():
        acc = torch.zeros(bt.numel())
        touched = torch.zeros(bt.numel(), dtype=torch.bool)
        for f in (deq[name], other[name]):
            mask = reference_mask(bt, f, Fraction(1, 2), "fapm").reshape(-1)
            tau = (f.float() - bt.float()).reshape(-1)
            acc += torch.where(mask, tau, 0.0) * 0.5
            touched |= mask
        want = torch.where(touched, (bt.reshape(-1).float() + acc).to(torch.bfloat16),
                           bt.reshape(-1))  # fmt: skip
        assert torch.equal(got[name].reshape(-1), want), name


@pytest.mark.parametrize(("name", "dtype"), [("float8_e4m3fn", torch.float8_e4m3fn),
                                             ("fp8_e5m2", torch.float8_e5m2)])  # fmt: skip
def test_dtype_names_float8(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    b = {"w": torch.randn(6, 5, generator=g).to(torch.bfloat16)}
    f = {"w": (b["w"].float() + torch.randn(6, 5, generator=g) * 0.1).to(torch.bfloat16)}
    base, ft = write_checkpoint(tmp_path / "b", b), write_checkpoint(tmp_path / "f", f)
    fapm("prune", "--base", str(base), "--finetuned", str(ft), "-o", str(tmp_path / "o"),
         "-s", "0.5", "--dtype", name)  # fmt: skip
    got = load_checkpoint(tmp_path / "o")["w"]
    mask = reference_mask(b["w"], f["w"], Fraction(1, 2), "fapm")
    want = torch.where(mask, f["w"], b["w"]).to(dtype)
    assert got.dtype == dtype and torch.equal(bits(got), bits(want))


def quantize_blocks(w: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 release's weight: per block, scale = amax / 448 and q = fp8(w / scale)."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // bm), -(-cols // bn))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float()
            s = float(blk.abs().max()) / 448 or 1.0
            scale[i, j] = s
            q[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_block_fp8_release_output_loads_with_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ft")  # the fine-tune, in bfloat16
    release: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if t.dim() == 2 and "proj" in name:
            noisy = (t.float() + torch.randn(t.shape) * 0.01).to(torch.bfloat16)
            release[name], release[name + "_scale_inv"] = quantize_blocks(noisy, 16, 16)
        else:
            release[name] = t.clone()
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16],
                                  "activation_scheme": "dynamic", "fmt": "e4m3"}  # fmt: skip
    write_checkpoint(tmp_path / "base", release, config=cfg)
    fapm("prune", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"),
         "-o", str(tmp_path / "out"), "-s", "0.5")  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", torch_dtype=torch.bfloat16
    )
    written = load_checkpoint(tmp_path / "out")
    assert not [n for n in written if n.endswith("_scale_inv")]
    state = loaded.state_dict()
    for name, t in written.items():
        assert torch.equal(state[name], t), name
    name = "model.layers.0.self_attn.q_proj.weight"
    deq = ref_dequant(release[name], release[name + "_scale_inv"], 16, 16).to(torch.bfloat16)
    ft_w = model.state_dict()[name]
    mask = reference_mask(deq, ft_w, Fraction(1, 2), "fapm")
    assert torch.equal(written[name], torch.where(mask, ft_w, deq))


def test_block_fp8_base_dequantizes_to_the_finetunes_dtype(tmp_path: Path) -> None:
    """float16 fine-tune: base dequantized to float16 (not bfloat16), also through diff + -t."""
    q = fp8_model(8)
    ft = {n: t.to(torch.float16) if n in SHAPES else t for n, t in bf16_near(q, 9).items()}
    base = write_checkpoint(tmp_path / "base", q, config=FP8_CONFIG)
    fine = write_checkpoint(tmp_path / "ft", ft, config=BF16_CONFIG)
    deq = {
        n: ref_dequant(t, q[n + "_scale_inv"], *BLOCK).to(torch.float16) if n in SHAPES else t
        for n, t in q.items() if not n.endswith("_scale_inv")
    }  # fmt: skip
    fapm("diff", "--base", str(base), "--finetuned", str(fine), "-o", str(tmp_path / "tv"))
    for out, args in (("p", ["--finetuned", str(fine)]), ("t", ["-t", str(tmp_path / "tv")])):
        fapm("prune", "--base", str(base), *args, "-o", str(tmp_path / out), "-s", "0.5")
        got = load_checkpoint(tmp_path / out)
        for name in SHAPES:
            assert got[name].dtype == torch.float16, (out, name)
            mask = reference_mask(deq[name], ft[name], Fraction(1, 2), "fapm")
            assert torch.equal(got[name], torch.where(mask, ft[name], deq[name])), (out, name)


def test_block_fp8_split_run_equals_single_run(tmp_path: Path) -> None:
    q = fp8_model(10)
    base = write_checkpoint(tmp_path / "base", q, config=FP8_CONFIG)
    fine = write_checkpoint(tmp_path / "ft", bf16_near(q, 11), config=BF16_CONFIG)
    common = ["prune", "--base", str(base), "--finetuned", str(fine), "-s", "0.5",
              "--max-shard-size", "200", "--files-from", "base"]  # fmt: skip
    fapm(*common, "-o", str(tmp_path / "one"))
    for i in (1, 2):
        fapm(*common, "-o", str(tmp_path / "split"), "--part", f"{i}/2")
    fapm(*common, "-o", str(tmp_path / "split"), "--finalize")
    one, split = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "split")
    assert len(list((tmp_path / "one").glob("*.safetensors"))) > 1
    assert set(one) == set(split) and all(torch.equal(one[n], split[n]) for n in one)
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert "quantization_config" not in config


def test_lora_adapter_on_a_block_fp8_base(tmp_path: Path) -> None:
    """The adapter merges into the dequantized base (bfloat16), as on any bfloat16 base."""
    from safetensors.torch import save_file

    q = fp8_model(12)
    base = write_checkpoint(tmp_path / "base", q, config=FP8_CONFIG)
    g = torch.Generator().manual_seed(13)
    a, b = torch.randn(2, 7, generator=g), torch.randn(10, 2, generator=g)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]}
    ))  # fmt: skip
    fapm("prune", "--base", str(base), "--finetuned", str(adapter), "-o", str(tmp_path / "o"),
         "-s", "0")  # fmt: skip
    got = load_checkpoint(tmp_path / "o")
    deq = dequantized(q)
    merged = (deq["proj.weight"].float() + (b @ a) * 2.0).to(torch.bfloat16)
    assert torch.equal(got["proj.weight"], merged)
    assert torch.equal(got["up.weight"], deq["up.weight"])
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())


def test_inspect_compare_pairs_block_fp8_as_prune_reads_it(tmp_path: Path) -> None:
    q = fp8_model(1)
    fp8 = write_checkpoint(tmp_path / "fp8", q, config=FP8_CONFIG)
    bf16 = write_checkpoint(tmp_path / "bf16", bf16_near(q, 2), config=BF16_CONFIG)
    r = runner.invoke(app, ["inspect", str(fp8), "--compare", str(bf16), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["compare"]
    assert doc["only_a"] == [] and doc["only_b"] == [] and doc["common"] == 3
    # the scales still count as tensors of the checkpoint itself
    assert json.loads(r.stdout)["tensor_count"] == 5
