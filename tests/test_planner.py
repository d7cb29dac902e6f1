"""The deployment planner: memory arithmetic against hand-computed cases, feasibility, its errors,
and that its CPU predictions are the ones benchmarks/plan_check.py checks against measurements."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from comm.cost import Fitted, Link
from engine import planner
from topologies.gpus import GPUS, gpu

ROOT = Path(__file__).resolve().parent.parent
SEVENTY = planner.SHAPES["70B"]
USABLE_H100 = 80e9 * 0.9


def h100() -> planner.Device:
    return planner.gpu_device(GPUS["H100"], 0.7, 0.5, calibrated=False)


def test_70b_shape_has_llama_3_1_70b_parameter_count():
    # per layer: q and o 8192 x 8192 each, k and v 8192 x 1024 each, three 8192 x 28672 MLP matrices,
    # two norms; embedding and head 128256 x 8192 each, the final norm
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert per_layer == 855_654_400
    assert SEVENTY.params == 80 * per_layer + 2 * 128256 * 8192 + 8192 == 70_553_706_496


def test_70b_bf16_tp8_memory_by_hand():
    # per rank and layer: q, o 8192 x 1024; k, v 8192 x 128 (one of 8 kv heads); MLP 3 x 8192 x 3584
    proj = 8192 * 1024 * 2 + 8192 * 128 * 2 + 3 * 8192 * 3584
    assert proj == 106_954_752
    layer = proj * 2 + 2 * 8192 * 2  # bf16, and the two norms
    table = 16032 * 8192 * 2  # 128256 / 8 rows of the embedding, and as many of the head
    weights = 80 * layer + 2 * table + 8192 * 2
    assert weights == 17_640_734_720
    kv_per_token = 2 * 80 * 1 * 128 * 2  # k and v, 80 layers, 1 kv head per rank, bf16
    tokens = int((USABLE_H100 - weights) // kv_per_token)
    assert tokens == 1_327_130
    mem = planner.memory(SEVENTY, 8, 1, "bf16", h100(), 1024 + 256)
    assert (mem.weights_per_rank, mem.kv_tokens, mem.sequences) == (weights, tokens, tokens // 1280)


def test_70b_int8_tp8_memory_by_hand():
    proj = 106_954_752  # int8: a byte each, plus one bf16 scale per output channel
    channels = 1024 + 2 * 128 + 8192 + 2 * 3584 + 8192
    layer = proj + channels * 2 + 2 * 8192 * 2
    weights = 80 * layer + 16032 * 8192 * 2 + (16032 * 8192 + 16032 * 2) + 8192 * 2  # bf16 embedding
    assert weights == 8_957_025_600
    assert planner.memory(SEVENTY, 8, 1, "int8", h100(), 1280).weights_per_rank == weights


def test_70b_tp4_pp2_the_fuller_stage_decides():
    # tp 4: q, o 8192 x 2048, k, v 8192 x 256 (2 kv heads), MLP 3 x 8192 x 7168; 40 layers a stage
    layer = (2 * 8192 * 2048 + 2 * 8192 * 256 + 3 * 8192 * 7168) * 2 + 2 * 8192 * 2
    table = 32064 * 8192 * 2
    first, last = 40 * layer + table, 40 * layer + table + 8192 * 2
    kv_per_token = 2 * 40 * 2 * 128 * 2
    mem = planner.memory(SEVENTY, 4, 2, "bf16", h100(), 1280)
    assert mem.weights_per_rank == last == 17_639_424_000 and first < last
    assert mem.kv_tokens == int((USABLE_H100 - last) // kv_per_token) == 1_327_162


def test_kv_heads_are_replicated_past_the_kv_head_count():
    assert planner.kv_heads_per_rank(SEVENTY, 4) == 2
    assert planner.kv_heads_per_rank(SEVENTY, 16) == 1
    a = planner.stages(SEVENTY, 8, 1, "bf16")[0]
    b = planner.stages(SEVENTY, 16, 1, "bf16")[0]
    assert a.kv_token_bytes == b.kv_token_bytes == 2 * 80 * 128 * 2


def test_a_layout_that_does_not_fit_is_never_recommended():
    work = planner.Workload(1024, 256, 2.0, 0.05)
    for name, gpus, kind in (
        ("70B", 8, "H100"),
        ("405B", 16, "H100"),
        ("405B", 64, "A100"),
        ("405B", 8, "H200"),
    ):
        device = planner.gpu_device(gpu(kind), 0.7, 0.5, calibrated=False)
        plan = planner.make_plan(planner.SHAPES[name], gpus, device, "bf16", work)
        assert any(not lp.feasible for lp in plan.layouts)
        for lp in plan.layouts:
            if not lp.feasible:
                assert lp.options == [] and lp.best is None
        rec = plan.recommended
        assert rec is None or rec.feasible
        if rec is not None:
            st = planner.stages(planner.SHAPES[name], rec.tp, rec.pp, "bf16")
            need = max(s.weight_bytes + rec.best.batch * 1280 * s.kv_token_bytes for s in st)
            assert need <= device.memory and rec.best.meets
            assert rec.best.step_ms <= 50 and rec.best.ttft_ms <= 2000


def test_no_room_for_one_sequence_is_infeasible_and_targets_can_rule_out_every_layout():
    st = planner.stages(SEVENTY, 8, 1, "bf16")[0]
    tight = dataclasses.replace(h100(), memory=st.weight_bytes + 1279 * st.kv_token_bytes)
    plan = planner.make_plan(SEVENTY, 8, tight, "bf16", planner.Workload(1024, 256))
    lp = next(lp for lp in plan.layouts if (lp.tp, lp.pp) == (8, 1))
    assert lp.kv_tokens == 1279 and not lp.feasible and plan.recommended is not lp
    impossible = planner.make_plan(SEVENTY, 64, h100(), "bf16", planner.Workload(1024, 256, 2.0, 1e-4))
    assert impossible.recommended is None
    assert "no layout meets the targets" in planner.render(impossible)


def test_more_gpus_never_lower_the_best_cluster_throughput():
    work = planner.Workload(1024, 256, 2.0, 0.05)
    best = [
        planner.make_plan(SEVENTY, n, h100(), "bf16", work).recommended.best.cluster_tok_s for n in (64, 256)
    ]
    assert best[1] >= 3.9 * best[0]


def test_a_pipeline_with_one_micro_batch_pays_its_bubbles():
    device = h100()
    one = planner.decode_step(SEVENTY, 8, 2, "bf16", device, 256, 1152, micro_batches=1)
    two = planner.decode_step(SEVENTY, 8, 2, "bf16", device, 256, 1152, micro_batches=2)
    single = planner.decode_step(SEVENTY, 8, 1, "bf16", device, 256, 1152)
    assert two.seconds < one.seconds
    assert one.seconds > single.seconds  # both stages in turn, plus the hand-offs
    assert one.handoff > 0 and single.handoff > 0 and one.allreduce > 0


def test_every_spec_figure_names_its_source():
    for kind in GPUS.values():
        assert set(kind.sources) == {"memory", "bandwidth", "flops", "nvlink", "network"}
        assert all("datasheet" in s for s in kind.sources.values())
    with pytest.raises(ValueError, match="unknown GPU 'V100'"):
        gpu("V100")


def fake_host() -> planner.Device:
    fitted = Fitted({n: Link(1e-4, 1e-9) for n in ("native", "star", "tree", "ring")}, "test")
    return planner.Device("cpu", 8e9, 20e9, ((1, 10e9), (16, 30e9), (256, 80e9)), planner.Host(fitted),
                          act_bytes=4, cores=2, layer_s=3e-4, pass_s=3e-4)  # fmt: skip


def demo_config(tmp_path: Path) -> Path:
    from engine.demo import PRESETS

    raw = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True, **PRESETS["demo"]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def load_plan_check():
    spec = importlib.util.spec_from_file_location("plan_check", ROOT / "benchmarks" / "plan_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_predictions_come_from_the_code_path_the_benchmark_checks(tmp_path, monkeypatch):
    check = load_plan_check()
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.tied) == (8, 384, 8, 4, True)
    host = fake_host()
    for tp, pp in check.LAYOUTS:
        for batch in (1, 16, 64):
            micro = max(1, min(pp, batch // 32))
            got = check.predictions(shape, host, tp, pp, batch, micro)
            assert got == planner.decode_step(shape, tp, pp, "float32", host, batch, check.CONTEXT, micro)
    # the planner's own plan for this host uses the same function at the workload's context
    work = planner.Workload(check.PROMPT, check.LONG, 10.0, 10.0)
    plan = planner.make_plan(shape, 4, host, "float32", work)
    lp = next(lp for lp in plan.layouts if (lp.tp, lp.pp) == (2, 2))
    for o in lp.options:
        step = planner.decode_step(shape, 2, 2, "float32", host, o.batch, work.context)
        assert o.step_ms == step.seconds * 1e3
    calls = []
    monkeypatch.setattr(planner, "decode_step", lambda *a, **k: calls.append(a) or "sentinel")
    assert check.predictions(shape, host, 2, 2, 64, 2) == "sentinel" and calls[0][4] is host


def test_a_tp_layout_measured_beside_its_steps_is_predicted_with_that_measurement(tmp_path):
    """plan_check replaces the host's in-step all-reduce of tp ranks alone by the mean of the
    measurements taken in the layout's own group, and keeps every other case."""
    check = load_plan_check()
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    calibrated = (
        planner.InStep(2, 2, 1e-3, 0.0),
        planner.InStep(2, 4, 5e-3, 0.0),
        planner.InStep(4, 4, 2e-3, 0.0),
    )
    host = dataclasses.replace(fake_host(), network=planner.Host(fake_host().network.fitted, calibrated))
    r0, r1 = planner.CALIBRATION_ROWS
    b0, b1 = (r * shape.hidden * 4 for r in planner.CALIBRATION_ROWS)
    measured = [
        {"n": 2, "procs": 2, "rows": [[r0, 3e-4], [r1, 3e-4 + (b1 - b0) * 2e-9]], "back_to_back": [1e-4]},
        {"n": 2, "procs": 2, "rows": [[r0, 5e-4], [r1, 5e-4]], "back_to_back": [1e-4]},
    ]
    fits = [planner.in_step_fit(m, shape) for m in measured]
    assert fits[0].beta == pytest.approx(2e-9) and fits[1].beta == 0 and fits[1].alpha == pytest.approx(5e-4)
    used = check.with_in_step(host, 2, fits)
    cases = {(c.n, c.procs): c for c in used.network.in_step}
    assert cases[(2, 4)] == calibrated[1] and cases[(4, 4)] == calibrated[2]
    assert cases[(2, 2)].alpha == pytest.approx((fits[0].alpha + fits[1].alpha) / 2)
    assert cases[(2, 2)].beta == pytest.approx(1e-9)
    one = planner.decode_step(shape, 2, 1, "float32", used, 1, check.CONTEXT, 1)
    before = planner.decode_step(shape, 2, 1, "float32", host, 1, check.CONTEXT, 1)
    # two all-reduces a layer and the embedding's, each now costing the measured mean, not 1 ms
    each = cases[(2, 2)].at(shape.hidden * 4)
    assert one.allreduce == pytest.approx((2 * shape.layers + 1) * each)
    assert before.allreduce == pytest.approx((2 * shape.layers + 1) * 1e-3)
    assert planner.decode_step(shape, 2, 2, "float32", used, 1, check.CONTEXT, 1) == planner.decode_step(
        shape, 2, 2, "float32", host, 1, check.CONTEXT, 1
    )


