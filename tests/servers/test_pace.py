"""A server's pipeline deepens when its jobs are shorter than the hub's refill, within its limits."""

import time

from servers.models import Server
from servers.pace import Pace


def paced(job, refill, samples=20):
    pace = Pace()
    for _ in range(samples):
        pace.ended(time.time() - job, waiting=True)
        pace.ended_at -= refill  # the end message came `refill` seconds before the next POST was answered
        pace.refilled()
    return pace


def test_seconds_long_jobs_keep_the_set_depth():
    server = Server(pipeline_depth=2, max_in_flight=8)
    assert paced(job=4.0, refill=0.04).depth(server) == 2


def test_jobs_shorter_than_the_refill_get_a_deeper_pipeline_within_max_in_flight_less_one():
    server = Server(pipeline_depth=2, max_in_flight=8)
    assert paced(job=0.02, refill=0.05).depth(server) == 4  # 1 + ceil(0.05 / 0.02)
    assert paced(job=0.002, refill=0.05).depth(server) == 7  # one slot stays for a newcomer's first task
    assert paced(job=0.002, refill=0.05).depth(Server(pipeline_depth=2, max_in_flight=3)) == 2


def test_a_refill_that_waited_for_a_submission_is_not_counted():
    pace = Pace()
    pace.ended(time.time() - 0.002, waiting=False)  # nothing waited in the hub: the next POST waits for a user
    pace.refilled()
    assert pace.refill is None
    assert pace.depth(Server(pipeline_depth=2, max_in_flight=8)) == 2  # not known yet: the setting
