"""The garbage collector kept quiet: survivors of a full collection frozen, everything walked again now and then."""

import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry, Histogram

from comfyhub import collector, looplag


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Node:
    """One half of a reference cycle: only the cyclic collector can free it."""

    def __init__(self):
        self.other = None


def cycle():
    first, second = Node(), Node()
    first.other, second.other = second, first
    return first


@pytest.fixture
def quiet():
    histogram = Histogram("gc_pause_seconds", "test", ["generation"], buckets=looplag.BUCKETS,
                          registry=CollectorRegistry())
    clock = Clock()
    callback = collector.QuietCollector(600.0, histogram=histogram, clock=clock)
    gc.callbacks.append(callback)
    try:
        yield callback, clock, histogram
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()
        gc.collect()


def observed(histogram, generation):
    samples = {(s.name, s.labels.get("generation")): s.value for s in histogram.collect()[0].samples}
    return samples.get(("gc_pause_seconds_count", generation), 0.0)


def test_a_full_collection_freezes_its_survivors_and_measures_its_pause(quiet):
    _callback, _clock, histogram = quiet
    kept = cycle()
    gc.collect()
    assert gc.get_freeze_count() > 0
    assert observed(histogram, "2") == 1.0
    assert kept.other.other is kept


def test_a_frozen_cycle_that_became_garbage_is_freed_by_the_next_full_walk_not_before(quiet):
    _callback, clock, _histogram = quiet
    garbage = cycle()
    gc.collect()  # it is alive: frozen with the other survivors
    gone = weakref.ref(garbage)
    del garbage
    gc.collect()
    assert gone() is not None  # frozen: this collection did not walk it
    clock.now += 600.0
    gc.collect()  # due: everything is walked again
    assert gone() is None


def test_a_new_cycle_is_freed_at_once(quiet):
    gc.collect()
    young = cycle()
    gone = weakref.ref(young)
    del young
    gc.collect()
    assert gone() is None


def test_pauses_are_on_the_metrics_page(db):
    from ops.metrics import exposition

    assert "# TYPE comfyhub_gc_pause_seconds histogram" in exposition().decode()