def test_tensor_parallel_cpu_steps_pay_the_algorithm_auto_would_pick(tmp_path):
    from comm.cost import choose

    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    host = fake_host()
    step = planner.decode_step(shape, 2, 1, "float32", host, 16, 40)
    assert step.algorithm == choose(16 * 384 * 4, 2, 2, host.network.fitted)
    assert step.allreduce == pytest.approx((2 * 8 + 1) * host.network.allreduce(16 * 384 * 4, 2)[0])


def test_measure_host_measures_this_machine():
    device = planner.measure_host(repeats=1)
    assert device.bandwidth > 1e8 and all(f > 1e7 for _, f in device.flops)
    assert [r for r, _ in device.flops] == [1, 4, 16, 64, 256]
    assert device.layer_s + device.pass_s > 0 and device.cores >= 1
    if device.cores > 1:  # a rank's bandwidth with as many ranks as cores reading at once
        ((k, bw),) = device.shared_bandwidth
        assert k == min(device.cores, 8) and 1e8 < bw and "shared bandwidth" in device.figures
    assert device.layer_row_s >= 0 and device.pass_row_s >= 0 and device.waiting_weight >= 0
    # the hidden-size-64 model's shards of tp 2 and 4 measured too, every figure non-negative
    assert [h[0] for h in device.shard_host] == [2, 4] and all(min(h) >= 0 for h in device.shard_host)
    assert all(v.startswith(("measured", "fitted")) or k == "cores" for k, v in device.figures.items())
    # the all-reduces of a step, measured on this host: 2 and 4 ranks alone, 2 with 2 waiting
    host = device.network
    assert isinstance(host, planner.Host)
    assert sorted((c.n, c.procs) for c in host.in_step) == [(2, 2), (2, 4), (4, 4)]
    for c in host.in_step:
        assert c.at(384 * 4) > 0 and c.beta >= 0 and len(c.back_to_back) == 2
        assert all(b > 0 for b in c.back_to_back)
        assert host.allreduce(384 * 4, c.n, c.procs)[0] == c.at(384 * 4)
    assert "all-reduce in a step" in device.figures and "waiting ranks" in device.figures
    # and a message to a rank waiting in a receive
    assert host.in_step_message is not None and host.in_step_message.at(384 * 4) > 0
    assert host.woken(384 * 4) == host.in_step_message.at(384 * 4)
    assert device.figures["message in a step"].startswith("measured: ")


