"""Decoder-only transformer for the Llama, Mistral, Qwen2/3 and GLM/GLM-4 families.

Module names follow the Hugging Face checkpoint (``model.layers.3.mlp.down_proj``) with two
deliberate differences, both declared in ``CausalLM.checkpoint_layout`` so that the loader maps names
and never needs model code: q/k/v projections live in one ``qkv_proj`` and gate/up in one
``gate_up_proj`` (one matrix product instead of three or two), and projection weights are stored
transposed, [in, out], which the CPU multiplies faster for the few rows of an eager decode step
(a compiled CPU decoder turns them back by rows: ``Linear.store_by_rows``).

Tensor parallelism is built in (Megatron's pairing): qkv and gate_up are split by output columns,
o_proj and down_proj by input rows, each followed by the one all-reduce of its block, written in
``Attention.forward`` and ``MLP.forward``; the embedding and the head are split by vocabulary.
With tp = 1 every collective is the identity.

The model is stateless between calls: the KV cache and the per-step metadata (``Step``) are passed
in, so the contiguous cache used for batch generation and a paged cache can be swapped without
touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comm.collectives import TPGroup, all_gather_last_dim, all_reduce, gather_last_dim
from engine.config import ModelConfig, rope_inv_freq


@dataclass
class Step:
    """What one forward pass works on.

    tokens and positions are [B, S]; row b of the batch reads and writes cache row ``rows[b]``.
    ``kv_len`` is the number of cache positions attention looks at (max position + 1).
    ``logit_index`` [B] selects the one position per row whose logits are wanted (None: all).
    ``start`` is the first position of every row when they all start at the same one, else None.
    ``masks`` maps a sliding window (None for full attention) to a boolean mask [B, 1, S, kv_len],
    or to None where every cached position up to kv_len is visible to every query.
    A paged cache also gets ``block_tables`` [B, blocks] (the cache blocks of each row, in order)
    and ``slots`` [B, S] (where each new token's key and value go), and in compiled decoding
    ``block_masks``: per sliding window, a flex-attention block mask over the cache's whole pool,
    which attention reads in place instead of a gathered copy of each row's blocks.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    rows_slice: slice | None
    start: int | None
    kv_len: int
    logit_index: torch.Tensor | None
    masks: dict[int | None, torch.Tensor | None]
    block_tables: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    block_masks: dict | None = None


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """mask[b, 0, s, t] is True where the query at positions[b, s] may attend to cache position t."""
    t = torch.arange(kv_len, device=positions.device)
    q = positions[:, None, :, None]  # [B, 1, S, 1]
    mask = t <= q
    if window is not None:
        mask &= q - t < window
    return mask


@dataclass(frozen=True)
class Part:
    """A checkpoint tensor, by name and full shape as stored, or the slice ``cut`` of it
    ((dim, start, stop)), that fills part of a parameter."""

    name: str
    shape: tuple[int, ...]
    cut: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Source:
    """A parameter is its parts concatenated along the output dimension (dim 0 as stored in the
    checkpoint), zero beyond them (vocabulary padding); ``transposed`` parameters hold that
    result as [in, out]."""

    parts: tuple[Part, ...]
    transposed: bool = False


def _intra_op_threads() -> int:
    return torch.get_num_threads()


def let_compiler_read_threads() -> None:
    """Let torch.compile read the thread count as a constant of the traced step (called before
    compiling: marking it imports torch._dynamo, which would add 1.5 s to every process's start)."""
    global _intra_op_threads
    if not getattr(_intra_op_threads, "_dynamo_marked_constant", False):
        _intra_op_threads = torch.compiler.assume_constant_result(_intra_op_threads)


def cpu_threads(x: torch.Tensor) -> int:
    """Threads a CPU product of ``x`` may split over (1 on other devices); under torch.compile
    the count when the step was traced (1 unless ``let_compiler_read_threads`` ran)."""
    if x.device.type != "cpu":
        return 1
    if torch.compiler.is_compiling():
        return _intra_op_threads() if getattr(_intra_op_threads, "_dynamo_marked_constant", False) else 1
    return torch.get_num_threads()


def split_k_matmul(
    x: torch.Tensor, weight: torch.Tensor, threads: int, transposed: bool = False
) -> torch.Tensor:
    """x [rows, in] @ weight, as ``threads`` partial products over slices of the input dimension,
    summed: each thread streams its own contiguous part of the weight. ``weight`` is [in, out], or
    [out, in] with ``transposed`` (nn.Linear's layout, as the head's weight is: it may be the
    embedding table).

    Written as baddbmm with beta = 0 (its first argument is ignored) rather than bmm: inductor
    turns a bmm of one row into its own multiply-and-sum loop, three to four times slower than the BLAS
    on the CPU, and leaves baddbmm to the BLAS (``benchmarks/matmul.py --compiled``)."""
    rows, n_in = x.shape
    xs = x.view(rows, threads, n_in // threads).transpose(0, 1)  # [T, rows, in / T]
    if transposed:
        ws = weight.view(-1, threads, n_in // threads).permute(1, 2, 0)  # [T, in / T, out], no copy
    else:
        ws = weight.view(threads, n_in // threads, -1)
    return torch.baddbmm(x.new_empty(threads, rows, ws.shape[2]), xs, ws, beta=0).sum(0)


# Up to this many rows, a compiled CPU step multiplies by an [out, in] weight as a multiply-and-sum
# over each output's contiguous row: inductor generates that loop vectorised over the row and
# parallel over the outputs, and at one row it reads the weights within 1-12% of ``torch.sum``'s
# speed, against 66-91% for the split-K (``benchmarks/matmul.py --compiled``, BENCHMARKS.md).
REDUCTION_MAX_ROWS = 2


def compiled_cpu_rows(x: torch.Tensor, rows: int) -> bool:
    """Whether a product of ``rows`` rows is being traced for a compiled CPU step and is few enough
    rows (``REDUCTION_MAX_ROWS``) to be written as one multiply-and-sum per output."""
    return x.device.type == "cpu" and rows <= REDUCTION_MAX_ROWS and torch.compiler.is_compiling()


def by_rows_matmul(x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """x [rows, in] @ weight.T, for weight [out, in], as one multiply-and-sum per output."""
    return (x.reshape(rows, 1, weight.shape[1]) * weight).sum(-1)


class Linear(nn.Module):
    """y = x @ W.T (+ bias), with the weight stored [in_features, out_features] (``x @ weight``),
    or [out_features, in_features] (nn.Linear's layout) once ``store_by_rows`` has run.

    On CPU, a product with few rows (a decode step) is bound by reading the weight, and the BLAS
    runs it on one thread however many torch has. Two no-copy views spread it over T threads:
    up to ``SPLIT_K_MAX_ROWS`` rows, T slices of the input dimension, each a contiguous block of
    the weight, whose partial products are summed (``split_k_matmul``: the weight is read at the
    machine's full bandwidth); up to ``BLOCKED_MAX_ROWS``, T blocks of output columns multiplied
    as a batch. BENCHMARKS.md has the measurements that chose the bounds.

    Compiled CPU decode steps read the weights faster by rows (``REDUCTION_MAX_ROWS``), while the
    eager split-K reads the [in, out] layout faster: so the weights load as [in, out], and a
    compiled decoder on the CPU calls ``store_by_rows`` on its model's layers once.
    """

    SPLIT_K_MAX_ROWS = 2
    BLOCKED_MAX_ROWS = 32

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.by_rows = False

    def store_by_rows(self) -> None:
        """Hold the weight as [out, in] from now on (a transposed copy; the old one is freed)."""
        if not self.by_rows:
            w = self.weight
            self.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
            self.by_rows = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.matmul(x))

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.by_rows:
            return self._matmul_by_rows(x)
        n_in, n_out = self.weight.shape
        rows = x.numel() // n_in
        threads = cpu_threads(x)
        if threads == 1 or rows > self.BLOCKED_MAX_ROWS:
            return x @ self.weight
        if rows <= self.SPLIT_K_MAX_ROWS and n_in % threads == 0:
            y = split_k_matmul(x.reshape(rows, n_in), self.weight, threads)
        elif n_out % threads == 0:
            blocks = self.weight.view(n_in, threads, n_out // threads).transpose(0, 1)
            y = torch.bmm(x.reshape(1, rows, n_in).expand(threads, -1, -1), blocks)
            y = y.transpose(0, 1)
        else:
            return x @ self.weight
        return y.reshape(*x.shape[:-1], n_out)

    def _matmul_by_rows(self, x: torch.Tensor) -> torch.Tensor:
        n_out, n_in = self.weight.shape
        rows = x.numel() // n_in
        threads = cpu_threads(x)
        if compiled_cpu_rows(x, rows):
            y = by_rows_matmul(x, self.weight, rows)
        elif 1 < threads and rows <= self.BLOCKED_MAX_ROWS and n_out % threads == 0:
            # T contiguous blocks of output rows, multiplied as a batch
            blocks = self.weight.view(threads, n_out // threads, n_in).transpose(1, 2)
            y = torch.bmm(x.reshape(1, rows, n_in).expand(threads, -1, -1), blocks).transpose(0, 1)
        else:
            return F.linear(x, self.weight)
        return y.reshape(*x.shape[:-1], n_out)


class Head(nn.Linear):
    """The output projection, in nn.Linear's [vocab, hidden] layout so that it can share the
    embedding table; up to ``MAX_SPLIT_ROWS`` rows on CPU it multiplies by slices of the hidden
    dimension (``split_k_matmul``), which reads the weight faster than F.linear up to there
    (BENCHMARKS.md), and in a compiled CPU step of few rows by rows, as ``Linear`` does."""

    MAX_SPLIT_ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_out, n_in = self.weight.shape
        rows = x.numel() // n_in
        if self.bias is None and compiled_cpu_rows(x, rows):
            return by_rows_matmul(x, self.weight, rows).reshape(*x.shape[:-1], n_out)
        threads = cpu_threads(x)
        if self.bias is None and threads > 1 and n_in % threads == 0 and rows <= self.MAX_SPLIT_ROWS:
            y = split_k_matmul(x.reshape(rows, n_in), self.weight, threads, transposed=True)
            return y.reshape(*x.shape[:-1], n_out)
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables for every position up to ``max_len``, laid out for the family's pairing.

    Rotating a pair (a, b) by angle t gives (a cos t - b sin t, b cos t + a sin t): with the sign
    folded into the sin table, that is x * cos + swap(x) * sin, where swap exchanges the halves
    (pairs (i, i + d/2), Llama) or the neighbours (pairs (2i, 2i + 1), GLM) of the rotary part.
    """

    def __init__(self, config: ModelConfig, max_len: int):
        super().__init__()
        self.interleaved = config.arch.rope_interleaved
        self.dim = config.rotary_dim
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.config = config
        self.max_len = max_len

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq, scale = rope_inv_freq(self.config)
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        if self.interleaved:
            cos = cos.repeat_interleave(2, dim=-1)
            sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:
            cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        self.cos = cos.to(device=device, dtype=dtype)
        self.sin = sin.to(device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, S] -> [B, S, 1, rot] so that it broadcasts over heads of [B, S, H, D]
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)

    def swap(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x.roll(self.dim // 2, dims=-1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.dim == x.shape[-1]:
            return x * cos + self.swap(x) * sin
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat((rot * cos + self.swap(rot) * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TPGroup):
        super().__init__()
        self.layer_id, self.tp = layer_id, tp
        self.window = config.sliding_windows[layer_id]
        self.n_heads = config.num_heads // tp.size
        self.n_kv = max(1, config.num_kv_heads // tp.size)  # kv heads are replicated when tp > n_kv
        self.head_dim = D = config.head_dim
        h = config.hidden_size
        self.qkv_proj = Linear(h, (self.n_heads + 2 * self.n_kv) * D, bias=config.qkv_bias)
        self.o_proj = Linear(self.n_heads * D, h, bias=config.o_bias)
        if config.arch.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rotary: Rotary, cos, sin, cache, step: Step) -> torch.Tensor:
        B, S, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k side by side: [B, S, H + KV, D], so that one rotary pass serves both
        qk = qkv[..., : (H + KV) * D].view(B, S, H + KV, D)
        v = qkv[..., (H + KV) * D :].view(B, S, KV, D)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        q, k = rotary.apply(qk, cos, sin).split((H, KV), dim=2)
        # q: [B, H, S, D]; k, v: [B, KV, T, D] once the cache has them
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = cache.attend(self.layer_id, q, k, v, step, self.window)  # [B, H, S, D]
        y = self.o_proj.matmul(y.transpose(1, 2).reshape(B, S, H * D))  # partial sum over local heads
        y = all_reduce(y, self.tp)  # the attention block's one tensor-parallel all-reduce
        return self.o_proj.add_bias(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp = tp
        h, i, bias = config.hidden_size, config.intermediate_size // tp.size, config.mlp_bias
        self.gate_up_proj = Linear(h, 2 * i, bias=bias)  # [gate | up] of this rank's columns
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        y = self.down_proj.matmul(F.silu(gate) * up)  # partial sum over local columns
        y = all_reduce(y, self.tp)  # the MLP block's one tensor-parallel all-reduce
        return self.down_proj.add_bias(y)


class VocabEmbedding(nn.Module):
    """Rows [start, start + rows) of the (padded) vocabulary; other ids embed to zero here, and the
    all-reduce adds in the one rank that owns each id."""

    def __init__(self, rows: int, hidden: int, start: int, tp: TPGroup):
        super().__init__()
        # an explicit (empty) tensor skips the random init, which on the meta device would pull in
        # torch's decomposition machinery and some 75 MB of Python modules for nothing
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[..., None], 0.0)
        return all_reduce(x, self.tp)  # the embedding's one tensor-parallel all-reduce


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TPGroup):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, layer_id, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config, tp)
        if config.arch.sandwich_norm:
            self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
            self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        else:
            self.post_self_attn_layernorm = self.post_mlp_layernorm = None

    def forward(self, x, rotary, cos, sin, cache, step: Step) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rotary, cos, sin, cache, step)
        if self.post_self_attn_layernorm is not None:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.post_mlp_layernorm is not None:
            h = self.post_mlp_layernorm(h)
        return x + h


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, layer_ids: list[int], first: bool, last: bool, tp: TPGroup):
        super().__init__()
        rows = vocab_rows_per_rank(config.vocab_size, tp.size)
        self.embed_tokens = VocabEmbedding(rows, config.hidden_size, tp.rank * rows, tp) if first else None
        self.layers = nn.ModuleDict({str(i): Block(config, i, tp) for i in layer_ids})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None


def vocab_rows_per_rank(vocab_size: int, tp: int) -> int:
    """Vocabulary rows each rank holds: the vocabulary padded up to a multiple of tp, split evenly."""
    return -(-vocab_size // tp)


class CausalLM(nn.Module):
    """A whole model, or one pipeline stage of it: the layers in ``layer_ids``, the embedding when
    ``first`` and the final norm and head when ``last``; with ``tp`` of size > 1, this rank's shard.

    ``forward`` takes token ids on the first stage and hidden states [B, S, hidden] elsewhere; it
    returns hidden states on all but the last stage, and there float32 logits over this rank's
    slice of the vocabulary ([B, V/tp] with ``step.logit_index``, else [B, S, V/tp]), which
    ``gather_logits`` assembles on the rank that samples.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_len: int,
        layer_ids: list[int] | None = None,
        first: bool = True,
        last: bool = True,
        tp: TPGroup | None = None,
    ):
        super().__init__()
        self.config = config
        self.tp = tp = tp or TPGroup()
        self.layer_ids = list(range(config.num_layers)) if layer_ids is None else list(layer_ids)
        self.model = Decoder(config, self.layer_ids, first, last, tp)
        rows = vocab_rows_per_rank(config.vocab_size, tp.size)
        self.lm_head = Head(config.hidden_size, rows, bias=False) if last else None
        self.rotary = Rotary(config, max_len)
        self.kv_heads = max(1, config.num_kv_heads // tp.size)
        self.tie_weights()

    @property
    def ties_embeddings(self) -> bool:
        return (
            self.config.tie_word_embeddings
            and self.model.embed_tokens is not None
            and self.lm_head is not None
        )

    def tie_weights(self) -> None:
        if self.ties_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def checkpoint_layout(self) -> dict[str, Source]:
        """Where each parameter comes from in a Hugging Face checkpoint, as slices of checkpoint
        tensors for this tensor-parallel rank; parameters not listed are the checkpoint tensor of
        the same name, whole (the norms)."""
        cfg, r, T = self.config, self.tp.rank, self.tp.size
        h, i, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
        ql, il = q // T, i // T
        kv_head = r * self.kv_heads if T <= cfg.num_kv_heads else r // (T // cfg.num_kv_heads)
        kv_cut = (0, kv_head * D, (kv_head + self.kv_heads) * D)
        layout = {}

        def add(param, parts, bias, row_parallel=False):
            """parts: (checkpoint name, full [out, in] shape, cut of this rank or None)"""
            weights = tuple(Part(f"{n}.weight", shape, cut) for n, shape, cut in parts)
            layout[f"{param}.weight"] = Source(weights, transposed=True)
            if bias:
                # a row-parallel layer's bias is added once, after the all-reduce: whole on every rank
                cuts = [None if row_parallel else cut for _, _, cut in parts]
                layout[f"{param}.bias"] = Source(
                    tuple(Part(f"{n}.bias", shape[:1], c) for (n, shape, _), c in zip(parts, cuts))
                )

        for layer in self.layer_ids:
            a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
            qkv = [
                (a + "q_proj", (q, h), (0, r * ql, (r + 1) * ql)),
                (a + "k_proj", (kv, h), kv_cut),
                (a + "v_proj", (kv, h), kv_cut),
            ]
            add(a + "qkv_proj", qkv, cfg.qkv_bias)
            add(a + "o_proj", [(a + "o_proj", (h, q), (1, r * ql, (r + 1) * ql))], cfg.o_bias, True)
            if cfg.arch.fused_gate_up:
                gate_up = [
                    (m + "gate_up_proj", (2 * i, h), (0, r * il, (r + 1) * il)),
                    (m + "gate_up_proj", (2 * i, h), (0, i + r * il, i + (r + 1) * il)),
                ]
            else:
                gate_up = [
                    (m + "gate_proj", (i, h), (0, r * il, (r + 1) * il)),
                    (m + "up_proj", (i, h), (0, r * il, (r + 1) * il)),
                ]
            add(m + "gate_up_proj", gate_up, cfg.mlp_bias)
            add(m + "down_proj", [(m + "down_proj", (h, i), (1, r * il, (r + 1) * il))], cfg.mlp_bias, True)

        rows = vocab_rows_per_rank(cfg.vocab_size, T)
        start, stop = min(r * rows, cfg.vocab_size), min((r + 1) * rows, cfg.vocab_size)
        vocab_part = (Part("model.embed_tokens.weight", (cfg.vocab_size, h), (0, start, stop)),)
        if stop == start:
            vocab_part = ()  # all padding: zeros
        if self.model.embed_tokens is not None:
            layout["model.embed_tokens.weight"] = Source(vocab_part)
        if self.lm_head is not None and not self.ties_embeddings:
            if cfg.tie_word_embeddings:  # a last stage without the embedding reads the tied tensor
                layout["lm_head.weight"] = Source(vocab_part)
            else:
                head = tuple(Part("lm_head.weight", p.shape, p.cut) for p in vocab_part)
                layout["lm_head.weight"] = Source(head)
        return layout

    def forward(self, x: torch.Tensor, step: Step, cache) -> torch.Tensor:
        if self.model.embed_tokens is not None:
            x = self.model.embed_tokens(x)
        cos, sin = self.rotary(step.positions)
        for layer in self.model.layers.values():
            x = layer(x, self.rotary, cos, sin, cache, step)
        if self.lm_head is None:
            return x
        if step.logit_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), step.logit_index]
        return self.lm_head(self.model.norm(x)).float()

    def gather_logits(self, local: torch.Tensor, everywhere: bool = False) -> torch.Tensor | None:
        """Full logits [..., vocab_size] from every rank's slice: on tp rank 0 only (None on the
        others), or on every rank with ``everywhere``."""
        full = all_gather_last_dim(local, self.tp) if everywhere else gather_last_dim(local, self.tp)
        return None if full is None else full[..., : self.config.vocab_size]
