import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import connection
from django.test import Client
from django.test.utils import override_settings

from comfyhub.harness import percentile, wait_until
from comfysim import SimulatorThread
from servers.models import Server
from servers.supervisor import SupervisorThread
from tasks.models import ApiToken, Task
from tasks.workflows import load_demo_workflows


class Command(BaseCommand):
    help = (
        "Measure the task engine on a throw-away test database: the time from POST /api/v1/tasks to the prompt "
        "being in an idle simulator's queue, and tasks per second (the whole lifecycle: submit, dispatch, run, "
        "outputs copied) through N simulators with zero-length nodes."
    )

    def add_arguments(self, parser):
        parser.add_argument("--samples", type=int, default=50, help="Tasks timed one at a time for the latency")
        parser.add_argument("--tasks", type=int, default=400, help="Tasks pushed through the simulators at once")
        parser.add_argument("--simulators", type=int, default=8, help="Simulators for the throughput run")

    def handle(self, samples, tasks, simulators, **options):
        old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        try:
            with tempfile.TemporaryDirectory() as media, override_settings(MEDIA_ROOT=media):
                self.report(samples, tasks, simulators)
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)

    def report(self, samples, count, simulator_count):
        load_demo_workflows()
        user = get_user_model().objects.create_user("bench")
        _, token = ApiToken.issue(user)
        client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
        layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
        self.stdout.write(f"database: {connection.vendor}; channel layer: {layer}")

        def submit(color):
            reply = client.post(
                "/api/v1/tasks", {"workflow": "fast", "inputs": {"color": color}}, content_type="application/json"
            )
            assert reply.status_code == 201, reply.content  # noqa: S101  (a benchmark that measured nothing is a bug)
            return reply.json()["id"]

        with ExitStack() as stack:
            sims = [stack.enter_context(SimulatorThread(time_scale=0)) for _ in range(max(1, simulator_count))]
            first = Server.objects.create(name="bench-1", base_url=sims[0].url)
            with SupervisorThread(tick=1.0) as hub:
                wait(lambda: hub.supervisor.connections.get(first.pk) and hub.supervisor.connections[first.pk].online)
                latencies = []
                for n in range(samples):
                    started = datetime.now(UTC)
                    task_id = submit(n)
                    accepted = wait(lambda task_id=task_id: Task.objects.get(pk=task_id).accepted_at)
                    latencies.append((accepted - started).total_seconds() * 1000)
                    wait(lambda task_id=task_id: Task.objects.get(pk=task_id).is_terminal)
                self.stdout.write(
                    f"POST /api/v1/tasks -> prompt in an idle simulator's queue, {samples} tasks: "
                    f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
                    f"max {max(latencies):.1f} ms"
                )
                for n, sim in enumerate(sims[1:], start=2):
                    Server.objects.create(name=f"bench-{n}", base_url=sim.url)
                hub.supervisor.wake_threadsafe()
                wait(lambda: len([c for c in hub.supervisor.connections.values() if c.online]) == len(sims))
                started = time.monotonic()
                ids = [submit(10_000 + n) for n in range(count)]
                submitted = time.monotonic() - started
                wait(lambda: not Task.objects.filter(pk__in=ids).active().exists(), timeout=600)
                elapsed = time.monotonic() - started
            done = Task.objects.filter(pk__in=ids, status="succeeded").count()
            per_server = {s.name: s.tasks.filter(pk__in=ids).count() for s in Server.objects.all()}
        self.stdout.write(
            f"throughput, {count} tasks over {len(sims)} simulators (zero-length nodes, whole lifecycle): "
            f"{count / elapsed:.1f} tasks/s "
            f"({elapsed:.2f} s in all, submissions took {submitted:.2f} s); succeeded {done}/{count}; "
            f"per server {per_server}"
        )


def wait(predicate, timeout=60.0):
    return wait_until(predicate, timeout, "the benchmark's hub", interval=0.002)