def in_step_host(waiting_weight: float = 0.0) -> planner.Device:
    fitted = fake_host().network.fitted
    cases = (
        planner.InStep(2, 2, 6e-4, 1e-9),
        planner.InStep(2, 4, 9e-4, 1e-9),
        planner.InStep(4, 4, 1.2e-3, 2e-9),
    )
    return dataclasses.replace(
        fake_host(), network=planner.Host(fitted, cases), waiting_weight=waiting_weight
    )


def test_cpu_all_reduces_cost_what_was_measured_inside_a_step_not_the_back_to_back_fit(tmp_path):
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    old, new = fake_host(), in_step_host()
    nbytes = 16 * 384 * 4
    for tp, pp, each in (
        (2, 1, 6e-4 + nbytes * 1e-9),
        (4, 1, 1.2e-3 + nbytes * 2e-9),
        (2, 2, 9e-4 + nbytes * 1e-9),
    ):
        step = planner.decode_step(shape, tp, pp, "float32", new, 16, 40, 1)
        # each stage: 2 per layer, and the first stage one more for the embedding
        assert step.allreduce == pytest.approx((2 * 8 + 1) * each), (tp, pp)
        assert step.allreduce / (2 * 8 + 1) != pytest.approx(old.network.allreduce(nbytes, tp)[0])
        # the algorithm is still the one auto picks by the fit; only its cost is measured
        assert step.algorithm == planner.decode_step(shape, tp, pp, "float32", old, 16, 40, 1).algorithm
    # a group size with no measurement falls back to the fit
    assert new.network.allreduce(nbytes, 8, 8) == old.network.allreduce(nbytes, 8)
    # the nearest number of ranks on the host: 2 of 8 is nearer the 4-rank measurement
    assert new.network.allreduce(nbytes, 2, 8)[0] == pytest.approx(9e-4 + nbytes * 1e-9)


