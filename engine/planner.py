"""Deployment planner: which tp x pp x replicas layout to run for a model on N accelerators, and
what it gives: memory per rank, KV capacity, decode step time, TTFT, tokens/s, front ends.

    python -m engine.planner --model 70B --gpus 256 --gpu H200
    ./launch.sh plan --model DIR --gpus 64 --gpu H100 --dtype int8 --prompt 2048 --output 512 --json

One model of time serves every device (``decode_step``, ``prefill``). A pass of b rows through a
pipeline stage on one rank costs

    max(bytes read / bandwidth, matmul flops / flop rate at b rows) x oversubscription
      + host dispatch (per layer and per pass, each a fixed and a per-row part) x oversubscription
      + tp all-reduces (2 per layer, 1 for the embedding)
      + the logits gather on the last stage

where the bytes are the rank's weights plus the KV cache its rows attend to. A micro-batch goes
stage to stage (a point-to-point hand-off each), its ids return to the head, and the head sends the
next plan; with m micro-batches in flight a decode step of the whole batch takes
max(that critical path, m x the busiest stage's pass), so a pipeline with fewer micro-batches than
stages pays its bubbles. All-reduces take the best algorithm of the fitted cost model
(``comm.cost``): two levels of links (NVLink, InfiniBand) for GPUs; on this host, the gloo fit of
topologies/fitted.json, with the algorithm ``--allreduce auto`` picks.

On this host three more terms come in, all measured by ``measure_host`` and all CPU-only (a GPU's
decode step runs as CUDA graphs and each rank has its own device, so they are zero there): host
work per layer and per pass that grows with the rows (elementwise work, KV writes, the sampler),
measured on random models of the planned model's shape and of a tp rank's shard of it (its
heads, columns and vocabulary: the part of that work tensor parallelism divides); what an
all-reduce costs inside a step (``calibrate_allreduce``: interleaved with matmuls, ranks no longer
arrive together, and a rank blocked in a receive waits for a core), which replaces the
back-to-back fit; and the core time of ranks that wait in receives (a pipeline with fewer
micro-batches than stages), counted into the oversubscription of the busy ones.

GPU figures are datasheet figures (topologies/gpus.py) times efficiency factors that are
assumptions until ``--calibration`` reads benchmarks/device.py's measurement; ``--gpu cpu``
measures this host instead (``measure_host``), which is what benchmarks/plan_check.py checks
against measured decode steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comm.cost import Fitted, Link, choose, load, predict, predict_two_level
from engine.errors import RingleaderError
from topologies.gpus import GPU, GPUS, LATENCY_SOURCE, gpu
from topologies.schedule import TOPOLOGIES, chunks_for

# bytes per projection weight; the embedding, norms, activations and KV cache stay in bf16 on a
# GPU (int8 is weight-only, one scale per output channel: engine/quant.py)
WEIGHT_BYTES = {"bf16": 2, "int8": 1, "float32": 4}
DTYPES = tuple(WEIGHT_BYTES)
LOGIT_BYTES = 4  # the last stage gathers float32 logits
ID_BYTES = 8
PLAN_ROW_BYTES = 8 * 8 + 5 * 4  # a plan's int64 and float32 columns per row (engine/executor.py)

# assumptions, stated in every plan until measured
BANDWIDTH_EFFICIENCY = 0.7  # achieved / datasheet HBM bandwidth of a compiled decode step
FLOPS_EFFICIENCY = 0.5  # achieved / dense bf16 peak of a prefill
MEMORY_FRACTION = 0.9  # of HBM for weights and KV; the rest for activations, CUDA context, allocator
FRONTEND_TOKENS_S = 10_000.0  # streamed tokens/s one front-end process relays
MAX_BATCH = 4096
GPU_KINDS = (*GPUS, "cpu")


class PlanError(RingleaderError):
    """Input the planner cannot plan for: it says which."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only model."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
        """From a checkpoint directory or a config.json, read as the engine reads it."""
        from engine.config import ModelConfig, _read_json_object

        p = Path(path)
        if p.is_file():
            cfg = ModelConfig.from_dict(_read_json_object(p), where=str(p))
        elif p.is_dir():
            cfg = ModelConfig.from_hf(p)
        else:
            raise PlanError(
                f"--model {path}: neither a named shape ({', '.join(SHAPES)}) nor a file or directory"
            )
        return cls(
            p.resolve().name if p.is_dir() else p.resolve().parent.name,
            cfg.num_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
            cfg.tie_word_embeddings,
        )

    @property
    def params(self) -> int:
        """Every parameter, a tied head counted once."""
        per_layer = (
            self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden
        )
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + head + self.hidden


# the published config.json of Meta's Llama 3.1 8B, 70B and 405B (Hugging Face meta-llama/...)
SHAPES = {
    "8B": ModelShape("Llama-3.1-8B-like", 32, 4096, 14336, 32, 8, 128, 128256),
    "70B": ModelShape("Llama-3.1-70B-like", 80, 8192, 28672, 64, 8, 128, 128256),
    "405B": ModelShape("Llama-3.1-405B-like", 126, 16384, 53248, 128, 8, 128, 128256),
}


def model_shape(spec: str) -> ModelShape:
    return SHAPES[spec.upper()] if spec.upper() in SHAPES else ModelShape.from_path(spec)


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nodes:
    """Accelerators in nodes of ``per_node``: ``intra`` links inside a node, ``inter`` between."""

    intra: Link
    inter: Link
    per_node: int

    def allreduce(self, nbytes: int, n: int, procs: int = 0) -> tuple[float, str]:
        """An all-reduce's predicted time and algorithm (``procs``, the layout's ranks, is a
        CPU-host term: GPU ranks do not share processors)."""
        times = {
            t: predict_two_level(
                t, n, self.per_node, nbytes, self.intra, self.inter, chunks_for(t, nbytes, n)
            )
            for t in TOPOLOGIES
        }
        best = min(times, key=times.get)
        return times[best], best

    def message(self, nbytes: int, across: bool = False) -> float:
        link = self.inter if across else self.intra
        alpha, beta = link.at(nbytes)
        return alpha + nbytes * beta

    def woken(self, nbytes: int, across: bool = False) -> float:
        """A message to a rank waiting for it: a GPU rank's wait costs nothing more."""
        return self.message(nbytes, across)

    def crosses(self, first_rank: int) -> bool:
        """Whether ranks first_rank - 1 and first_rank sit on different nodes."""
        return (first_rank - 1) // self.per_node != first_rank // self.per_node

    def spans(self, ranks: int) -> bool:
        """Whether ranks 0 .. ranks - 1 span more than one node."""
        return ranks > self.per_node


@dataclass(frozen=True)
class InStep:
    """An all-reduce of ``n`` ranks inside a decode step, with ``procs`` ranks of the layout on
    the host (the others wait in receives): ``alpha + bytes * beta`` seconds, measured with the
    all-reduces interleaved with matmuls of a layer's size (``calibrate_allreduce``)."""

    n: int
    procs: int
    alpha: float
    beta: float
    back_to_back: tuple[float, ...] = ()  # the same all-reduces without the matmuls, for reference

    def at(self, nbytes: int) -> float:
        return max(0.0, self.alpha + nbytes * self.beta)


