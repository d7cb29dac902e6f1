"""Compiled decoding (engine/compiled.py) against the eager paged path: flex attention over the
pool equals attention over gathered blocks; a compiled engine generates what an eager one does,
at batch sizes padded up to their bucket; once warmed up it compiles nothing more."""

import ctypes
import random

import pytest
import torch
from hf_models import write_hf_checkpoint

from engine.compiled import BUCKETS, _Bucket, bucket_for, resolve_decode_mode
from engine.config import ModelConfig
from engine.kv_cache import PagedKVCache, make_step
from engine.loader import Checkpoint, build_model
from engine.request import SamplingParams
from engine.scheduler import Engine

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled")
    # a sliding window shorter than the sequences, GQA, and two layers: every masking case
    write_hf_checkpoint("mistral", path, seed=5, sliding_window=7, num_hidden_layers=2)
    return build_model(ModelConfig.from_hf(path), Checkpoint(path), torch.device("cpu"), None, 64)


def test_buckets_and_modes():
    assert [bucket_for(n) for n in (1, 3, 5, 17, 256, 257, 300)] == [1, 4, 8, 24, 256, 320, 320]
    assert all(bucket_for(b) == b for b in BUCKETS)
    assert resolve_decode_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_decode_mode("auto", torch.device("cuda")) == "compiled"
    assert resolve_decode_mode("eager", torch.device("cuda")) == "eager"
    with pytest.raises(ValueError, match="decode mode must be one of auto, compiled, eager, got 'fast'"):
        resolve_decode_mode("fast", torch.device("cpu"))