def test_waiting_ranks_take_core_time_only_while_their_stage_has_no_micro_batch(tmp_path):
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    quiet, busy = in_step_host(0.0), in_step_host(0.5)
    one = [planner.decode_step(shape, 2, 2, "float32", d, 16, 40, 1) for d in (quiet, busy)]
    # 2 busy ranks and 2 waiting at half weight on 2 cores: compute and dispatch slow by 1.5
    assert one[1].compute == pytest.approx(1.5 * one[0].compute)
    assert one[1].dispatch == pytest.approx(1.5 * one[0].dispatch)
    assert one[1].allreduce == one[0].allreduce
    two = [planner.decode_step(shape, 2, 2, "float32", d, 64, 40, 2) for d in (quiet, busy)]
    assert two[1].seconds == two[0].seconds  # both stages busy: nobody waits
    solo = [planner.decode_step(shape, 2, 1, "float32", d, 16, 40) for d in (quiet, busy)]
    assert solo[1].seconds == solo[0].seconds


def test_host_work_grows_with_the_rows(tmp_path):
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    base = fake_host()
    rowed = dataclasses.replace(base, layer_row_s=2e-6, pass_row_s=5e-6)
    for batch in (1, 16, 64):
        a = planner.decode_step(shape, 1, 1, "float32", base, batch, 40)
        b = planner.decode_step(shape, 1, 1, "float32", rowed, batch, 40)
        assert b.dispatch - a.dispatch == pytest.approx(batch * (8 * 2e-6 + 5e-6))
        assert b.seconds - a.seconds == pytest.approx(batch * (8 * 2e-6 + 5e-6))