@dataclass(frozen=True)
class Host:
    """Ranks on this one host over gloo: the links fitted by benchmarks/collectives.py, and the
    algorithm ``--allreduce auto`` chooses by them (``comm.cost.choose``). ``in_step``: what an
    all-reduce costs inside a decode step, measured on this host; where it holds the group size,
    it replaces the back-to-back fit, which holds ranks that arrive together. ``in_step_message``
    does the same for the first message of a hand-off, to a rank that waits in a receive."""

    fitted: Fitted
    in_step: tuple[InStep, ...] = ()
    # a message to a rank waiting for it in a receive, inside a step (``calibrate_allreduce``)
    in_step_message: InStep | None = None

    def allreduce(self, nbytes: int, n: int, procs: int = 0) -> tuple[float, str]:
        name = choose(nbytes, n, n, self.fitted)
        same = [c for c in self.in_step if c.n == n]
        if same:  # the measured case with the nearest number of ranks on the host
            near = min(same, key=lambda c: (abs(c.procs - (procs or n)), -c.procs))
            return near.at(nbytes), name
        link = self.fitted.links[name]
        return predict(name, n, nbytes, link, n, chunks_for(name, nbytes, n)), name

    def message(self, nbytes: int, across: bool = False) -> float:
        alpha, beta = self.fitted.links["star"].at(nbytes)  # one point-to-point message
        return alpha + nbytes * beta

    def woken(self, nbytes: int, across: bool = False) -> float:
        """A message to a rank waiting for it in a receive, inside a step: measured where it was."""
        return self.in_step_message.at(nbytes) if self.in_step_message else self.message(nbytes, across)

    def crosses(self, first_rank: int) -> bool:
        return False

    def spans(self, ranks: int) -> bool:
        return False


@dataclass(frozen=True)
class Device:
    """One rank's processor as the time model sees it, and where each figure comes from."""

    name: str
    memory: float  # bytes per rank for weights and KV
    bandwidth: float  # achieved bytes/s reading weights
    flops: tuple[tuple[int, float], ...]  # (rows, achieved matmul flop/s), rows ascending
    network: Nodes | Host
    act_bytes: int = 2  # activations and KV cache
    cores: int = 0  # processors shared by the ranks of a host; 0: one per rank
    layer_s: float = 0.0  # host dispatch per layer per pass
    pass_s: float = 0.0  # host dispatch per pass (embedding, head, sampling, the loop)
    # CPU-host terms, measured by measure_host (none on a GPU: decode steps run as CUDA graphs,
    # and every rank has its own processor)
    layer_row_s: float = 0.0  # host work per layer per pass per row, beyond the matmuls
    pass_row_s: float = 0.0  # host work per pass per row (the sampler, the plan), beyond the matmuls
    waiting_weight: float = 0.0  # core time a rank waiting in a receive takes, in busy ranks
    # (tp, layer_s, layer_row_s, pass_s, pass_row_s): the host work of one tp rank's shard, where
    # measured (the fields above are the whole model's)
    shard_host: tuple[tuple[int, float, float, float, float], ...] = ()
    # (ranks, bytes/s): a rank's weight-read bandwidth while that many ranks read at once, where
    # measured (the ranks of one host share its memory; a GPU rank has its own)
    shared_bandwidth: tuple[tuple[int, float], ...] = ()
    figures: dict[str, str] = field(default_factory=dict)  # figure -> source, calibrated or assumed

    def bandwidth_for(self, ranks: int) -> float:
        """A rank's weight-read bandwidth while ``ranks`` ranks compute at once (on a host, at
        most as many as it has cores run at a time)."""
        running = min(ranks, self.cores) if self.cores else ranks
        below = [(k, bw) for k, bw in self.shared_bandwidth if k <= running]
        return min(self.bandwidth, max(below)[1]) if below else self.bandwidth

    def host_work(self, tp: int) -> tuple[float, float, float, float]:
        """(per layer, per layer and row, per pass, per pass and row) of a rank of ``tp``: the
        shard's measured figures, those of the largest measured tp below it, or the whole
        model's."""
        below = [h for h in self.shard_host if h[0] <= tp]
        if not below:
            return self.layer_s, self.layer_row_s, self.pass_s, self.pass_row_s
        return max(below)[1:]

    def flops_at(self, rows: int) -> float:
        """Matmul flop rate at ``rows`` rows: log-log interpolation of the measured points."""
        pts = self.flops
        if rows <= pts[0][0]:
            return pts[0][1]
        for (r0, f0), (r1, f1) in zip(pts, pts[1:]):
            if rows <= r1:
                w = math.log(rows / r0) / math.log(r1 / r0)
                return math.exp((1 - w) * math.log(f0) + w * math.log(f1))
        return pts[-1][1]


def gpu_device(
    kind: GPU,
    bandwidth_efficiency: float,
    flops_efficiency: float,
    calibrated: bool,
    flops_calibrated: bool = False,
) -> Device:
    bw_source = (
        f"calibrated: the fraction {bandwidth_efficiency:.2f} that benchmarks/device.py measured"
        if calibrated
        else f"assumption: {bandwidth_efficiency:.2f} of the datasheet figure (no GPU run exists yet)"
    )
    flops_source = (
        f"calibrated: the fraction {flops_efficiency:.2f} of dense peak that benchmarks/device.py's "
        "prefill reached"
        if flops_calibrated
        else f"assumption: {flops_efficiency:.2f} of dense peak in matmuls (no GPU run exists)"
    )
    nodes = Nodes(
        Link(kind.nvlink_alpha, 1 / kind.nvlink), Link(kind.network_alpha, 1 / kind.network), kind.per_node
    )
    return Device(
        kind.name,
        memory=kind.memory * MEMORY_FRACTION,
        bandwidth=kind.bandwidth * bandwidth_efficiency,
        flops=((1, kind.flops * flops_efficiency),),
        network=nodes,
        figures={
            **{k: v for k, v in kind.sources.items()},
            "bandwidth efficiency": bw_source,
            "flops efficiency": flops_source,
            "usable memory": f"assumption: {MEMORY_FRACTION:.0%} of HBM for weights and KV cache",
            "latency": LATENCY_SOURCE,
            "host dispatch": "assumption: none; decode steps run as CUDA graphs (--compile)",
            "front end": f"assumption: {FRONTEND_TOKENS_S:,.0f} streamed tokens/s per front-end process, "
            "until measured",
        },
    )


