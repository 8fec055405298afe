"""The demo's summary line: records, dead letters and p99 publish latency of each interval, from the metrics."""

from __future__ import annotations

import re

import pytest

from bridge.devtools.demo import TOPIC, Summary, quantile
from bridge.metrics import Metrics


def test_quantile_interpolates_within_its_bucket_as_promql_does() -> None:
    buckets = [(0.01, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.01)
    assert quantile(buckets, 0.99) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert quantile([(0.01, 0.0), (float("inf"), 10.0)], 0.99) == 0.01  # in +Inf: the highest finite bound
    assert quantile([(0.01, 0.0), (float("inf"), 0.0)], 0.99) is None
    assert quantile([], 0.99) is None


def test_each_summary_covers_only_its_own_interval() -> None:
    metrics = Metrics()
    metrics.messages_published.labels(TOPIC).inc(10)
    summary = Summary(metrics.registry)
    metrics.messages_published.labels(TOPIC).inc(200)
    metrics.messages_published.labels("ime.contract.state").inc(1000)  # another topic: not counted
    metrics.dead_letters.labels("invalid_json").inc(2)
    metrics.dead_letters.labels("invalid_frame").inc(1)
    for _ in range(100):
        metrics.publish_latency.observe(0.003)
    first = summary.line()
    assert re.search(r"last \d+ s: 200 records \([\d,.]+/s, 210 in all\), dead letters 3 \(3 in all\)", first), first
    assert first.endswith("p99 latency 3.0 ms")  # 2 ms + 99 % of the bucket from 2 to 3 ms
    metrics.publish_latency.observe(0.2)
    second = summary.line()
    assert ": 0 records" in second
    assert "dead letters 0 (3 in all)" in second
    assert second.endswith("p99 latency 248.5 ms")  # the interval's one observation, in the bucket from 100 to 250 ms
    assert summary.line().endswith("p99 latency -")