def test_a_tp_rank_pays_the_host_work_of_its_shard(tmp_path):
    """Where the host work of a tp rank's shard was measured, a step of that tp (and of a larger
    one without its own figures) takes it instead of the whole model's."""
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    whole = dataclasses.replace(fake_host(), layer_s=4e-4, layer_row_s=2e-5, pass_s=1e-3, pass_row_s=3e-5)
    sharded = dataclasses.replace(whole, shard_host=((2, 1e-4, 5e-6, 5e-4, 1e-5),))
    for tp, figures in (
        (1, (4e-4, 2e-5, 1e-3, 3e-5)),
        (2, (1e-4, 5e-6, 5e-4, 1e-5)),
        (4, (1e-4, 5e-6, 5e-4, 1e-5)),
    ):
        assert sharded.host_work(tp) == figures
        a = planner.decode_step(shape, tp, 1, "float32", whole, 16, 40)
        b = planner.decode_step(shape, tp, 1, "float32", sharded, 16, 40)
        layer_s, layer_row_s, pass_s, pass_row_s = figures
        expected = (layer_s + 16 * layer_row_s) * 8 + pass_s + 16 * pass_row_s
        assert b.dispatch == pytest.approx(expected * max(1.0, tp / 2))  # 2 cores: tp 4 shares them
        assert (b.compute, b.allreduce) == (a.compute, a.allreduce)


def test_a_shard_is_a_tp_ranks_share_of_the_model():
    shape = planner.SHAPES["70B"]
    shard = planner.shard_shape(shape, 8)
    assert (shard.heads, shard.kv_heads, shard.intermediate, shard.vocab) == (8, 1, 3584, 16032)
    assert (shard.layers, shard.hidden, shard.head_dim) == (shape.layers, shape.hidden, shape.head_dim)
    assert planner.layer_params(shard, 1) == planner.layer_params(shape, 8)
    assert planner.shard_shape(shape, 3) is None  # 64 heads do not split over 3 ranks


def test_the_host_work_models_are_out_of_the_cache():
    """The smaller host-work model holds at least HOST_MODEL_BYTES of layer weights (up to 8
    layers), the larger three times its layers."""
    for name in ("70B", "8B"):
        assert planner.host_layers(planner.SHAPES[name]) == (1, 3)
    demo = planner.ModelShape("demo", 8, 384, 1536, 8, 4, 48, 4096)
    per_layer = planner.layer_params(demo, 1) * 4
    small, big = planner.host_layers(demo)
    assert (small, big) == (8, 24) and small * per_layer >= planner.HOST_MODEL_BYTES
    wide = planner.ModelShape("150m", 18, 768, 2816, 12, 4, 64, 4096)
    small, big = planner.host_layers(wide)
    per_layer = planner.layer_params(wide, 1) * 4
    assert big == 3 * small and (small - 1) * per_layer < planner.HOST_MODEL_BYTES <= small * per_layer