def calibration(path: str | Path, kind: GPU) -> tuple[float, float | None]:
    """The fractions of ``kind``'s datasheet bandwidth that the engine's compiled batch-1 decode
    achieved, and of its dense bf16 flops that the engine's bf16 prefill reached (None where the
    file has no prefill row), in a ``benchmarks/device.py --json`` file."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
        device, rows = raw["device"], raw["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"--calibration {p}: not a benchmarks/device.py --json file ({e})") from e
    if kind.name not in str(device).upper():
        raise PlanError(f"--calibration {p}: measured on {device!r}, not on an {kind.name}")

    def unquantized(r: dict) -> bool:  # the engine with the run's own dtype (bf16 by default)
        label = str(r.get("runtime", ""))
        return label.startswith("engine") and "int8" not in label

    flops = max(
        (r["tflops"] * 1e12 / kind.flops for r in rows if unquantized(r) and r.get("tflops")), default=None
    )
    for r in rows:
        label = str(r.get("runtime", ""))
        decode = unquantized(r) and "compiled" in label and "prefill" not in label
        if decode and r.get("batch") == 1 and r.get("gb_s"):  # (a failed row has none)
            return r["gb_s"] * 1e9 / kind.bandwidth, flops
    raise PlanError(f"--calibration {p}: no batch-1 compiled bf16 engine row")


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One rank of one pipeline stage: its layers and what it holds."""

    layers: int
    first: bool
    last: bool
    weight_bytes: int  # resident
    read_bytes: int  # read by every decode pass (the embedding is gathered, not read)
    matmul_params: int  # multiply-adds per row of a pass
    kv_token_bytes: int  # KV cache bytes per token of context


