"""Load Hugging Face safetensors checkpoints into a model, one owned tensor (or slice) at a time.

Parameters are allocated once, empty, on the target device, and each tensor's bytes are read from
the file straight into its parameter (through a bounded bounce buffer), so loading never holds a
second copy of the model: not a state dict, not a memory map of the whole file. Reading a slice
(rows of a tensor, or columns) touches only the bytes of that slice, which is what lets every
tensor-parallel rank read just its own shard. ``build_model`` makes a model (or one stage or shard
of it) on the meta device and loads its weights this way.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and byte range, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig, resolve_dtype
from engine.errors import CheckpointError
from engine.model import CausalLM

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header, including that every tensor's bytes are in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes, no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: header length {header_len} does not fit in a file of {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(shape)} ({nbytes} bytes) but its byte range is "
                f"[{begin}, {end})"
            )
        if base + end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} needs bytes up to {base + end}, "
                f"the file has {size}"
            )
        out[name] = TensorInfo(path, name, dtype, shape, base + begin, nbytes)
    return out


def read_tensor(
    info: TensorInfo,
    dim: int = 0,
    start: int = 0,
    stop: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read ``tensor[..., start:stop, ...]`` (slicing dimension ``dim``) from the file, into ``out``
    when given (a contiguous CPU tensor of the file's dtype and the slice's shape)."""
    shape = list(info.shape)
    if not shape:
        shape, dim = [1], 0
    stop = shape[dim] if stop is None else stop
    out_shape = shape[:dim] + [stop - start] + shape[dim + 1 :]
    if out is None:
        out = torch.empty(out_shape, dtype=info.dtype)
    dst = out.view(-1).view(torch.uint8) if out.numel() else out
    inner = math.prod(shape[dim + 1 :]) * info.dtype.itemsize
    outer = math.prod(shape[:dim])
    seg = (stop - start) * inner
    buf = bytearray(min(CHUNK_BYTES, max(seg, 1)))
    view = memoryview(buf)
    with open(info.path, "rb") as f:
        for o in range(outer):
            f.seek(info.offset + (o * shape[dim] + start) * inner)
            done = 0
            while done < seg:
                n = f.readinto(view[: min(len(buf), seg - done)])
                if not n:
                    raise CheckpointError(f"{info.path}: file ended while reading tensor {info.name!r}")
                at = o * seg + done
                dst[at : at + n].copy_(torch.frombuffer(buf, dtype=torch.uint8, count=n))
                done += n
    return out.reshape(info.shape) if not info.shape else out


class Checkpoint:
    """The tensors of a checkpoint directory: ``model.safetensors`` or an index and its shards."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found")
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            # {"metadata": {"total_size": ...}, "weight_map": {tensor: shard file}}; the metadata
            # (sizes, parameter counts) is not needed: every shard's header says what it holds
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            if not all(isinstance(f, str) for f in files):
                bad = next(f for f in files if not isinstance(f, str))
                raise CheckpointError(f"{index}: weight_map names shard {bad!r}, which is not a file name")
            for name in files:
                shard = self.dir / name
                if not shard.is_file():
                    raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {self.dir}")
                self.tensors.update(read_header(shard))
            missing = [n for n in weight_map if n not in self.tensors]
            if missing:
                raise CheckpointError(
                    f"{index}: tensor {missing[0]!r} is listed but not found in shard "
                    f"{weight_map[missing[0]]!r}"
                )
        elif single.is_file():
            self.tensors = read_header(single)
        else:
            found = ", ".join(sorted(p.name for p in self.dir.iterdir())) or "nothing"
            raise CheckpointError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json (found: {found})"
            )

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint") from None

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialised storage on ``device``, keeping ties.

    Unlike ``Module.to_empty``, this touches no symbolic-shape machinery (which imports some 35 MB
    of Python modules on first use) and allocates each tied parameter once.
    """
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), False)
                module._parameters[name] = fresh[id(p)]
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> int:
    """Allocate ``model``'s parameters (built on the meta device, in the dtype wanted) and fill them
    from ``checkpoint``, converting dtype where the file's differs.

    ``model.checkpoint_layout()`` says which checkpoint tensors, or slices of them, make up each
    parameter (see ``engine.model.Source``); a parameter it does not name is the tensor of the same
    name, whole. Returns the number of parameter bytes this process holds.
    """
    from engine.model import Part, Source

    _materialize(model, torch.device(device))
    layout = model.checkpoint_layout() if hasattr(model, "checkpoint_layout") else {}
    params = dict(model.named_parameters())  # tied parameters appear once
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(params), desc="loading weights", unit="tensor")
    try:
        for name, param in params.items():
            source = layout.get(name) or Source((Part(name, tuple(param.shape)),))
            _fill(param, source, checkpoint)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return sum(p.numel() * p.element_size() for p in params.values())


def _fill(param: torch.Tensor, source, checkpoint: Checkpoint) -> None:
    out_dim = 1 if source.transposed else 0
    offset = 0
    for part in source.parts:
        info = checkpoint.info(part.name)
        if list(info.shape) != list(part.shape):
            raise CheckpointError(
                f"{info.path}: tensor {part.name!r} has shape {list(info.shape)}, but config.json implies "
                f"{list(part.shape)}"
            )
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.path}: tensor {part.name!r} has non-float dtype {info.dtype}")
        dim, start, stop = part.cut or (0, 0, info.shape[0] if info.shape else 1)
        rows = (stop - start) if dim == 0 else (info.shape[0] if info.shape else 1)
        dst = param.narrow(out_dim, offset, rows) if param.dim() else param
        direct = (
            not source.transposed
            and dst.device.type == "cpu"
            and dst.dtype == info.dtype
            and dst.is_contiguous()
        )
        with torch.no_grad():
            src = read_tensor(info, dim, start, stop, out=dst.data if direct else None)
            if not direct:
                dst.copy_(src.T if source.transposed else src)
        offset += rows
    if param.dim() and offset < param.shape[out_dim]:
        with torch.no_grad():
            param.narrow(out_dim, offset, param.shape[out_dim] - offset).zero_()


def build_model(
    config: ModelConfig,
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    max_len: int | None = None,
    layer_ids: list[int] | None = None,
    first: bool = True,
    last: bool = True,
    tp=None,
    progress: bool = False,
    quantize: str | None = None,
) -> CausalLM:
    """A model (or one stage/shard of it) with its weights read from ``checkpoint``, in ``dtype``
    (a torch dtype, a ``--dtype`` name, or None for ``auto``: see ``engine.config.resolve_dtype``);
    with ``quantize`` ("int8"), its projections quantized once read (``engine.quant``)."""
    dtype = resolve_dtype(dtype, config, device)
    max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        model = CausalLM(config, max_len=max_len, layer_ids=layer_ids, first=first, last=last, tp=tp)
    model.to(dtype)
    load_weights(model, checkpoint, device=device, progress=progress)
    model.rotary.build(device, dtype)
    if quantize:
        from engine.quant import quantize as quantize_model

        quantize_model(model, quantize)
    return model.eval()
