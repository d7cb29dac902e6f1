"""The all-reduce cost model: its fit recovers the links that made the times, and auto's choice."""

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
    assert got.small_alpha == pytest.approx(truth.alpha, rel=1e-3)
    assert got.alpha == pytest.approx(truth.alpha, rel=1e-3)
    assert got.beta == pytest.approx(truth.beta, rel=1e-3)


def test_fit_separates_small_and_large_message_latency():
    # a backend that switches to a costlier protocol for large messages
    truth = cost.Link(alpha=2e-3, beta=6e-10, small_alpha=5e-4, large_from=64 << 10)
    samples = samples_from(truth, "star")
    got = cost.fit(samples)
    assert got.small_alpha == pytest.approx(5e-4, rel=1e-3)
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


def test_auto_without_a_fit_is_native():
    cost.use(None)
    try:
        assert cost.choose(1 << 20, 4, 2) == "native"
    finally:
        cost.use(cost.load())