def kv_heads_per_rank(shape: ModelShape, tp: int) -> int:
    return max(1, shape.kv_heads // tp)


def shard_shape(shape: ModelShape, tp: int) -> ModelShape | None:
    """One tp rank's part of ``shape`` as a whole model: its heads, kv heads, intermediate columns
    and vocabulary rows (the all-reduces left out), or None where tp does not divide it."""
    if shape.heads % tp or shape.intermediate % tp:
        return None
    return dataclasses.replace(
        shape,
        name=f"{shape.name} / tp {tp}",
        intermediate=shape.intermediate // tp,
        heads=shape.heads // tp,
        kv_heads=kv_heads_per_rank(shape, tp),
        vocab=-(-shape.vocab // tp),
    )


def layer_params(shape: ModelShape, tp: int) -> int:
    """A tp rank's projection weights in one layer (multiply-adds per row)."""
    q = shape.heads // tp * shape.head_dim
    kv = kv_heads_per_rank(shape, tp) * shape.head_dim
    return shape.hidden * (2 * q + 2 * kv) + 3 * shape.hidden * (shape.intermediate // tp)


def stages(shape: ModelShape, tp: int, pp: int, dtype: str, act_bytes: int = 2) -> list[Stage]:
    """Each stage's tp rank, with the layers split as ``comm.layout.ParallelLayout`` splits them."""
    wb = WEIGHT_BYTES[dtype]
    kvr = kv_heads_per_rank(shape, tp)
    q = shape.heads // tp * shape.head_dim
    proj = layer_params(shape, tp)
    out_channels = q + 2 * kvr * shape.head_dim + shape.hidden + 2 * (shape.intermediate // tp) + shape.hidden
    scales = out_channels * act_bytes if dtype == "int8" else 0
    layer_bytes = proj * wb + scales + 2 * shape.hidden * act_bytes
    rows = -(-shape.vocab // tp)
    table = rows * shape.hidden
    out = []
    for s in range(pp):
        n = shape.layers // pp + (1 if s < shape.layers % pp else 0)
        first, last = s == 0, s == pp - 1
        weights = read = n * layer_bytes
        params = n * proj
        if first:
            weights += table * act_bytes
        if last:
            params += table
            shared = shape.tied and first
            head = (
                table * act_bytes if shape.tied else table * wb + (rows * act_bytes if dtype == "int8" else 0)
            )
            weights += (0 if shared else head) + shape.hidden * act_bytes
            read += head + shape.hidden * act_bytes
        kv = 2 * n * kvr * shape.head_dim * act_bytes
        out.append(Stage(n, first, last, weights, read, params, kv))
    return out


@dataclass(frozen=True)
class Memory:
    weights_per_rank: int  # the fullest rank
    kv_tokens: int  # per replica: the tightest stage decides
    sequences: int  # of prompt + output tokens each, per replica

    @property
    def fits(self) -> bool:
        return self.sequences >= 1


def memory(shape: ModelShape, tp: int, pp: int, dtype: str, device: Device, seq_tokens: int) -> Memory:
    st = stages(shape, tp, pp, dtype, device.act_bytes)
    tokens = min(max(0, int((device.memory - s.weight_bytes) // s.kv_token_bytes)) for s in st)
    return Memory(max(s.weight_bytes for s in st), tokens, tokens // seq_tokens)


@dataclass
class StepTime:
    """A decode step of ``batch`` rows in ``micro_batches`` (or a prefill), and its parts: the
    critical path's memory-or-compute time, host dispatch, all-reduces, the logits gather and
    hand-offs between ranks."""

    seconds: float
    batch: int
    micro_batches: int
    compute: float
    dispatch: float
    allreduce: float
    gather: float
    handoff: float
    algorithm: str  # the all-reduce algorithm of the layer all-reduces ("" for tp = 1)


def _pass(
    shape: ModelShape,
    st: Stage,
    tp: int,
    rows: int,
    tokens: int,
    context: float,
    device: Device,
    factor: float,
    procs: int = 0,
    active: int = 1,
) -> tuple[float, float, float, float, str]:
    """(compute, dispatch, all-reduce, gather, algorithm) of one stage's pass over ``rows``
    sequences of ``tokens`` new tokens each, attending to ``context`` tokens on average."""
    n = rows * tokens
    attn_flops = 4 * n * context * (shape.heads // tp) * shape.head_dim * st.layers
    read = st.read_bytes + rows * context * st.kv_token_bytes
    bandwidth = device.bandwidth_for(active)  # the ranks computing at once share a host's memory
    compute = max(read / bandwidth, (2 * n * st.matmul_params + attn_flops) / device.flops_at(n))
    compute *= factor
    layer_s, layer_row_s, _, _ = device.host_work(tp)
    dispatch = (layer_s + layer_row_s * n) * st.layers * factor
    ar = gather = 0.0
    algorithm = ""
    if tp > 1:
        each, algorithm = device.network.allreduce(n * shape.hidden * device.act_bytes, tp, procs)
        ar = 2 * st.layers * each
        if st.first:
            ar += each
        if st.last:
            part = rows * -(-shape.vocab // tp) * LOGIT_BYTES
            span = device.network.spans(tp)  # the head waits for the first part
            gather = device.network.woken(part, span) + (tp - 2) * device.network.message(part, span)
    return compute, dispatch, ar, gather, algorithm


def _pipeline(
    shape: ModelShape,
    tp: int,
    pp: int,
    dtype: str,
    device: Device,
    rows: int,
    tokens: int,
    context: float,
    micro_batches: int,
) -> StepTime:
    st = stages(shape, tp, pp, dtype, device.act_bytes)
    active = tp * min(micro_batches, pp)
    waiting = tp * pp - active  # ranks of the stages with no micro-batch, in receives
    load = active + device.waiting_weight * waiting
    factor = max(1.0, load / device.cores) if device.cores else 1.0
    net = device.network
    parts = [_pass(shape, s, tp, rows, tokens, context, device, factor, tp * pp, active) for s in st]
    busy = [c + d + a + g for c, d, a, g, _ in parts]
    hidden_bytes = rows * tokens * shape.hidden * device.act_bytes
    # each hand-off's first message reaches a rank that waits for it in a receive
    handoff = sum(net.woken(hidden_bytes, net.crosses((s + 1) * tp)) for s in range(pp - 1))
    if pp > 1:  # the ids go back to the head, two messages
        span = net.spans((pp - 1) * tp + 1)
        handoff += net.woken(rows * ID_BYTES, span) + net.message(rows * ID_BYTES, span)
    members = tp * pp
    if members > 1:  # the head sends the plan (header, ints, floats) to every other rank
        span = net.spans(members)
        handoff += net.woken(rows * PLAN_ROW_BYTES, span) + 2 * net.message(rows * PLAN_ROW_BYTES, span)
    _, _, pass_s, pass_row_s = device.host_work(tp)
    dispatch = (pass_s + pass_row_s * rows * tokens) * factor
    path = sum(busy) + handoff + dispatch
    seconds = max(path, micro_batches * (max(busy) + dispatch / pp))
    return StepTime(
        seconds,
        rows * micro_batches,
        micro_batches,
        sum(p[0] for p in parts),
        sum(p[1] for p in parts) + dispatch,
        sum(p[2] for p in parts),
        sum(p[3] for p in parts),
        handoff,
        parts[0][4],
    )


def decode_step(
    shape: ModelShape,
    tp: int,
    pp: int,
    dtype: str,
    device: Device,
    batch: int,
    context: float,
    micro_batches: int | None = None,
) -> StepTime:
    """One decode step of ``batch`` sequences with ``context`` cached tokens each on average.
    ``micro_batches`` defaults to as many as there are stages (the batch allowing)."""
    m = micro_batches or max(1, min(pp, batch))
    return _pipeline(shape, tp, pp, dtype, device, -(-batch // m), 1, context, m)


def prefill(shape: ModelShape, tp: int, pp: int, dtype: str, device: Device, prompt: int) -> StepTime:
    """The prefill of one prompt of ``prompt`` tokens (flops-bound once the prompt is long)."""
    return _pipeline(shape, tp, pp, dtype, device, 1, prompt, prompt / 2, 1)


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    prompt: int = 1024
    output: int = 256
    ttft_s: float = 2.0
    itl_s: float = 0.05

    @property
    def context(self) -> float:
        """Cached tokens a decode step attends to, on average over a sequence's output."""
        return self.prompt + self.output / 2


@dataclass
class Option:
    """A layout's figures at one batch size per replica."""

    batch: int
    step_ms: float
    ttft_ms: float
    replica_tok_s: float
    cluster_tok_s: float
    frontends: int
    algorithm: str
    meets: bool


@dataclass
class LayoutPlan:
    tp: int
    pp: int
    replicas: int
    idle: int
    weights_per_rank: int
    kv_tokens: int
    sequences: int
    feasible: bool
    why: str
    options: list[Option] = field(default_factory=list)
    best: Option | None = None


def candidate_layouts(shape: ModelShape, gpus: int) -> list[tuple[int, int]]:
    """tp x pp pairs (powers of two) the engine can run for ``shape`` on at most ``gpus`` ranks."""
    from comm.layout import LayoutError, ParallelLayout

    out = []
    tp = 1
    while tp <= gpus:
        pp = 1
        while tp * pp <= gpus and pp <= shape.layers:
            try:
                ParallelLayout(tp=tp, pp=pp).validate(shape.heads, shape.kv_heads, shape.layers)
                if shape.intermediate % tp == 0:
                    out.append((tp, pp))
            except LayoutError:
                pass
            pp *= 2
        tp *= 2
    return out


def plan_layout(shape: ModelShape, tp: int, pp: int, gpus: int, dtype: str, device: Device, work: Workload):
    replicas = gpus // (tp * pp)
    mem = memory(shape, tp, pp, dtype, device, work.prompt + work.output)
    lp = LayoutPlan(tp, pp, replicas, gpus - replicas * tp * pp, mem.weights_per_rank, mem.kv_tokens,
                    mem.sequences, mem.fits, "")  # fmt: skip
    if not mem.fits:
        lp.why = (
            "weights leave no room for one sequence's KV cache" if mem.kv_tokens else "weights do not fit"
        )
        return lp
    pre = prefill(shape, tp, pp, dtype, device, work.prompt)
    batches = [b for b in (2**i for i in range(13)) if b <= min(mem.sequences, MAX_BATCH)]
    if mem.sequences < MAX_BATCH and mem.sequences not in batches:
        batches.append(mem.sequences)
    for b in batches:
        step = decode_step(shape, tp, pp, dtype, device, b, work.context)
        ttft = pre.seconds + step.seconds  # the step in flight when the request arrives, then its prefill
        replica = b / step.seconds
        cluster = replica * replicas
        meets = step.seconds <= work.itl_s and ttft <= work.ttft_s
        lp.options.append(Option(b, step.seconds * 1e3, ttft * 1e3, replica, cluster,
                                 math.ceil(cluster / FRONTEND_TOKENS_S), step.algorithm, meets))  # fmt: skip
    meeting = [o for o in lp.options if o.meets]
    lp.best = max(meeting, key=lambda o: o.cluster_tok_s) if meeting else None
    if lp.best is None:
        lp.why = "misses the latency targets at every batch size"
    return lp


@dataclass
class Plan:
    model: ModelShape
    gpus: int
    gpu: str
    dtype: str
    workload: Workload
    figures: dict[str, str]
    layouts: list[LayoutPlan]

    @property
    def recommended(self) -> LayoutPlan | None:
        ok = [lp for lp in self.layouts if lp.feasible and lp.best is not None]
        # the most cluster tokens/s; between equals, the smaller replica (a failure costs less)
        return max(ok, key=lambda lp: (lp.best.cluster_tok_s, -lp.tp * lp.pp)) if ok else None


def make_plan(shape: ModelShape, gpus: int, device: Device, dtype: str, work: Workload) -> Plan:
    if gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {gpus}")
    layouts = [
        plan_layout(shape, tp, pp, gpus, dtype, device, work) for tp, pp in candidate_layouts(shape, gpus)
    ]
    if not layouts:
        raise PlanError(f"no tp x pp layout of at most {gpus} ranks divides {shape.name}'s heads and layers")
    return Plan(shape, gpus, device.name, dtype, work, device.figures, layouts)


# ----------------------------------------------------------------------------------------------
def measure_host(
    fitted: Fitted | None = None, repeats: int = 5, shape: ModelShape | None = None, calibrate: bool = True
) -> Device:
    """This host as a ``Device`` for its ranks, one intra-op thread each: the weight-read bandwidth
    and matmul flop rate of one thread (float32 products of the projections of one layer of
    ``shape``, or of a 4096 x 4096 layer without one, at 1 to 256 rows, their weights read from
    memory); host work per layer and per pass beyond those matmuls, at 1 row and per further row
    (decode steps of two random models of ``shape``'s layer and vocabulary sizes, ``host_layers``
    layers, timed in turn, and of its tp 2 and 4 shards, less what the bytes and flops terms
    predict for them; without a shape,
    of hidden size 64); the gloo links fitted in
    topologies/fitted.json; and, unless ``calibrate`` is off, what an all-reduce costs inside a
    decode step and the core time of a waiting rank (``calibrate_allreduce``)."""
    import statistics

    import torch

    fitted = fitted or load()
    if fitted is None:
        raise PlanError("no topologies/fitted.json: run benchmarks/collectives.py to fit this host's links")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the products as a decode step runs them: x @ w for w [in, out], on one thread; the
        # projections of one layer of ``shape`` (or one 4096 x 4096 layer), in copies cycled
        # through so that every product reads its weights from memory, as a step does
        if shape is None:
            dims = [(4096, 4096)]
        else:
            h, d = shape.hidden, shape.head_dim
            dims = [(h, (shape.heads + 2 * shape.kv_heads) * d), (shape.heads * d, h)]
            dims += [(h, 2 * shape.intermediate), (shape.intermediate, h)]
        weights = cycled_weights(dims)
        per_copy, copies = sum(i * o for i, o in dims), len(weights)
        points, bandwidth = [], 0.0
        for rows in (1, 4, 16, 64, 256):
            xs = [torch.randn(rows, i) for i, _ in dims]
            times = []
            for _ in range(repeats + 1):  # the first pass warms up
                t = time.perf_counter()
                for layer in weights:
                    for x, w in zip(xs, layer):
                        x @ w
                times.append((time.perf_counter() - t) / copies)
            seconds = statistics.median(times[1:])
            points.append((rows, 2 * rows * per_copy / seconds))
            if rows == 1:
                bandwidth = per_copy * 4 / seconds
        del weights
        import psutil

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        sharing = min(cores, 8)
        shared = ((sharing, concurrent_bandwidth(dims, sharing, 0.5 * repeats)),) if sharing > 1 else ()
        bare = Device(
            "cpu", psutil.virtual_memory().available, bandwidth, tuple(points), Host(fitted), 4, cores
        )
        measured = shape or TINY
        host = _host_work(bare, measured, repeats)
        # the host work of a tp rank: the part that grows with its heads and columns shrinks
        shards = [(tp, shard_shape(measured, tp)) for tp in SHARD_TPS]
        shard_host = [(tp, *_host_work(bare, s, repeats)) for tp, s in shards if s is not None]
    finally:
        torch.set_num_threads(threads)
    layer_s, layer_row_s, pass_s, pass_row_s = host
    in_step: tuple[InStep, ...] = ()
    waiting, message = 0.0, None
    if calibrate:
        per_layer = {tp: (h[0], h[1]) for tp, *h in shard_host}
        in_step, waiting, message = calibrate_allreduce(fitted, measured, cores, per_layer)
    where = f"{shape.name}'s" if shape else "hidden-size-64"
    layers = f"the projections of a layer of {shape.name}" if shape else "a 4096 x 4096 layer"
    figures = {
        "bandwidth": f"measured: {bandwidth / 1e9:.1f} GB/s, batch-1 float32 products of {layers} "
        "on one thread",
        "flops": "measured: "
        + ", ".join(f"{f / 1e9:.0f} GF/s at {r} rows" for r, f in points)
        + " (the same products)",
        "host dispatch": f"measured: {layer_s * 1e3:.3f} ms + {layer_row_s * 1e6:.2f} us/row per layer, "
        f"{pass_s * 1e3:.3f} ms + {pass_row_s * 1e6:.2f} us/row per pass beyond the matmuls "
        f"(decode steps at 1 and {HOST_ROWS[-1]} rows of random models of {where} layer and vocabulary "
        f"sizes, of {' and '.join(map(str, host_layers(measured)))} layers, timed in turn)",
        "links": f"fitted: {fitted.source}",
    }
    for tp, *h in shard_host:
        figures[f"host dispatch, tp {tp}"] = (
            f"measured: {h[0] * 1e3:.3f} ms + {h[1] * 1e6:.2f} us/row per layer, {h[2] * 1e3:.3f} ms + "
            f"{h[3] * 1e6:.2f} us/row per pass (the same, on a tp {tp} rank's share of the heads, "
            "columns and vocabulary)"
        )
    if calibrate:
        cases = "; ".join(
            f"{c.n} ranks of {c.procs} on the host {c.at(0) * 1e3:.3f} ms + {c.beta * 1e9:.2f} ns/byte "
            f"(back to back {', '.join(f'{b * 1e3:.3f}' for b in c.back_to_back)} ms)"
            for c in in_step
        )
        rows = ", ".join(map(str, CALIBRATION_ROWS))
        figures["all-reduce in a step"] = (
            f"measured: {cases}, at {rows} rows interleaved with matmuls of half a layer and half its "
            "host work"
        )
        figures["message in a step"] = (
            f"measured: {message.at(0) * 1e3:.3f} ms + {message.beta * 1e9:.2f} ns/byte to a rank waiting in "
            f"a receive (back to back {', '.join(f'{b * 1e3:.3f}' for b in message.back_to_back)} ms), "
            f"at {rows} rows, each side a matmul of half a layer before it sends"
        )
        figures["waiting ranks"] = (
            f"measured: a rank waiting in a receive takes {waiting:.2f} of a busy rank's core time"
        )
    for k, bw in shared:
        figures["shared bandwidth"] = (
            f"measured: {bw / 1e9:.1f} GB/s a rank while {k} ranks read at once (the same batch-1 products, "
            "one process each)"
        )
    figures["cores"] = f"{cores}: ranks beyond them share cores"
    figures["usable memory"] = "measured: the host's available memory, shared by its ranks"
    return dataclasses.replace(
        bare,
        network=Host(fitted, in_step, message),
        layer_s=layer_s,
        pass_s=pass_s,
        layer_row_s=layer_row_s,
        pass_row_s=pass_row_s,
        waiting_weight=waiting,
        shard_host=tuple(shard_host),
        shared_bandwidth=shared,
        figures=figures,
    )


TINY = ModelShape("tiny", 1, 64, 128, 4, 2, 16, 256)  # host dispatch alone: its arithmetic is negligible
HOST_ROWS = (1, 32)  # rows of the host-work measurements
HOST_CONTEXT = 8 + (4 + 20) / 2  # the tokens those decode steps attend to, on average
SHARD_TPS = (2, 4)  # the tp ranks' shards whose host work is measured too
# the smaller host-work model holds at least this many bytes of layer weights (at most
# HOST_MAX_LAYERS layers), the larger three times as many layers: a model that fits in the
# last-level cache (32 MB here) runs its steps from it, as no real model's step does, and its
# host work then comes out negative and the larger model's inflated (BENCHMARKS.md, run 9)
HOST_MODEL_BYTES = 64 << 20
HOST_MAX_LAYERS = 8


def host_layers(shape: ModelShape) -> tuple[int, int]:
    """The layers of the two random models whose decode steps give ``shape``'s host work."""
    per_layer = layer_params(shape, 1) * 4
    small = min(HOST_MAX_LAYERS, max(1, -(-HOST_MODEL_BYTES // per_layer)))
    return small, 3 * small


def cycled_weights(dims: list[tuple[int, int]]) -> list[list]:
    """Copies of float32 weights of ``dims`` ([in, out] each), about 256 MB of them (2 to 64
    copies), cycled through so that every product reads its weights from memory, as a step does."""
    import torch

    per_copy = sum(i * o for i, o in dims)
    copies = max(2, min(64, (256 << 20) // (4 * per_copy)))
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(i, o, generator=gen) for i, o in dims] for _ in range(copies)]


def concurrent_bandwidth(dims: list[tuple[int, int]], ranks: int, seconds: float) -> float:
    """A rank's weight-read bandwidth while ``ranks`` processes of one thread each run batch-1
    products of ``dims`` at once (weights cycled from memory, as ``measure_host`` reads them): the
    mean of the processes' figures."""
    import multiprocessing
    import statistics

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_read_weights, args=(dims, seconds, barrier, results)) for _ in range(ranks)]
    for proc in procs:
        proc.start()
    try:
        got = [results.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    return statistics.mean(got)


def _read_weights(dims, seconds: float, barrier, results) -> None:
    import torch

    torch.set_num_threads(1)
    weights = cycled_weights(dims)
    per_copy, copies = sum(i * o for i, o in dims), len(weights)
    xs = [torch.randn(1, i) for i, _ in dims]

    def sweep() -> None:
        for layer in weights:
            for x, w in zip(xs, layer):
                x @ w

    sweep()
    barrier.wait()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        sweep()
        n += 1
    results.put(n * copies * per_copy * 4 / (time.perf_counter() - t))


def _host_work(bare: Device, shape: ModelShape, repeats: int) -> tuple[float, float, float, float]:
    """(per layer, per layer and row, per pass, per pass and row): a decode step's time less what
    the bytes and flops terms predict for it, split between layers and the pass by the difference
    between models of ``host_layers`` layers, and between a fixed and a per-row part by 1 and 32
    rows. The two models' steps are timed in turn, ``repeats`` rounds, and each case's median
    taken, so that the host's speed drifting during the measurement moves both alike."""
    import statistics

    a, b = host_layers(shape)
    gens = {n: _random_generator(dataclasses.replace(shape, layers=n)) for n in (a, b)}
    times: dict[tuple[int, int], list[float]] = {(n, r): [] for n in gens for r in HOST_ROWS}
    for _ in range(repeats):
        for n, gen in gens.items():
            for rows in HOST_ROWS:
                times[n, rows].append(time_decode_step(gen, rows, 8, 1))
    rest: dict[int, list[float]] = {}
    for rows in HOST_ROWS:
        for n in (a, b):
            small = dataclasses.replace(shape, layers=n)
            predicted = decode_step(small, 1, 1, "float32", bare, rows, HOST_CONTEXT).compute
            rest.setdefault(rows, []).append(statistics.median(times[n, rows]) - predicted)
    per_layer = {r: (v[1] - v[0]) / (b - a) for r, v in rest.items()}
    per_pass = {r: v[0] - a * per_layer[r] for r, v in rest.items()}

    def line(v: dict[int, float]) -> tuple[float, float]:
        (r0, v0), (r1, v1) = sorted(v.items())
        slope = max(0.0, (v1 - v0) / (r1 - r0))
        return max(0.0, v0 - slope * r0), slope

    return (*line(per_layer), *line(per_pass))


def _random_generator(shape: ModelShape):
    import torch

    from engine.config import ModelConfig
    from engine.generate import Generator
    from engine.model import CausalLM

    cfg = ModelConfig("LlamaForCausalLM", shape.vocab, shape.hidden, shape.intermediate, shape.layers,
                      shape.heads, shape.kv_heads, shape.head_dim, max_position_embeddings=128,
                      tie_word_embeddings=shape.tied)  # fmt: skip
    model = CausalLM(cfg, max_len=128).eval()
    # the parameters are allocated, not written: left so, their pages would all map to the kernel's
    # one zero page, which stays in the cache, and a step would read its weights for nothing (25%
    # faster than the same shape's real weights at 32 rows on the demo model's shape)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.rotary.build(torch.device("cpu"), torch.float32)
    return Generator(model)


CALIBRATION_ROWS = (1, 64)  # the validation's batches run from 1 to 64 rows
CALIBRATION_STEPS = 40  # all-reduces per timed loop


def calibrate_allreduce(
    fitted: Fitted, shape: ModelShape, cores: int, host: dict[int, tuple[float, float]] | None = None
) -> tuple[tuple[InStep, ...], float, InStep]:
    """What an all-reduce costs inside a decode step on this host, and the core time a waiting rank
    takes. Ranks (gloo, one thread each, ``comm.collectives.all_reduce`` with ``auto`` by
    ``fitted``) time loops of the work between a step's all-reduces (``time_in_step``: a matmul of
    half a tp rank's layer of ``shape`` and half its host work) followed by an all-reduce of the
    activations, and loops of that work alone: the difference per all-reduce is its cost in a step.
    Groups of 2 and of 4 ranks alone, then 2 ranks while 2 more wait in a receive, as a pipeline
    stage with no micro-batch waits; the last run's matmul loop against the 2-rank run's gives the
    waiting ranks' weight. And, with 2 ranks, what a message costs a rank that waits for it in a
    receive (``time_in_step_message``). ``host``: per tp size, the host work of a rank's layer
    (seconds, seconds per row), which the loops do beside their matmuls (``time_in_step``)."""
    import tempfile

    import torch.multiprocessing as mp

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, cases in ((2, ((2, 2),)), (4, ((4, 4), (2, 4)))):
            path = Path(tmp) / f"{world}.json"
            args = (world, _free_port(), fitted, shape, cases, str(path), host or {}, small_op_seconds())
            mp.start_processes(_calibration_rank, args, nprocs=world, join=True, start_method="spawn")
            out += json.loads(path.read_text())
    message = in_step_fit(next(r for r in out if r.get("message")), shape)
    out = [r for r in out if not r.get("message")]
    in_step = [in_step_fit(r, shape) for r in out]
    alone = next(r for r in out if (r["n"], r["procs"]) == (2, 2))["matmul"]
    shared = next(r for r in out if (r["n"], r["procs"]) == (2, 4))["matmul"]
    # (2 busy + 2 x weight) ranks on the cores: the matmul slows by that over max(2, cores)
    weight = max(0.0, shared / alone - 1.0) * max(2, cores) / 2
    return tuple(in_step), weight, message


def in_step_fit(measured: dict, shape: ModelShape) -> InStep:
    """An ``InStep`` from ``time_in_step``'s measurement (with its ``n`` and ``procs``): alpha and
    beta through the costs at the fewest and the most rows."""
    (r0, t0), (r1, t1) = measured["rows"][0], measured["rows"][-1]
    b0, b1 = (r0 * shape.hidden * 4, r1 * shape.hidden * 4)
    beta = max(0.0, (t1 - t0) / (b1 - b0))  # a fall with the bytes is noise: then the mean
    alpha = t0 - beta * b0 if beta else (t0 + t1) / 2
    return InStep(measured["n"], measured["procs"], alpha, beta, tuple(measured["back_to_back"]))


def time_in_step(
    tp, shape: ModelShape, host: tuple[float, float] = (0.0, 0.0), op_seconds: float | None = None
) -> dict:
    """On every rank of the tp group ``tp`` at once: loops of the work between two all-reduces of
    a step (a matmul of half a tp rank's layer of ``shape``, and small ops for half the host work
    of a layer, ``host`` = (seconds, seconds per row) per layer) followed by an all-reduce of the
    activations, of that work alone and of the all-reduce alone, at each of ``CALIBRATION_ROWS``
    rows (``op_seconds``: a small op's time, measured before the ranks started). What an all-reduce
    costs in such a loop grows with the work between them where ranks share cores (BENCHMARKS.md),
    so the loop does as much as a step. Returns the cost of an all-reduce per row count, the
    back-to-back all-reduce times, and the work loop's time at the most rows (for ``in_step_fit``)."""
    import statistics

    import torch

    n = tp.size
    w = torch.randn(max(1, layer_params(shape, n) // (2 * shape.hidden)), shape.hidden)
    rows_out, b2b, matmul = [], [], 0.0
    for rows in CALIBRATION_ROWS:
        x = torch.randn(rows, shape.hidden)
        buf = torch.zeros(rows, shape.hidden)
        ops = small_ops_for((host[0] + host[1] * rows) / 2, op_seconds)
        _loop(x, w, buf, tp, True, True, ops)  # warm-up
        both, alone, only = [], [], []
        for _ in range(3):
            both.append(_loop(x, w, buf, tp, True, True, ops))
            alone.append(_loop(x, w, buf, tp, True, False, ops))
            only.append(_loop(x, w, buf, tp, False, True))
        rows_out.append((rows, statistics.median(both) - statistics.median(alone)))
        b2b.append(statistics.median(only))
        if rows == CALIBRATION_ROWS[-1]:
            matmul = statistics.median(alone)
    return {"n": n, "rows": rows_out, "back_to_back": b2b, "matmul": matmul}


def time_in_step_message(rank: int, shape: ModelShape) -> dict:
    """On ranks 0 and 1 of the default group at once: rounds in which rank 0 runs a matmul of half
    a layer of ``shape`` and sends the activations to rank 1, which waits for them in a receive,
    runs the same matmul and sends them back, against the matmul alone with the other rank waiting;
    and the same rounds without the matmuls. Returns a message's cost in such rounds per row count
    and back to back (for ``in_step_fit``)."""
    import statistics

    import torch
    import torch.distributed as dist

    w = torch.randn(max(1, layer_params(shape, 1) // (2 * shape.hidden)), shape.hidden)
    peer = 1 - rank

    def rounds(x, buf, compute: bool) -> float:
        dist.barrier()
        t = time.perf_counter()
        for _ in range(CALIBRATION_STEPS):
            if rank == 1:
                dist.recv(buf, peer)
            if compute:
                torch.nn.functional.linear(x, w)
            dist.send(x, peer)
            if rank == 0:
                dist.recv(buf, peer)
        return (time.perf_counter() - t) / CALIBRATION_STEPS

    def matmul_alone(x) -> float:
        dist.barrier()
        t = time.perf_counter()
        if rank == 0:
            for _ in range(CALIBRATION_STEPS):
                torch.nn.functional.linear(x, w)
            dist.send(torch.zeros(1), peer)
        else:
            dist.recv(torch.empty(1), peer)
        return (time.perf_counter() - t) / CALIBRATION_STEPS

    rows_out, b2b = [], []
    for rows in CALIBRATION_ROWS:
        x, buf = torch.randn(rows, shape.hidden), torch.empty(rows, shape.hidden)
        rounds(x, buf, True)  # warm-up
        both, alone, only = [], [], []
        for _ in range(3):
            both.append(rounds(x, buf, True))
            alone.append(matmul_alone(x))
            only.append(rounds(x, buf, False))
        # a round: two matmuls, one after the other, and two messages
        rows_out.append((rows, (statistics.median(both) - 2 * statistics.median(alone)) / 2))
        b2b.append(statistics.median(only) / 2)
    return {"n": 2, "procs": 2, "rows": rows_out, "back_to_back": b2b, "message": True}


def _loop(x, w, buf, tp, compute: bool, reduce: bool, ops: int = 0) -> float:
    """Seconds per iteration of a matmul of ``x`` by ``w`` and ``ops`` small ops (the host work
    beside it), and/or an all-reduce of ``buf``."""
    import torch
    import torch.distributed as dist

    from comm.collectives import all_reduce

    small = torch.zeros(8)
    dist.barrier(group=tp.group)
    t = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        if compute:
            torch.nn.functional.linear(x, w)
            for _ in range(ops):
                torch.add(small, 1.0, out=small)
        if reduce:
            all_reduce(buf, tp)
    return (time.perf_counter() - t) / CALIBRATION_STEPS


def small_op_seconds() -> float:
    """Seconds one of ``_loop``'s small ops takes on this thread (measure it with no other rank
    running: ranks measuring at once on shared cores would each see a fraction of a core)."""
    import torch

    small = torch.zeros(8)
    for _ in range(100):
        torch.add(small, 1.0, out=small)
    t = time.perf_counter()
    for _ in range(2000):
        torch.add(small, 1.0, out=small)
    return (time.perf_counter() - t) / 2000


def small_ops_for(seconds: float, op_seconds: float | None = None) -> int:
    """How many of ``_loop``'s small ops make ``seconds`` of one thread's work."""
    return max(0, round(seconds / (op_seconds or small_op_seconds())))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibration_rank(
    rank: int,
    world: int,
    port: int,
    fitted: Fitted,
    shape: ModelShape,
    cases,
    path: str,
    host: dict,
    op_seconds: float,
):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from comm import cost
    from comm.collectives import TPGroup

    torch.set_num_threads(1)
    cost.use(fitted)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    groups = {n: dist.new_group(list(range(n))) if n < world else None for n, _ in cases}
    results = []
    for n, procs in cases:
        if rank >= n:  # wait in a receive until the group is done
            dist.recv(torch.empty(1), src=0)
            continue
        tp = TPGroup(rank, n, groups[n], tuple(range(n)), "auto", n)
        measured = time_in_step(tp, shape, host.get(n, (0.0, 0.0)), op_seconds)
        if rank == 0:
            for other in range(n, procs):
                dist.send(torch.zeros(1), dst=other)
            results.append({**measured, "procs": procs})
    if world == 2:
        measured = time_in_step_message(rank, shape)
        if rank == 0:
            results.append(measured)
    if rank == 0:
        Path(path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def time_decode_step(gen, batch: int, prompt: int, repeats: int, short: int = 4, long: int = 20) -> float:
    """Seconds per decode step of ``gen`` at ``batch``: the difference between generating ``long``
    and ``short`` tokens (same prompts, greedy, EOS ignored) over the steps between, medians of
    interleaved repeats after a warm-up, so that the prefill and the set-up cancel out."""
    import statistics

    import torch

    from engine.request import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, gen.config.vocab_size, (batch, prompt), generator=g).tolist()
    runs = {n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (short, long)}
    gen.generate(prompts, runs[short])
    times: dict[int, list[float]] = {short: [], long: []}
    for _ in range(repeats):
        for n, params in runs.items():
            t = time.perf_counter()
            gen.generate(prompts, params)
            times[n].append(time.perf_counter() - t)
    return (statistics.median(times[long]) - statistics.median(times[short])) / (long - short)


# ----------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def render(plan: Plan) -> str:
    w = plan.workload
    rec = plan.recommended
    lines = [
        f"model {plan.model.name}: {plan.model.params / 1e9:.1f}B parameters, {plan.model.layers} layers, "
        f"hidden {plan.model.hidden}, {plan.model.heads} heads ({plan.model.kv_heads} kv), "
        f"{plan.dtype} weights",
        f"{plan.gpus} x {plan.gpu}; workload: {w.prompt}-token prompts, {w.output} output tokens, "
        f"targets TTFT <= {w.ttft_s * 1e3:.0f} ms, inter-token <= {w.itl_s * 1e3:.0f} ms",
        "",
        "figures and their sources:",
        *(f"  {k}: {v}" for k, v in plan.figures.items()),
        "",
    ]
    head = (
        f"{'tp':>3} {'pp':>3} {'repl':>5} {'weights/rank':>12} {'KV tokens':>11} {'seqs':>7} "
        f"{'ms@b1':>7} {'batch':>6} {'step ms':>8} {'TTFT ms':>8} {'tok/s repl':>11} {'tok/s cluster':>14} "
        f"{'front ends':>10}  note"
    )
    lines += [head, "-" * len(head)]
    for lp in plan.layouts:
        cells = f"{lp.tp:>3} {lp.pp:>3} {lp.replicas:>5} {_gb(lp.weights_per_rank):>12} {lp.kv_tokens:>11} "
        cells += f"{lp.sequences:>7} "
        if not lp.feasible:
            lines.append(cells + f"{'':>7} {'':>6} {'':>8} {'':>8} {'':>11} {'':>14} {'':>10}  {lp.why}")
            continue
        o = lp.best or max(lp.options, key=lambda o: o.cluster_tok_s)
        note = ("recommended; " if lp is rec else "") + (f"all-reduce {o.algorithm}" if o.algorithm else "")
        if lp.best is None:
            note = f"{lp.why} (largest batch shown)"
        if lp.idle:
            note += f"; {lp.idle} GPUs idle"
        lines.append(
            cells + f"{lp.options[0].step_ms:>7.2f} {o.batch:>6} {o.step_ms:>8.2f} {o.ttft_ms:>8.1f} "
            f"{o.replica_tok_s:>11.0f} {o.cluster_tok_s:>14.0f} {o.frontends:>10}  {note}"
        )
    lines.append("")
    if rec is None:
        lines.append("no layout meets the targets: relax them, or add GPUs")
    else:
        b = rec.best
        lines.append(
            f"recommended: tp {rec.tp} x pp {rec.pp} x {rec.replicas} replicas, "
            f"batch {b.batch} per replica: "
            f"{b.cluster_tok_s:,.0f} tokens/s in all, {b.step_ms:.1f} ms per token, TTFT {b.ttft_ms:.0f} ms, "
            f"{b.frontends} front-end processes"
        )
    return "\n".join(lines)


def to_json(plan: Plan) -> dict:
    rec = plan.recommended
    return {
        "model": {**asdict(plan.model), "params": plan.model.params},
        "gpus": plan.gpus,
        "gpu": plan.gpu,
        "dtype": plan.dtype,
        "workload": asdict(plan.workload),
        "figures": plan.figures,
        "layouts": [asdict(lp) for lp in plan.layouts],
        "recommended": None
        if rec is None
        else {"tp": rec.tp, "pp": rec.pp, "replicas": rec.replicas, **asdict(rec.best)},  # fmt: skip
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.planner", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="70B", help=f"{', '.join(SHAPES)}, a checkpoint directory or a config.json"
    )
    p.add_argument("--gpus", type=int, default=64, help="accelerators in the cluster")
    p.add_argument("--gpu", default="H100", help=f"{', '.join(GPU_KINDS)} (cpu: measure this host)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight dtype")
    p.add_argument("--prompt", type=int, default=Workload.prompt, help="prompt tokens")
    p.add_argument("--output", type=int, default=Workload.output, help="output tokens")
    p.add_argument("--ttft-ms", type=float, default=Workload.ttft_s * 1e3, help="time-to-first-token target")
    p.add_argument("--itl-ms", type=float, default=Workload.itl_s * 1e3, help="inter-token latency target")
    p.add_argument("--calibration", help="benchmarks/device.py --json output measured on this GPU kind")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("gpus", "prompt", "output"):
            if getattr(args, name) < 1:
                raise PlanError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.ttft_ms <= 0 or args.itl_ms <= 0:
            raise PlanError(
                f"latency targets must be positive, got --ttft-ms {args.ttft_ms} --itl-ms {args.itl_ms}"
            )
        shape = model_shape(args.model)
        work = Workload(args.prompt, args.output, args.ttft_ms / 1e3, args.itl_ms / 1e3)
        if args.gpu.lower() == "cpu":
            if args.calibration:
                raise PlanError("--calibration applies to GPU kinds; --gpu cpu measures this host")
            device = measure_host(shape=shape)
            device = dataclasses.replace(device, memory=device.memory / args.gpus)
            dtype = "float32" if args.dtype == "bf16" else args.dtype
        else:
            kind = gpu(args.gpu)
            eff, flops_eff = calibration(args.calibration, kind) if args.calibration else (None, None)
            device = gpu_device(
                kind, eff or BANDWIDTH_EFFICIENCY, flops_eff or FLOPS_EFFICIENCY, calibrated=eff is not None,
                flops_calibrated=flops_eff is not None,
            )  # fmt: skip
            dtype = args.dtype
        plan = make_plan(shape, args.gpus, device, dtype, work)
    except (RingleaderError, ValueError) as e:
        print(f"planner: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(plan), indent=2) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
