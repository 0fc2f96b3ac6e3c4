import statistics
import tempfile
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import connection
from django.test import Client
from django.test.utils import override_settings

from comfyhub.harness import wait_until
from comfysim import SimulatorThread
from servers.models import Server
from servers.supervisor import SupervisorThread
from tasks.models import ApiToken, Task, TaskStatus
from tasks.workflows import load_demo_workflows

STEP_SECONDS_AT_64PX = 0.15 * 0.25  # the simulator's KSampler step on a 64x64 latent


class Command(BaseCommand):
    help = (
        "Measure the pool on a throw-away test database: four simulated servers of speeds 1x, 1x, 2x and 4x and "
        "N tasks of a fixed length. Prints GPU utilisation, makespan against the ideal, the idle gap between "
        "tasks on a server, and the wait of one task of user B submitted behind user A's batch, for comfyhub's "
        "policy and for a naive one (round-robin, a task only to an idle server) in the same run."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tasks", type=int, default=400, help="Tasks of user A in the utilisation run")
        parser.add_argument("--batch", type=int, default=200, help="User A's batch in front of user B's task")
        parser.add_argument("--unit", type=float, default=2.0, help="Seconds one task takes on a 1x server")
        parser.add_argument("--speeds", default="1,1,2,4", help="Relative speeds of the simulated servers")
        parser.add_argument("--policy", choices=["both", "fair", "naive"], default="both")

    def handle(self, tasks, batch, unit, speeds, policy, **options):
        speeds = [float(s) for s in speeds.split(",")]
        old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        try:
            with tempfile.TemporaryDirectory() as media, override_settings(MEDIA_ROOT=media):
                self.setup()
                layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
                self.stdout.write(
                    f"database: {connection.vendor}; channel layer: {layer}; servers of speeds "
                    f"{', '.join(f'{s:g}x' for s in speeds)}; one task = {unit:g} s on a 1x server"
                )
                for name in ["fair", "naive"] if policy == "both" else [policy]:
                    self.run_policy(name, speeds, tasks, batch, unit)
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)

    def setup(self):
        load_demo_workflows()
        users = get_user_model().objects
        self.clients = {}
        for name in ("user-a", "user-b"):
            _, token = ApiToken.issue(users.create_user(name))
            self.clients[name] = Client(HTTP_AUTHORIZATION=f"Bearer {token}")

    def submit(self, user, n, steps):
        inputs = {"prompt": "bench", "seed": n, "steps": steps, "width": 64, "height": 64}
        reply = self.clients[user].post(
            "/api/v1/tasks", {"workflow": "txt2img", "inputs": inputs}, content_type="application/json"
        )
        if reply.status_code != 201:
            raise RuntimeError(f"the benchmark could not submit: {reply.content[:300]!r}")
        return reply.json()["id"]

    def run_policy(self, policy, speeds, count, batch, unit):
        steps = max(1, round((unit - 0.08) / STEP_SECONDS_AT_64PX))
        Task.objects.all().delete()
        Server.objects.all().delete()
        sims = [SimulatorThread(time_scale=1 / speed, name=f"{speed:g}x").start() for speed in speeds]
        try:
            servers = [
                Server.objects.create(name=f"gpu-{i + 1}-{speed:g}x", base_url=sim.url, weight=speed)
                for i, (sim, speed) in enumerate(zip(sims, speeds, strict=True))
            ]
            with SupervisorThread(policy=policy, tick=0.5) as hub:
                wait(lambda: sum(c.online for c in hub.supervisor.connections.values()) == len(servers))
                # Warm every server up (its checkpoint and text encoders load once, then come from cache).
                warm = [self.submit("user-a", 900_000 + i, 1) for i in range(len(servers) * 2)]
                wait(lambda: not Task.objects.filter(pk__in=warm).active().exists(), timeout=120)
                for sim in sims:
                    sim.sim.job_log.clear()
                started = time.time()
                ids = [self.submit("user-a", n, steps) for n in range(count)]
                wait(lambda: not Task.objects.filter(pk__in=ids).active().exists(), timeout=count * unit * 2)
                self.report_utilisation(policy, sims, speeds, ids, started)
                self.report_wait(policy, batch, steps, unit)
        finally:
            for sim in sims:
                sim.stop()

    def report_utilisation(self, policy, sims, speeds, ids, started):
        tasks = Task.objects.filter(pk__in=ids)
        finished = max(tasks.values_list("finished_at", flat=True)).timestamp()
        makespan = finished - started
        done = tasks.filter(status=TaskStatus.SUCCEEDED).count()
        work = 0.0  # in 1x-seconds
        gaps, lines = [], []
        for sim, speed in zip(sims, speeds, strict=True):
            log = sorted(sim.sim.job_log, key=lambda entry: entry[1])
            busy = sum(entry[2] - entry[1] for entry in log)
            work += busy * speed
            gaps += [b[1] - a[2] for a, b in zip(log, log[1:], strict=False)]
            lines.append(f"{sim.sim.name}: {len(log)} tasks, busy {busy / makespan:.0%}")
        ideal = work / sum(speeds)
        self.stdout.write(
            f"[{policy}] {len(ids)} tasks ({done} succeeded): makespan {makespan:.1f} s, ideal {ideal:.1f} s "
            f"(x{makespan / ideal:.2f}); utilisation {'; '.join(lines)}"
        )
        if gaps:
            gaps_ms = sorted(gap * 1000 for gap in gaps)
            self.stdout.write(
                f"[{policy}] idle gap between consecutive tasks on a server: median {statistics.median(gaps_ms):.0f}"
                f" ms, p90 {gaps_ms[int(len(gaps_ms) * 0.9)]:.0f} ms, max {gaps_ms[-1]:.0f} ms ({len(gaps)} gaps)"
            )

    def report_wait(self, policy, batch, steps, unit):
        ids = [self.submit("user-a", 100_000 + n, steps) for n in range(batch)]
        wait(lambda: Task.objects.filter(pk__in=ids, status=TaskStatus.RUNNING).exists())
        submitted = time.time()
        single = self.submit("user-b", 999_999, steps)
        task = wait(lambda: (t := Task.objects.get(pk=single)).is_terminal and t, timeout=batch * unit * 2)
        started = task.started_at.timestamp() - submitted
        ended = task.finished_at.timestamp() - submitted
        self.stdout.write(
            f"[{policy}] user B's single task behind user A's {batch}: started after {started:.1f} s "
            f"({started / unit:.2f} task times at 1x), finished after {ended:.1f} s on {task.server.name}"
        )
        for task_id in ids:
            Task.objects.get(pk=task_id).request_cancel()
        wait(lambda: not Task.objects.filter(pk__in=ids).active().exists(), timeout=120)


def wait(predicate, timeout=60.0):
    return wait_until(predicate, timeout, "the benchmark's hub", interval=0.01)
