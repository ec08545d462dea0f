"""Quantized checkpoints on either side: block-quantized FP8 dequantized on read, every other
quantization refused (METHOD.md, "FP8 weights" and "Other quantized checkpoints").

A block-FP8 checkpoint (``config.json`` ``quantization_config.quant_method == "fp8"`` with
``weight_block_size: [bm, bn]``, as DeepSeek-V3 and Qwen3 FP8 releases) stores each quantized
``X.weight`` as F8_E4M3 beside an ``X.weight_scale_inv`` holding one float scale per
``bm x bn`` block (``ceil(rows / bm) x ceil(cols / bn)``, partial blocks at the edges). The
weight it stands for is ``float32(q) * scale`` per block (what transformers' FP8 dequantization
computes), rounded once to the dtype the other side has for that tensor (bfloat16 when the
other side has none, or is block-FP8 too: both sides then meet in bfloat16).

``open_block_fp8`` decides everything from the config and headers (scale shapes against weight
shapes included), so a refusal comes before any tensor data is read; ``view`` is what the plan
pairs (dequantized dtypes, no scale tensors) and ``DequantReader`` rebuilds one tensor at a
time, as ``AdapterReader`` does for LoRA adapters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fapm_cli.errors import InputError
from fapm_cli.io.header import DTYPES, DType, TensorInfo
from fapm_cli.io.reader import Checkpoint, TensorReader, TensorRef

if TYPE_CHECKING:
    import torch

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
DEFAULT_DTYPE = DTYPES["BF16"]  # where the other side says nothing (or is block-FP8 too)
_HINT_UNQUANTIZED = (
    "pass the unquantized checkpoint (the bfloat16 / float16 release this one was quantized "
    "from); a task vector between packed integer weights is not meaningful"
)
# Tensor names that only quantized layouts have (GPTQ/AWQ packing, bitsandbytes state,
# compressed-tensors / fbgemm scales and zero points).
_PACKED = (".qweight", ".qzeros", ".g_idx", ".SCB", ".weight_packed", ".weight_zero_point")
_SCALES = (".weight_scale", ".scales", ".weight_scale_inv", ".absmax")


def quantization_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (None: no config, or not quantized)."""
    if "config.json" not in checkpoint.extra_files:
        return None
    try:
        config = json.loads(checkpoint.source.read_text("config.json", limit=10_000_000))
    except (ValueError, RecursionError):
        return None  # a broken config is inspect's warning; the weights decide below
    if not isinstance(config, dict):
        return None
    q = config.get("quantization_config")
    return q if isinstance(q, dict) else None


def block_size(q: dict[str, Any] | None) -> tuple[int, int] | None:
    """``weight_block_size`` of a block-FP8 config, None for anything else."""
    if q is None or q.get("quant_method") != "fp8":
        return None
    size = q.get("weight_block_size")
    if (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)
    ):
        return size[0], size[1]
    return None


def method_of(q: dict[str, Any]) -> str:
    method = q.get("quant_method")
    return method if isinstance(method, str) and method else "unknown"


@dataclass
class BlockFP8:
    """A block-FP8 checkpoint checked from headers: which weights are quantized, and how."""

    checkpoint: Checkpoint  # as stored (F8 weights and their scales)
    block: tuple[int, int]
    scales: dict[str, TensorRef]  # weight name -> its ``weight_scale_inv``
    targets: dict[str, DType] = field(default_factory=dict)  # weight name -> dequantized dtype

    def retarget(self, dtype_of: Callable[[str], DType | None]) -> None:
        """Each quantized weight's dequantized dtype: ``dtype_of(name)`` (the other side's),
        or bfloat16 where that is None or not a float."""
        for name in self.scales:
            d = dtype_of(name)
            self.targets[name] = (
                d if d is not None and d.is_float and d.itemsize > 1 else (DEFAULT_DTYPE)
            )

    def view(self) -> Checkpoint:
        """What the plan pairs: the dequantized weights' dtypes, and no scale tensors. Data
        comes from ``DequantReader``, never through this view."""
        c = self.checkpoint
        drop = {ref.info.name for ref in self.scales.values()}
        tensors = {}
        for name, ref in c.tensors.items():
            if name in drop:
                continue
            if name in self.scales:
                i = ref.info
                d = self.targets.get(name, DEFAULT_DTYPE)
                info = TensorInfo(i.name, d, i.shape, i.start, i.numel * d.itemsize)
                ref = TensorRef(ref.shard, info)
            tensors[name] = ref
        return Checkpoint(
            c.source, c.shards, tensors, c.index_name, c.index_metadata, c.extra_files
        )


