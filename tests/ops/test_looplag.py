"""The event-loop lag monitor: one measuring task per loop, its histogram on /metrics."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Histogram

from comfyhub import looplag
from ops.metrics import exposition


def test_a_loop_is_watched_once_and_every_wake_up_is_observed():
    histogram = Histogram("lag_seconds", "test", buckets=looplag.BUCKETS, registry=CollectorRegistry())

    def count():
        return {s.name: s.value for s in histogram.collect()[0].samples}["lag_seconds_count"]

    async def main():
        first = looplag.watch(histogram=histogram)
        assert looplag.watch(histogram=histogram) is first
        while count() < 3:
            await asyncio.sleep(0.01)
        first.cancel()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert count() >= 3


@pytest.mark.django_db
def test_the_lag_histogram_is_on_the_metrics_page():
    text = exposition().decode()
    assert "# TYPE comfyhub_event_loop_lag_seconds histogram" in text
    assert 'comfyhub_event_loop_lag_seconds_bucket{le="0.1"}' in text