def test_host_work_is_split_between_layers_passes_and_rows(monkeypatch):
    """Decode steps that cost the bytes-and-flops terms plus known host work give that work back."""
    shape = planner.ModelShape("s", 4, 256, 512, 4, 2, 64, 512)
    bare = dataclasses.replace(fake_host(), layer_s=0.0, pass_s=0.0)
    layer, layer_row, step, step_row = 4e-4, 3e-6, 1.5e-3, 2e-5
    gens = []
    monkeypatch.setattr(planner, "_random_generator", lambda s: gens.append(s) or s)

    def fake_time(gen, rows, prompt, repeats):
        compute = planner.decode_step(gen, 1, 1, "float32", bare, rows, planner.HOST_CONTEXT).compute
        return compute + gen.layers * (layer + layer_row * rows) + step + step_row * rows

    monkeypatch.setattr(planner, "time_decode_step", fake_time)
    got = planner._host_work(bare, shape, 1)
    assert got == pytest.approx((layer, layer_row, step, step_row))
    assert [g.layers for g in gens] == list(planner.host_layers(shape)) == [8, 24]
    assert all((g.hidden, g.intermediate, g.vocab) == (256, 512, 512) for g in gens)


def test_calibration_fits_each_case_and_weighs_the_waiting_ranks(monkeypatch):
    import torch.multiprocessing as mp

    hidden = planner.TINY.hidden
    r0, r1 = planner.CALIBRATION_ROWS
    b0, b1 = (r * hidden * 4 for r in planner.CALIBRATION_ROWS)

    host = {2: (3e-4, 2e-6), 4: (2e-4, 1e-6)}  # a tp rank's host work per layer, which the loops do

    def fake_start(fn, args, nprocs, join, start_method):
        world, _, _, _, cases, path, work, op_seconds = args
        assert 0 < op_seconds < 1e-3
        assert world == nprocs and start_method == "spawn" and work == host
        out = []
        for n, procs in cases:
            t0, t1 = 1e-4 * n + 1e-4 * (procs - n), 1e-4 * n + 1e-4 * (procs - n) + (b1 - b0) * 1e-9
            matmul = 1e-3 if procs == 2 else 1.3e-3
            out.append({"n": n, "procs": procs, "rows": [[r0, t0], [r1, t1]], "back_to_back": [5e-5, 6e-5],
                        "matmul": matmul})  # fmt: skip
        if world == 2:  # a message to a waiting rank: 0.5 ms + 2 ns/byte
            rows = [[r0, 5e-4 + b0 * 2e-9], [r1, 5e-4 + b1 * 2e-9]]
            out.append({"n": 2, "procs": 2, "rows": rows, "back_to_back": [4e-5, 5e-5], "message": True})
        Path(path).write_text(json.dumps(out))

    monkeypatch.setattr(mp, "start_processes", fake_start)
    cases, weight, message = planner.calibrate_allreduce(fake_host().network.fitted, planner.TINY, 2, host)
    assert message.alpha == pytest.approx(5e-4) and message.beta == pytest.approx(2e-9)
    assert message.back_to_back == (4e-5, 5e-5)
    got = {(c.n, c.procs): c for c in cases}
    assert set(got) == {(2, 2), (4, 4), (2, 4)}
    assert got[(2, 2)].beta == pytest.approx(1e-9) and got[(2, 2)].at(b0) == pytest.approx(2e-4)
    assert got[(2, 4)].at(b0) == pytest.approx(4e-4) and got[(4, 4)].at(b1) == pytest.approx(
        4e-4 + (b1 - b0) * 1e-9
    )
    assert got[(2, 2)].back_to_back == (5e-5, 6e-5)
    # the matmul 1.3 times slower beside 2 waiting ranks on 2 cores: each takes 0.3 of a core
    assert weight == pytest.approx(0.3)