def refuse_quantized(checkpoint: Checkpoint) -> BlockFP8 | None:
    """A block-FP8 checkpoint as ``BlockFP8``; None for a plain one. Every other quantization
    (a ``quantization_config`` of another method, or quantized tensors without one) is refused."""
    where = checkpoint.display
    q = quantization_config(checkpoint)
    if q is not None:
        block = block_size(q)
        if block is not None:
            return open_block_fp8(checkpoint, block)
        method = method_of(q)
        detail = " without weight_block_size (per-tensor FP8)" if method == "fp8" else ""
        raise InputError(
            f"{where}: is quantized with {method!r}{detail}, which fapm cannot prune (it reads "
            "plain float checkpoints and block-quantized FP8)",
            hint=_HINT_UNQUANTIZED,
        )
    names = checkpoint.tensors
    for name, ref in names.items():
        if name.endswith(_PACKED):
            raise InputError(
                f"{where}: tensor {name!r} is a quantized layout's (packed integer weights), "
                "and there is no quantization_config",
                hint=_HINT_UNQUANTIZED,
            )
        for suffix in _SCALES:
            if not name.endswith(suffix) or not ref.info.dtype.is_float:
                continue
            weight = names.get(name[: -len(suffix)] + ".weight")
            if weight is not None and (
                not weight.info.dtype.is_float or weight.info.dtype.itemsize == 1
            ):
                raise InputError(
                    f"{where}: {weight.info.dtype.name} tensor {weight.info.name!r} has a "
                    f"scale {name!r} beside it (a quantized weight), and there is no "
                    "quantization_config saying how to dequantize it",
                    hint=_HINT_UNQUANTIZED,
                )
    return None


def open_block_fp8(checkpoint: Checkpoint, block: tuple[int, int]) -> BlockFP8:
    """Pair each ``X.weight_scale_inv`` with its F8 weight; refuse what does not fit."""
    where = checkpoint.display
    bm, bn = block
    scales: dict[str, TensorRef] = {}
    for name, ref in checkpoint.tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        wname = name[: -len(SCALE_SUFFIX)]
        w = checkpoint.tensors.get(wname)
        if w is None:
            raise InputError(
                f"{where}: scale {name!r} has no weight {wname!r} beside it",
                hint="the checkpoint is incomplete; download it again",
            )
        wi, si = w.info, ref.info
        if wi.dtype.name not in ("F8_E4M3", "F8_E5M2") or len(wi.shape) != 2:
            raise InputError(
                f"{where}: {wname!r} has a block scale but is {wi.dtype.name} "
                f"{list(wi.shape)}, not a 2-D FP8 weight",
                hint=_HINT_UNQUANTIZED,
            )
        want = (math.ceil(wi.shape[0] / bm), math.ceil(wi.shape[1] / bn))
        if not si.dtype.is_float or si.shape != want:
            raise InputError(
                f"{where}: scale {name!r} is {si.dtype.name} {list(si.shape)}, but weight "
                f"{list(wi.shape)} in {bm}x{bn} blocks needs a float {list(want)}",
                hint="the checkpoint's weight_block_size does not match its scales; "
                "restore config.json or download the checkpoint again",
            )
        scales[wname] = ref
    return BlockFP8(checkpoint, block, scales)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``float32(q) * scale`` per block, in float32 (edge blocks partial)."""
    import torch

    bm, bn = block
    rows, cols = q.shape
    s = scale.to(torch.float32)
    s = s.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return q.to(torch.float32).mul_(s)


class DequantReader:
    """Reads a block-FP8 checkpoint's tensors, quantized weights dequantized (a ``Rebuilder``)."""

    def __init__(self, q: BlockFP8) -> None:
        self.q = q
        self.reader = TensorReader(q.checkpoint)

    def model(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        ref = self.q.scales.get(name)
        if ref is None:
            return self.reader.read(name)
        w = self.reader.read(name).reshape(self.q.checkpoint.tensors[name].info.shape)
        s = self.reader.read(ref.info.name).reshape(ref.info.shape)
        target = getattr(torch, self.q.targets.get(name, DEFAULT_DTYPE).torch_name)
        return dequantize(w, s, self.q.block).to(target)

    def shards(self, name: str) -> list[str]:
        refs = [self.q.checkpoint.tensors[name]] if name in self.q.checkpoint.tensors else []
        if name in self.q.scales:
            refs.append(self.q.scales[name])
        return list(dict.fromkeys(r.shard for r in refs))

    def close(self) -> None:
        self.reader.close()
