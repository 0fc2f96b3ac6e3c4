"""The staff pool dashboard /ops/: who may see it, what it shows, and the utilisation chart's arithmetic."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from ops.dashboard import utilisation
from servers.models import ServerEvent, ServerState
from tasks.models import TaskStatus
from tests.ops.conftest import browser, make_server, make_task

pytestmark = pytest.mark.django_db


def total(html, label):
    match = re.search(r'<span class="ops-total__n">(\d+)</span> ' + label, html)
    assert match, f"no total for {label}"
    return int(match.group(1))


@pytest.fixture
def pool(alice, bob, workflows):
    """gpu-a online and busy; gpu-b offline, draining, with an error trail."""
    gpu_a = make_server("gpu-a", foreign_queue=3, weight=2.0)
    gpu_b = make_server(
        "gpu-b",
        state=ServerState.OFFLINE,
        draining=True,
        state_reason="connection refused",
        last_error="connect to gpu-b.internal:8188: connection refused",
    )
    ServerEvent.objects.create(
        server=gpu_b, kind="state", from_state="online", to_state="offline", message="connection refused"
    )
    running = make_task(
        alice, workflows["txt2img"], gpu_a, status=TaskStatus.RUNNING, progress=0.42, created=120, started=60
    )
    for _ in range(2):
        make_task(bob, workflows["fast"], gpu_a, status=TaskStatus.SUBMITTED, created=30)
    for _ in range(4):
        make_task(
            bob,
            workflows["fast"],
            status=TaskStatus.QUEUED,
            created=90,
            waiting_reason="no online server can run it (gpu-b lacks node types Foo)",
        )
    make_task(alice, workflows["fast"], gpu_a, status=TaskStatus.FAILED, created=900, started=800, finished=700)
    make_task(alice, workflows["fast"], gpu_a, status=TaskStatus.FAILED, created=9000, started=8000, finished=7200)
    make_task(alice, workflows["fast"], gpu_a, status=TaskStatus.SUCCEEDED, created=600, started=500, finished=400)
    return {"gpu-a": gpu_a, "gpu-b": gpu_b, "running": running}


def test_staff_see_every_server_with_its_state_queue_and_current_task(operator, pool):
    reply = browser(operator).get("/ops/")
    assert reply.status_code == 200
    html = reply.content.decode()
    where = {name: html.index(f'id="server-{pool[name].pk}"') for name in ("gpu-a", "gpu-b")}
    gpu_a = html[where["gpu-a"] : where["gpu-b"]]
    running = pool["running"]
    assert 'data-state="online"' in gpu_a
    assert f'href="/admin/tasks/task/{running.pk}/change/"' in gpu_a
    assert "Text to image" in gpu_a and "alice" in gpu_a
    assert 'value="42"' in gpu_a
    assert '<span class="ops-queue">2</span> of ours waiting · 3 of other clients' in gpu_a
    assert "http://gpu-a.internal:8188" in gpu_a  # staff may see where the servers are
    gpu_b = html[where["gpu-b"] :]
    assert 'data-state="offline"' in gpu_b and "draining" in gpu_b
    assert "connection refused" in gpu_b and "Nothing running." in gpu_b
    assert "Last error: connect to gpu-b.internal:8188: connection refused" in gpu_b


def test_the_totals_count_waiting_running_and_the_last_hours_failures(operator, pool):
    html = browser(operator).get("/ops/").content.decode()
    assert total(html, "queued") == 4
    assert total(html, "submitted") == 2
    assert total(html, "running") == 1
    assert total(html, "failed") == 1  # the other failure ended two hours ago
    assert total(html, "succeeded") == 1
    assert "<strong>4</strong> no online server can run it (gpu-b lacks node types Foo)" in html


def test_normal_users_get_a_404_that_reveals_nothing(alice, pool):
    reply = browser(alice).get("/ops/")
    assert reply.status_code == 404
    assert b"gpu-a" not in reply.content and b"8188" not in reply.content


def test_anonymous_visitors_are_sent_to_the_login_page():
    reply = browser().get("/ops/")
    assert reply.status_code == 302
    assert reply["Location"] == "/accounts/login/?next=/ops/"


def test_non_staff_never_see_a_comfyui_url_or_the_ops_link(alice, pool, workflows):
    client = browser(alice)
    for path in ["/", "/tasks/", "/gallery/", f"/tasks/{pool['running'].pk}/", "/ops/"]:
        html = client.get(path).content.decode()
        assert ".internal:8188" not in html, path
        assert 'href="/ops/"' not in html, path


def test_staff_find_the_dashboard_in_the_navigation(operator):
    html = browser(operator).get("/").content.decode()
    assert '<a href="/ops/">Ops</a>' in html


def test_the_page_follows_the_pool_on_its_own_socket_outside_the_swapped_body(operator, pool):
    html = browser(operator).get("/ops/").content.decode()
    wrapper = html.index('ws-connect="/ws/ops/"')
    assert wrapper < html.index('<div id="ops-body"')
    # The extension is enabled on <body>; another hx-ext on the wrapper would make htmx open a second socket.
    assert html.count('hx-ext="ws') == 1 and html.index('hx-ext="ws') < html.index("<main>")
    assert "hx-swap-oob" not in html[html.index('<div id="ops-body"') :][:80]


def test_an_htmx_reread_gets_only_the_body_swapped_in_place(operator, pool):
    # Swapping the whole page would replace the wrapper that holds the page's /ws/ops/ socket.
    reply = browser(operator).get("/ops/", headers={"HX-Request": "true"})
    assert reply.status_code == 200
    assert reply["HX-Retarget"] == "#ops-body" and reply["HX-Reselect"] == "#ops-body"
    assert reply["HX-Reswap"] == "outerHTML"
    html = reply.content.decode().strip()
    assert html.startswith('<div id="ops-body"') and "ws-connect" not in html
    assert "gpu-a" in html


def test_errors_list_the_last_five_bad_states_newest_first(operator, pool):
    gpu_b = pool["gpu-b"]
    start = timezone.now() - timedelta(hours=1)
    for minute in range(7):
        ServerEvent.objects.create(
            server=gpu_b,
            kind="state",
            from_state="online",
            to_state="degraded",
            message=f"slow probe #{minute}",
            at=start + timedelta(minutes=minute),
        )
    ServerEvent.objects.create(
        server=gpu_b,
        kind="state",
        from_state="degraded",
        to_state="online",
        message="back",
        at=start + timedelta(minutes=30),
    )
    html = browser(operator).get("/ops/").content.decode()
    errors = html[html.index("Recent errors of gpu-b") :]
    shown = re.findall(r"slow probe #(\d)|connection refused</li>", errors[: errors.index("</ul>")])
    assert shown == ["", "6", "5", "4", "3"]  # the offline event is the newest
    assert "back" not in errors[: errors.index("</ul>")]


def test_utilisation_is_the_busy_fraction_of_each_five_minutes_of_the_last_hour(alice, workflows):
    now = timezone.now()
    gpu = make_server("gpu-u")
    other = make_server("gpu-v")
    fast = workflows["fast"]

    def ran(server, started, finished=None, status=TaskStatus.SUCCEEDED):
        make_task(alice, fast, server, now=now, created=started + 10, started=started, finished=finished, status=status)

    ran(gpu, 62.5 * 60, 57.5 * 60)  # half of the first window; the rest is before the hour
    ran(gpu, 40 * 60, 30 * 60)  # two whole windows ...
    ran(gpu, 38 * 60, 36 * 60)  # ... and an overlapping task counts once
    ran(gpu, 2.5 * 60, status=TaskStatus.RUNNING)  # running: until now
    ran(gpu, 90 * 60, 61 * 60, status=TaskStatus.FAILED)  # ended before the hour
    ran(other, 60 * 60, 0)
    busy = utilisation(now)
    assert busy[gpu.pk] == pytest.approx([0.5, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0.5])
    assert busy[other.pk] == pytest.approx([1.0] * 12)


def test_the_chart_draws_twelve_bars_per_server(operator, alice, workflows):
    gpu = make_server("gpu-c")
    make_task(alice, workflows["fast"], gpu, status=TaskStatus.RUNNING, created=200, started=150)
    html = browser(operator).get("/ops/").content.decode()
    percents = re.findall(r'class="ops-util__bar"[^>]*data-percent="(\d+)"', html)
    assert len(percents) == 12
    assert percents[:11] == ["0"] * 11 and percents[11] == "50"
    assert "busy 4% of the last hour" in html