def test_the_calibration_loops_do_a_layers_host_work_beside_its_matmul():
    """What an all-reduce costs in a step grows with the work between two of them where ranks share
    cores, so the calibration's loops do half a layer's host work as small ops beside the matmul:
    as many as take that long on this thread."""
    import torch.distributed as dist

    from comm.collectives import TPGroup

    assert planner.small_ops_for(0.0) == 0
    ops = planner.small_ops_for(2e-3)
    assert ops > planner.small_ops_for(1e-3) > 0
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        tp = TPGroup(0, 1, None, (0,), "auto", 1)
        x, w, buf = torch.randn(1, 8), torch.randn(8, 8), torch.zeros(1, 8)
        bare = min(planner._loop(x, w, buf, tp, True, False) for _ in range(3))
        busy = min(planner._loop(x, w, buf, tp, True, False, ops) for _ in range(3))
    finally:
        dist.destroy_process_group()
    assert 0.5e-3 < busy - bare < 8e-3  # about the 2 ms asked for (this host's speed moves)


def test_the_first_message_of_each_hand_off_costs_a_message_to_a_waiting_rank(tmp_path):
    """A pipeline step's hand-offs (the activations to the next stage, the ids back to the head,
    the plan to every other rank) and a tp head's gather each reach a rank that waits in a
    receive: their first message costs the in-step figure, the rest the back-to-back link."""
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    message = planner.InStep(2, 2, 2e-3, 1e-9, (1e-4,))
    host = fake_host()
    woken = dataclasses.replace(host, network=planner.Host(host.network.fitted, (), message))
    net = woken.network
    plain = planner.decode_step(shape, 1, 2, "float32", host, 1, 16.0, 1)
    step = planner.decode_step(shape, 1, 2, "float32", woken, 1, 16.0, 1)
    hidden, ids, plan = shape.hidden * 4, planner.ID_BYTES, planner.PLAN_ROW_BYTES
    assert step.handoff == pytest.approx(
        message.at(hidden) + message.at(ids) + net.message(ids) + message.at(plan) + 2 * net.message(plan)
    )
    assert step.handoff - plain.handoff == pytest.approx(
        message.at(hidden) - net.message(hidden) + message.at(ids) - net.message(ids) + message.at(plan)
        - net.message(plan)
    )  # fmt: skip
    tp2 = planner.decode_step(shape, 2, 1, "float32", woken, 1, 16.0, 1)
    part = -(-shape.vocab // 2) * planner.LOGIT_BYTES
    assert tp2.gather == pytest.approx(message.at(part))
    # GPUs: a waiting rank costs nothing more than the message
    gpu = h100().network
    assert gpu.woken(hidden) == gpu.message(hidden)


def test_ranks_computing_at_once_share_the_hosts_bandwidth(tmp_path):
    """tp ranks read their shards at once, and on one host they share its memory: each reads at
    the measured shared figure; one process, or one pipeline stage at a time, at its own."""
    shape = planner.ModelShape.from_path(demo_config(tmp_path))
    host = dataclasses.replace(fake_host(), flops=((1, 1e12), (256, 1e13)))  # 20 GB/s alone, 2 cores
    shared = dataclasses.replace(host, shared_bandwidth=((2, 12e9),))
    assert shared.bandwidth_for(1) == 20e9 and shared.bandwidth_for(2) == shared.bandwidth_for(4) == 12e9
    one = planner.decode_step(shape, 1, 1, "float32", shared, 1, 16.0, 1)
    assert one == planner.decode_step(shape, 1, 1, "float32", host, 1, 16.0, 1)
    tp2 = planner.decode_step(shape, 2, 1, "float32", shared, 1, 16.0, 1)
    alone = planner.decode_step(shape, 2, 1, "float32", host, 1, 16.0, 1)
    assert tp2.compute == pytest.approx(alone.compute * 20 / 12)
    # a pipeline of one micro-batch runs one stage at a time
    pp2 = planner.decode_step(shape, 1, 2, "float32", shared, 1, 16.0, 1)
    assert pp2.compute == planner.decode_step(shape, 1, 2, "float32", host, 1, 16.0, 1).compute
    assert h100().bandwidth_for(8) == h100().bandwidth


def test_gpu_devices_have_none_of_the_cpu_host_terms():
    device = h100()
    assert (device.layer_row_s, device.pass_row_s, device.waiting_weight, device.cores) == (0, 0, 0, 0)
    assert device.shard_host == ()
    net = device.network
    assert net.allreduce(8192 * 2, 8, 64) == net.allreduce(8192 * 2, 8)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.planner", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip


def test_cli_prints_a_sourced_plan_and_json():
    text = run_cli("--model", "405B", "--gpus", "256", "--gpu", "H200")
    assert text.returncode == 0, text.stderr
    assert "H200 Tensor Core GPU datasheet" in text.stdout and "assumption" in text.stdout
    assert "no GPU run exists" in text.stdout and "recommended: tp" in text.stdout
    out = run_cli("--model", "70B", "--gpus", "64", "--gpu", "h100", "--dtype", "int8", "--json")
    plan = json.loads(out.stdout)
    rec = plan["recommended"]
    assert plan["dtype"] == "int8" and rec["meets"] and rec["tp"] * rec["pp"] * rec["replicas"] <= 64
    chosen = next(lp for lp in plan["layouts"] if (lp["tp"], lp["pp"]) == (rec["tp"], rec["pp"]))
    assert chosen["feasible"] and rec["cluster_tok_s"] == max(
        lp["best"]["cluster_tok_s"] for lp in plan["layouts"] if lp["best"]
    )


def test_cli_errors_name_the_bad_input(tmp_path):
    cases = [
        (("--gpu", "V100"), "unknown GPU 'V100'"),
        (("--model", str(tmp_path / "nowhere")), "nowhere: neither a named shape"),
        (("--model", str(tmp_path)), "config.json not found"),
        (("--gpus", "0"), "--gpus must be at least 1, got 0"),
        (("--itl-ms", "0"), "latency targets must be positive"),
        (("--calibration", str(tmp_path / "x.json")), "not a benchmarks/device.py --json file"),
    ]
    for args, message in cases:
        run = run_cli(*args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
    measured = tmp_path / "device.json"
    rows = [{"runtime": "engine bfloat16, compiled", "batch": 1, "gb_s": 3360.0, "tok_s": 1.0}]
    measured.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    run = run_cli("--gpu", "H100", "--calibration", str(measured))
    assert run.returncode == 2 and "measured on 'NVIDIA H200', not on an H100" in run.stderr
    run = run_cli("--gpu", "H200", "--calibration", str(measured), "--json")
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)["figures"]
    assert "calibrated: the fraction 0.70" in figures["bandwidth efficiency"]
    assert figures["flops efficiency"].startswith("assumption: 0.50")
    # a failed row is skipped; a bf16 prefill row calibrates the flops (396 of 989 TFLOP/s: 0.40)
    rows = [
        {"runtime": "engine bfloat16, compiled", "batch": 1, "gb_s": None, "error": "RuntimeError: x"},
        {"runtime": "engine bfloat16, eager", "batch": 1, "gb_s": 2400.0, "tok_s": 1.0},
        {"runtime": "engine bfloat16, compiled", "batch": 1, "gb_s": 3840.0, "tok_s": 1.0},
        {"runtime": "engine bfloat16, compiled, prefill", "batch": 1, "prompt_tokens": 2048, "tflops": 395.6},
        {"runtime": "engine int8, compiled, prefill", "batch": 1, "prompt_tokens": 2048, "tflops": 900.0},
    ]
    measured.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    bw, flops = planner.calibration(measured, GPUS["H200"])
    assert bw == pytest.approx(0.8) and flops == pytest.approx(395.6e12 / GPUS["H200"].flops)
    run = run_cli("--gpu", "H200", "--calibration", str(measured), "--json")
    figures = json.loads(run.stdout)["figures"]
    assert "calibrated: the fraction 0.80" in figures["bandwidth efficiency"]
    assert f"calibrated: the fraction {flops:.2f} of dense peak" in figures["flops efficiency"]


def test_the_host_work_models_read_real_weights():
    """Allocated but unwritten weights would all map to the zero page and be read for nothing, so
    the host-work measurement would take the weights' reading for free; the random models write
    theirs (normal, std 0.02), and the norms stay ones."""
    import torch

    shape = planner.ModelShape("s", 2, 64, 128, 4, 2, 16, 256)
    gen = planner._random_generator(shape)
    for name, p in gen.model.named_parameters():
        if p.dim() > 1:
            assert p.std().item() == pytest.approx(0.02, rel=0.2), name
        else:
            assert torch.equal(p, torch.ones_like(p)), name
