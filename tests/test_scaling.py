"""The signals an autoscaler reads: the request rate over about a minute, from the scrapes'
samples of the accepted-requests counter."""

import server.metrics as metrics
from server.metrics import RequestRate


def test_the_request_rate_is_taken_over_about_the_last_window(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    rate = RequestRate(window_s=60)
    now[0] += 10
    assert rate.update(50) == 5.0  # the first scrape: since the start
    now[0] += 50
    assert rate.update(110) == 110 / 60
    now[0] += 30  # 90 s after the start: the window now starts at the sample of 10 s
    assert rate.update(140) == (140 - 50) / 80
    now[0] += 120  # a quiet two minutes: no requests, and the old samples no longer count
    assert rate.update(140) == 0.0
    now[0] += 60
    assert rate.update(200) == 60 / 60
