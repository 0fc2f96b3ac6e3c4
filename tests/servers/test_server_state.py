"""A server's state as probes and links record it: one statement when it stays, a trail entry when it changes."""

import pytest

from servers.aio import jittered, phase
from servers.models import Server, ServerEvent, ServerState

pytestmark = pytest.mark.django_db


@pytest.fixture
def online():
    return Server.objects.create(name="gpu-a", base_url="http://127.0.0.1:9", state=ServerState.ONLINE)


def test_a_probe_that_finds_the_state_it_knew_writes_one_statement(online, django_assert_num_queries):
    with django_assert_num_queries(1):
        changed = online.set_state(ServerState.ONLINE, "", foreign_queue=3, comfyui_version="0.26.0")
    row = Server.objects.get(pk=online.pk)
    assert changed is False
    assert (row.state, row.foreign_queue, row.comfyui_version) == (ServerState.ONLINE, 3, "0.26.0")
    assert row.last_seen is not None and online.foreign_queue == 3
    assert not ServerEvent.objects.filter(server=online).exists()


def test_a_changed_state_is_written_with_its_reason_and_its_trail_entry(online):
    assert online.set_state(ServerState.DEGRADED, "slow: a probe took 4.0 s", foreign_queue=1) is True
    row = Server.objects.get(pk=online.pk)
    assert (row.state, row.state_reason, row.foreign_queue) == (ServerState.DEGRADED, "slow: a probe took 4.0 s", 1)
    event = ServerEvent.objects.get(server=online, kind="state")
    assert (event.from_state, event.to_state) == (ServerState.ONLINE, ServerState.DEGRADED)


def test_another_process_s_change_is_not_mistaken_for_the_known_state(online):
    Server.objects.filter(pk=online.pk).update(state=ServerState.OFFLINE)  # another worker saw it go down
    assert online.set_state(ServerState.ONLINE, "") is True
    assert Server.objects.get(pk=online.pk).state == ServerState.ONLINE
    assert ServerEvent.objects.get(server=online, kind="state").from_state == ServerState.OFFLINE


def test_a_draining_server_that_answers_stays_draining(online):
    Server.objects.filter(pk=online.pk).update(draining=True, state=ServerState.DRAINING)
    online.refresh_from_db()
    assert online.set_state(ServerState.ONLINE, "") is False
    assert Server.objects.get(pk=online.pk).state == ServerState.DRAINING


def test_timers_of_servers_started_together_fire_apart():
    firsts = [phase(5.0) for _ in range(200)]
    assert all(0.0 <= first < 5.0 for first in firsts)
    assert max(firsts) - min(firsts) > 2.5  # spread over the interval, not in step
    later = [jittered(5.0) for _ in range(200)]
    assert all(4.5 <= delay <= 5.5 for delay in later) and len(set(later)) > 100