@torch.inference_mode()
def test_flex_attention_over_the_pool_equals_gathered_attention(model):
    """One attention through the block masks: each row sees exactly its own positions (causal
    and windowed) in blocks scattered through the pool, and padding rows disturb nothing."""
    cfg = model.config
    rng = random.Random(0)
    pool = PagedKVCache(model.layer_ids, 40, BLOCK, model.kv_heads, cfg.head_dim, torch.float32)
    for t in (*pool.k.values(), *pool.v.values()):
        t.normal_()  # every slot holds something, so a slot seen by mistake changes the result
    order = list(range(1, pool.num_blocks))
    rng.shuffle(order)
    starts = [0, 5, 11, 30]  # the position each row's new token goes to
    tables = [order[i * 8 : i * 8 + s // BLOCK + 1] for i, s in enumerate(starts)]
    B, H, KV, D = len(starts), model.model.layers["0"].self_attn.n_heads, model.kv_heads, cfg.head_dim
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, KV, 1, D), torch.randn(B, KV, 1, D)
    tokens = torch.zeros(B, 1, dtype=torch.long)
    windows = set(cfg.sliding_windows)
    eager = make_step(tokens, starts, list(range(B)), windows, None, tables, BLOCK)
    bucket = _Bucket(8, 16, pool.num_blocks, BLOCK, windows, torch.device("cpu"))  # 4 rows of padding
    bucket.load([0] * B, starts, tables, BLOCK)
    bucket.index_blocks()
    attend = torch.compile(pool.attend, fullgraph=True)  # flex attention's kernels exist compiled only
    for window in windows:
        saved = {name: t.clone() for name, t in (("k", pool.k[0]), ("v", pool.v[0]))}
        ref = pool.attend(0, q, k, v, eager, window)
        pool.k[0].copy_(saved["k"])
        pool.v[0].copy_(saved["v"])
        flex = make_step(tokens, starts, list(range(B)), windows, None, tables, BLOCK)
        flex.slots, flex.block_masks = bucket.slots, bucket.masks
        pad = torch.zeros(8 - B, *q.shape[1:])
        got = attend(0, torch.cat((q, pad)), torch.cat((k, pad[:, :KV])), torch.cat((v, pad[:, :KV])),
                          flex, window)  # fmt: skip
        assert torch.allclose(got[:B], ref, atol=1e-5, rtol=0), window


def run(engine: Engine, prompts, params, arrivals) -> dict[str, list[int]]:
    """Requests join at the steps ``arrivals`` names, so that the batch size changes as they run."""
    out: dict[str, list[int]] = {}
    step = 0
    while len(out) < len(prompts) or engine.has_work():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(str(i), prompts[i], params)
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    return out


@torch.inference_mode()
def test_compiled_engine_generates_what_the_eager_one_does(model):
    counters = torch._dynamo.utils.counters
    rng = random.Random(1)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (9, 14, 1)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    arrivals = [0, 2, 5]  # decode batches of 1, 2 and 3 rows: buckets 1, 2 and 4
    eager = Engine.for_model(model, 40, BLOCK, max_running=3)
    compiled = Engine.for_model(model, 40, BLOCK, decode_mode="compiled", max_running=3)
    assert compiled.warm_up() == [1, 2, 4]
    graphs = counters["stats"]["unique_graphs"]
    want = run(eager, prompts, params, arrivals)
    assert run(compiled, prompts, params, arrivals) == want
    steps = compiled.executor.compiled.steps
    assert set(steps) == {1, 2, 4} and sum(steps.values()) >= 12  # the decodes ran compiled
    assert counters["stats"]["unique_graphs"] == graphs  # every step found its graph compiled
    assert eager.allocator.num_free == compiled.allocator.num_free == 39
    # the same requests again start from their cached prompts, and decode compiled the same
    hits = compiled.stats().prefix_cache_hits
    assert run(compiled, prompts, params, arrivals) == want
    assert compiled.stats().prefix_cache_hits - hits == sum((len(p) - 1) // BLOCK * BLOCK for p in prompts)
    assert compiled.allocator.num_free == 39


def test_compiled_decoding_needs_a_whole_model(model):
    from comm.collectives import TPGroup
    from engine.compiled import CompiledDecode

    cache = PagedKVCache(model.layer_ids, 8, BLOCK, model.kv_heads, model.config.head_dim, torch.float32)
    stage = type("Stage", (), {"tp": TPGroup(), "model": type("D", (), {"embed_tokens": None})()})()
    with pytest.raises(ValueError, match="tp = pp = 1"):
        CompiledDecode(stage, cache, 64, torch.device("cpu"))


@torch.inference_mode()
def test_compiled_int8_decoding_equals_eager_int8(tmp_path):
    write_hf_checkpoint("llama", tmp_path, seed=6, num_hidden_layers=2)
    cfg = ModelConfig.from_hf(tmp_path)
    model = build_model(cfg, Checkpoint(tmp_path), torch.device("cpu"), None, 64, quantize="int8")
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    eager = Engine.for_model(model, 16, 16, max_running=2)
    compiled = Engine.for_model(model, 16, 16, decode_mode="compiled", max_running=2)
    assert run(compiled, prompts, params, [0, 0]) == run(eager, prompts, params, [0, 0])
    assert compiled.executor.compiled.steps[2] >= 9


@torch.inference_mode()
def test_compiled_decoders_of_two_models_of_one_shape_in_one_process_each_run_their_own(tmp_path):
    """A compiled CPU decoder checks no guard on its model's modules (engine/compiled.py), so a
    second decoder over another model of the same shapes must not run the first one's graphs:
    here the models differ in a constant the graphs hold (the norms' epsilon) and in the kind of
    their layers (int8), and each compiled engine must generate what its own eager one does."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    outputs = []
    for name, eps, quantize in (("a", 1e-6, None), ("b", 0.5, None), ("c", 0.5, "int8")):
        write_hf_checkpoint("llama", tmp_path / name, seed=7, num_hidden_layers=2, rms_norm_eps=eps)
        cfg = ModelConfig.from_hf(tmp_path / name)
        model = build_model(
            cfg, Checkpoint(tmp_path / name), torch.device("cpu"), None, 64, quantize=quantize
        )
        eager = run(Engine.for_model(model, 16, 16, max_running=2), prompts, params, [0, 0])
        compiled = Engine.for_model(model, 16, 16, decode_mode="compiled", max_running=2)
        assert run(compiled, prompts, params, [0, 0]) == eager, name
        outputs.append(eager)
    assert outputs[0] != outputs[1]  # the epsilon changes what the model generates


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def _mapped_bytes() -> int:
    """Bytes glibc's malloc holds in chunks of their own mmap (``mallinfo2().hblkhd``)."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Mallinfo2
    return mallinfo2().hblkhd


def test_flex_attention_scratch_buffers_come_from_the_heap():
    """Once raised for buffers of ``nbytes``, glibc serves an allocation of that size from its heap
    (no mmap of its own, so no munmap and TLB flush when it is freed); a larger one is still
    mapped, which shows the measurement sees mappings. Past what a C int holds, nothing is set."""
    import engine.compiled as compiled

    nbytes = max(64 << 20, compiled._HEAP_COVERS)
    assert compiled.keep_scratch_in_the_heap(nbytes)
    before = _mapped_bytes()
    within = torch.empty(nbytes, dtype=torch.uint8)  # as the kernel's buffers: allocated, untouched
    assert _mapped_bytes() - before < nbytes
    beyond = torch.empty(4 * nbytes, dtype=torch.uint8)
    assert _mapped_bytes() - before >= 4 * nbytes
    del within, beyond
    # mallopt takes a C int: buffers whose threshold would not fit one are left to glibc
    assert not compiled.keep_scratch_in_the_heap(1 << 30)
