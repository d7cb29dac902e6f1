"""Weight-only int8 quantization, applied at load time to a model read from a normal checkpoint.

Every projection (q/k/v, o, gate/up, down, and the output head unless it shares the embedding's
weights) gets int8 weights with one scale per output channel: ``w ~= q * scale``, with q in
[-127, 127] and scale = max |w| of the channel / 127. Activations, norms, the embedding and the KV
cache keep the model's dtype. A decode step reads a quarter (from float32) or half (from bf16) of
the weight bytes, which is what bounds it.

The product runs as ``torch._weight_int8pack_mm`` where this torch has it for the device (CPU
does), which multiplies by the int8 weights without making a float copy of them, and otherwise as
a float matmul against the weights converted on the fly. On the CPU that kernel is vectorised for
bfloat16 activations only, so a float32 model's activations are rounded to bfloat16 for the
product (and the result converted back): an error of the same size as the weights' rounding.

Quantization happens after each rank has read its own shard, so it composes with tensor
parallelism: a row-parallel layer's scales are those of the rank's slice of each output channel,
and the partial sums it all-reduces are already scaled.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model import CausalLM, Linear

MODES = ("int8",)


def quantize_channels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] (float) -> (q int8 [out, in], scales float32 [out]) with w ~= q * scales."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class Int8Linear(nn.Module):
    """y = x @ (q * scales).T (+ bias); the same ``matmul``/``add_bias`` split as ``Linear``, so
    that a row-parallel layer can all-reduce before its bias."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", q)  # [out, in]
        # the packed kernel's activations: the model's dtype, except float32 on the CPU, where the
        # kernel is vectorised for bfloat16 only (over ten times faster at one row)
        self.compute_dtype = torch.bfloat16 if (q.device.type == "cpu" and dtype == torch.float32) else dtype
        self.packed_mm = _has_packed_mm(q.device, self.compute_dtype)
        if not self.packed_mm:
            self.compute_dtype = dtype
        self.register_buffer("scales", scales.to(self.compute_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Module) -> Int8Linear:
        weight = module.weight.detach()
        # ours is stored [in, out] unless turned by rows
        w = weight.t() if isinstance(module, Linear) and not module.by_rows else weight
        q, scales = quantize_channels(w)
        return cls(q, scales, module.bias, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.matmul(x))

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        n_out, n_in = self.qweight.shape
        flat = x.reshape(-1, n_in)
        if self.packed_mm:
            y = torch._weight_int8pack_mm(flat.to(self.compute_dtype).contiguous(), self.qweight, self.scales)
        else:
            y = (flat @ self.qweight.to(x.dtype).t()) * self.scales
        return y.to(x.dtype).reshape(*x.shape[:-1], n_out)


_PACKED: dict[tuple[str, torch.dtype], bool] = {}


def _has_packed_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``_weight_int8pack_mm`` runs, and agrees with the plain product, here."""
    key = (device.type, dtype)
    if key not in _PACKED:
        ok = hasattr(torch, "_weight_int8pack_mm")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(3, 64, generator=g).to(device, dtype)
                q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8).to(device)
                s = torch.rand(32, generator=g).to(device, dtype)
                got = torch._weight_int8pack_mm(x, q, s).float()
                ref = (x.float() @ q.float().t()) * s.float()
                ok = torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
            except (RuntimeError, NotImplementedError):
                ok = False
        _PACKED[key] = ok
    return _PACKED[key]


def quantize(model: CausalLM, mode: str) -> CausalLM:
    """Replace the model's projections by their ``mode`` quantized versions, in place."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r} is not one of {MODES}")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear) or (name == "lm_head" and isinstance(child, nn.Linear))
    ]
    for parent, name, child in targets:
        if name == "lm_head" and model.ties_embeddings:
            continue  # the head is the embedding table, which stays in the model's dtype
        setattr(parent, name, Int8Linear.from_linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that hold weights (quantized ones included)."""
    tensors = list(model.parameters()) + [
        b for n, b in model.named_buffers() if n.endswith(("qweight", "scales"))
    ]
    return sum(t.numel() * t.element_size() for t in tensors)
