"""The all-reduce cost model: its fit recovers the links that made the times, and auto's choice."""

import dataclasses
import json

import pytest

from comm import cost

SIZES = [8 << (2 * i) for i in range(12)] + [64 << 20]  # the benchmark's sizes


def samples_from(link: cost.Link, topology: str, n: int = 4, scale=lambda size: 1.0):
    """What the benchmark would measure if ``link`` were the truth (times times ``scale``)."""
    out = []
    for size in SIZES:
        a, b = cost.coefficients(topology, n, per_node=2)
        out.append((a, b, cost.predict(topology, n, size, link, per_node=2) * scale(size), size))
    return out


@pytest.mark.parametrize("topology", ["native", "star", "ring", "hier-scatter"])
def test_fit_recovers_the_link(topology):
    truth = cost.Link(alpha=3e-4, beta=4e-10)
    got = cost.fit(samples_from(truth, topology))
    assert got.at(8)[0] == pytest.approx(truth.alpha, rel=1e-3)
    assert len(got.regimes) == 1  # small messages only: one line fits the large ones
    assert got.alpha == pytest.approx(truth.alpha, rel=1e-3)
    assert got.beta == pytest.approx(truth.beta, rel=1e-3)


def test_fit_separates_small_and_large_message_latency():
    # a backend that switches to a costlier protocol for large messages
    truth = cost.Link(alpha=2e-3, beta=6e-10, regimes=((64 << 10, 5e-4, 6e-10),))
    samples = samples_from(truth, "star")
    got = cost.fit(samples)
    assert got.at(8)[0] == pytest.approx(5e-4, rel=1e-3)
    assert got.alpha == pytest.approx(2e-3, rel=1e-3)
    assert got.beta == pytest.approx(6e-10, rel=1e-3)
    assert max(cost.relative_errors(got, samples)) < 1e-3
    assert cost.predict("star", 4, 8, got) == pytest.approx(6 * 5e-4, rel=1e-3)


def test_fit_holds_the_worst_error_down():
    truth = cost.Link(alpha=2e-4, beta=6e-10)
    wobble = {size: 1 + 0.1 * (-1) ** i for i, size in enumerate(SIZES)}  # +-10% alternating
    samples = samples_from(truth, "ring", scale=wobble.__getitem__)
    got = cost.fit(samples)
    assert max(cost.relative_errors(got, samples)) <= 0.1 + 1e-6  # the truth itself misses by 10%
    assert got.beta == pytest.approx(truth.beta, rel=0.15)
    assert len(got.regimes) == 1  # noise of 10% is no change of protocol


def test_fit_finds_a_cheaper_regime_below_a_size():
    # as gloo over TCP: messages under 2 MiB go at a quarter of the cost per byte of larger ones
    eager = (2 << 20, 1e-4, 1e-10)
    truth = cost.Link(alpha=5e-4, beta=4e-10, regimes=((64 << 10, 1.5e-4, 1e-10), eager))
    samples = samples_from(truth, "star")
    one_line = cost._line([s for s in samples if s[3] >= 64 << 10])[2]
    assert one_line > 0.3  # a single line cannot follow it
    got = cost.fit(samples)
    assert [r[0] for r in got.regimes] == [64 << 10, 2 << 20]
    assert got.regimes[1] == pytest.approx(eager, rel=1e-3)
    assert (got.alpha, got.beta) == pytest.approx((5e-4, 4e-10), rel=1e-3)
    assert max(cost.relative_errors(got, samples)) < 1e-3


def test_a_fit_file_round_trips_and_a_bad_one_is_named(tmp_path):
    link = cost.Link(
        5e-4, 4e-10, pipelined=False, regimes=((64 << 10, 1.5e-4, 1e-10), (2 << 20, 1e-4, 1e-10))
    )
    path = tmp_path / "fitted.json"
    path.write_text(json.dumps({"links": {"star": dataclasses.asdict(link)}, "ranks": 4}))
    assert cost.load(path).links["star"] == link
    path.write_text(json.dumps({"links": {"star": {"alpha": 1e-4, "small_alpha": 1e-4}}}))
    with pytest.raises(ValueError, match=r"fitted.json: not a fit .*'beta'.*rerun benchmarks/collectives.py"):
        cost.load(path)


def test_fit_names_what_it_lacks():
    with pytest.raises(ValueError, match="at most 1024 bytes"):
        cost.fit([(6.0, 6.0, 1e-3, 1 << 20)])
    with pytest.raises(ValueError, match="two sizes of at least 65536 bytes"):
        cost.fit([(6.0, 6.0, 1e-3, 8), (6.0, 6.0, 1e-2, 1 << 20)])


def fitted(**links):
    return cost.Fitted({name: cost.Link(*ab) for name, ab in links.items()}, "test")


def test_auto_picks_the_lowest_prediction():
    # native: 4 ms a call, 1 ns/B; star 6 x 0.1 ms and 6 x 1 ns/B; ring 6 x 0.5 ms and 1.5 x 0.4 ns/B
    f = fitted(native=(4e-3, 1e-9), star=(1e-4, 1e-9), ring=(5e-4, 4e-10))
    assert cost.choose(8, 4, 2, f) == "star"  # 0.6 ms against 4 ms
    assert cost.choose(64 << 20, 4, 2, f) == "ring"  # 43 ms against 71 ms (native) and 403 ms
    # a gain within the margin is not worth leaving the backend's own for
    close = fitted(native=(1e-3, 1e-9), star=(0.9e-3 / 6, 1e-9 / 6))
    assert cost.choose(1 << 20, 4, 2, close) == "native"


def test_auto_keeps_the_simpler_algorithm_in_a_near_tie():
    # star 6 x 100 us = 600 us at 8 B; tree (4 ranks: 2 x depth 2 + 1 piece = 5 latencies)
    star = (1e-4, 0.0)
    near = fitted(native=(1.0, 0.0), star=star, tree=(0.97 * 6e-4 / 5, 0.0))  # tree 3% faster
    assert cost.choose(8, 4, 2, near) == "star"
    clear = fitted(native=(1.0, 0.0), star=star, tree=(0.9 * 6e-4 / 5, 0.0))  # tree 10% faster
    assert cost.choose(8, 4, 2, clear) == "tree"


def test_auto_without_a_fit_is_native():
    cost.use(None)
    try:
        assert cost.choose(1 << 20, 4, 2) == "native"
    finally:
        cost.use(cost.load())
