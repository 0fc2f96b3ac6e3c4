import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.test import override_settings
from PIL import Image

from comfyhub.harness import database_url, free_port, healthy, start_manage, stop, wait_until
from comfysim import SimulatorThread
from tasks.models import Task, TaskEvent, TaskStatus
from tasks.storage import StorageUnavailable, digest

ROOT = Path(settings.BASE_DIR)
WORKFLOWS = ["fast", "invert", "blur-sharpen", "txt2img", "upload-scale"]
FAULTS = ["drop_sockets", "restart_simulator", "stall", "kill_worker", "restart_daphne", "fail_node"]


class Command(BaseCommand):
    help = (
        "Chaos run on PostgreSQL + Redis: N tasks of mixed workflows on simulated servers run by two run_upstream "
        "workers behind two Daphne processes, while sockets are dropped, simulators restarted (losing their "
        "history) and stalled, a worker is killed -9 and started again, and a Daphne process is restarted. At the "
        "end every task must be succeeded (with all its outputs, sha256 checked), failed with a recorded reason, "
        "or cancelled; none lost, none completed twice. Prints the counts; exits 1 if any check fails."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tasks", type=int, default=1000)
        parser.add_argument("--simulators", type=int, default=4)
        parser.add_argument("--users", type=int, default=5)
        parser.add_argument("--fault-every", type=float, default=1.5, help="Mean seconds between faults")
        parser.add_argument("--timeout", type=float, default=900, help="Give up after this many seconds")
        parser.add_argument("--seed", type=int, default=None, help="Random seed, to replay a run")

    def handle(self, tasks, simulators, users, fault_every, timeout, seed, **options):
        if connection.vendor != "postgresql" or not settings.REDIS_URL:
            raise CommandError(
                "The chaos run needs DATABASE_URL on PostgreSQL and REDIS_URL: it runs several processes.",
                returncode=2,
            )
        seed = seed if seed is not None else random.randrange(2**32)  # noqa: S311  (chaos, not secrets)
        self.random = random.Random(seed)  # noqa: S311
        self.fault_random = random.Random(seed + 1)  # noqa: S311  (its own stream: faults play in a thread)
        self.unplayed = self.fault_random.sample(FAULTS, len(FAULTS))
        self.faults = Counter()
        self.stdout.write(f"chaos seed {seed}: {tasks} tasks, {simulators} simulators, {users} users")
        old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        self.processes = {}
        try:
            with tempfile.TemporaryDirectory() as scratch:
                ok = self.run(Path(scratch), tasks, simulators, users, fault_every, timeout)
        finally:
            for process in self.processes.values():
                stop(process)
            connection.close()
            connection.creation.destroy_test_db(old_name, verbosity=0)
        if not ok:
            sys.exit(1)

    # --- the layout ---------------------------------------------------------------------------------------

    def env(self, scratch):
        return {
            **os.environ,
            "DATABASE_URL": database_url(),
            "MEDIA_ROOT": str(scratch / "media"),
            "REDIS_PREFIX": f"chaos{os.getpid()}",
            "COMFYHUB_LEASE_SECONDS": "3",
            "COMFYHUB_RECONCILE_INTERVAL": "2",
            "COMFYHUB_PROBE_INTERVAL": "1",
            "COMFYHUB_FAILOVER_SECONDS": "8",
            "COMFYHUB_STUCK_SUBMITTED": "20",
            "COMFYHUB_STUCK_RUNNING": "20",
            "COMFYHUB_WATCHDOG_INTERVAL": "2",
            "COMFYHUB_MAX_ATTEMPTS": "10",
            "COMFYHUB_USER_MAX_QUEUED": "100000",
            "LOG_LEVEL": "WARNING",
            "COMFYHUB_TASK_LOG_LEVEL": "WARNING",
        }

    def start(self, name, *args):
        log = open(self.scratch / f"{name}.log", "a")  # noqa: SIM115  (closed with the process)
        self.processes[name] = start_manage(*args, env=self.environ, stdout=log, stderr=log)

    def start_daphne(self, name):
        port = self.ports[name]
        self.start(name, "serve", "--port", str(port), "--no-supervisor")

    def manage(self, *args):
        return subprocess.run(  # noqa: S603
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.environ, capture_output=True, text=True,
            check=True,
        ).stdout

    def run(self, scratch, count, simulator_count, user_count, fault_every, timeout):
        self.scratch, self.environ = scratch, self.env(scratch)
        self.sims = [
            SimulatorThread(time_scale=0.05, name=f"sim-{n}", output_dir=scratch / f"sim-{n}").start()
            for n in range(simulator_count)
        ]
        try:
            return self.chaos(count, user_count, fault_every, timeout)
        finally:
            for sim in self.sims:
                sim.stop()

    def chaos(self, count, user_count, fault_every, timeout):
        for n, sim in enumerate(self.sims):
            self.manage("add_server", f"gpu-{n}", sim.url)
        self.manage("load_workflow", "--demo")
        names = [f"user{n}" for n in range(user_count)]
        script = "from django.contrib.auth.models import User\n" + "".join(
            f"User.objects.create_user({name!r}, password='chaos-pass-123')\n" for name in names
        )
        self.manage("shell", "-c", script)
        tokens = {name: self.manage("create_token", name).strip() for name in names}
        self.ports = {"web-1": free_port(), "web-2": free_port()}
        for name in self.ports:
            self.start_daphne(name)
        for name in ("upstream-1", "upstream-2"):
            self.start(name, "run_upstream", "--tick", "0.2")
        for port in self.ports.values():
            wait(lambda port=port: healthy(f"http://127.0.0.1:{port}"), 60, "Daphne to answer")
        started = time.monotonic()
        deadline = started + timeout
        # Faults play on their own clock from the first submission until every task has ended.
        calm = threading.Event()
        player = threading.Thread(target=self.play_faults, args=(calm, fault_every), name="faults", daemon=True)
        player.start()
        try:
            ids, uploads = self.submit_all(count, tokens)
            self.stdout.write(f"submitted {len(ids)} tasks in {time.monotonic() - started:.1f} s (with faults)")
            wait(
                lambda: not self.unplayed and not Task.objects.filter(pk__in=ids).active().exists(),
                max(1.0, deadline - time.monotonic()), "every task to end under faults", fail=False,
            )
        finally:
            calm.set()
            player.join()
        for sim in self.sims:
            sim.unstall()
        # Let the pool settle after the last fault.
        wait(lambda: not Task.objects.filter(pk__in=ids).active().exists(), 120, "every task to end", fail=False)
        elapsed = time.monotonic() - started
        self.stdout.write(
            f"faults: {sum(self.faults.values())} {dict(sorted(self.faults.items()))} over {elapsed:.1f} s"
        )
        return self.verify(ids)

    def submit_all(self, count, tokens):
        ids, uploads = [], {}
        clients = {
            name: httpx.Client(
                base_url=f"http://127.0.0.1:{self.ports['web-1' if n % 2 else 'web-2']}",
                headers={"Authorization": f"Bearer {token}"}, timeout=30,
            )
            for n, (name, token) in enumerate(tokens.items())
        }
        for name, client in clients.items():
            buffer = io.BytesIO()
            Image.new("RGB", (48, 32), (self.random.randrange(256), 80, 160)).save(buffer, "PNG")
            files = {"image": ("photo.png", buffer.getvalue(), "image/png")}
            # A retry after a lost reply may store a second copy of the upload; the tasks use the one we hear of.
            uploads[name] = post(client, "/api/v1/uploads", f"the upload of {name}", files=files)["id"]
        users = list(clients)
        for n in range(count):
            name = users[n % len(users)]
            workflow = self.random.choice(WORKFLOWS)
            inputs = {
                "fast": {"color": n},
                "invert": {"color": n, "width": 32, "height": 32},
                "blur-sharpen": {"color": n, "blur_radius": 3},
                "txt2img": {"prompt": f"chaos {n}", "steps": 8, "width": 64, "height": 64, "seed": n},
                "upload-scale": {"image": uploads[name], "scale_by": round(0.5 + (n % 10) / 10, 2)},
            }[workflow]
            body = {"workflow": workflow, "inputs": inputs, "idempotency_key": f"c{n}"}  # retries are safe
            ids.append(post(clients[name], "/api/v1/tasks", f"task {n}", json=body)["id"])
        for client in clients.values():
            client.close()
        return ids, uploads

    # --- faults -------------------------------------------------------------------------------------------

    def play_faults(self, calm, every):
        # The first of each kind come early and close together, so that they hit tasks in flight even in a
        # short run; then faults come at the requested rate.
        while not calm.wait(0.2 if self.unplayed else self.fault_random.expovariate(1 / every)):
            try:
                self.fault()
            except Exception as exc:  # a fault that could not be played is reported, not fatal
                self.stderr.write(f"could not play a fault: {exc!r}")

    def fault(self):
        # Every kind once (in a random order) before the weighted draw, so that even a short run has them all.
        drawn = self.fault_random.choices(FAULTS, weights=[4, 2, 3, 1, 1, 1])[0]
        kind = self.unplayed.pop() if self.unplayed else drawn
        self.faults[kind] += 1
        sim = self.fault_random.choice(self.sims)
        if kind == "drop_sockets":
            sim.drop_sockets()
        elif kind == "restart_simulator":
            sim.restart(down_for=self.fault_random.uniform(0, 1.5))
        elif kind == "stall":
            sim.stall()
            time.sleep(self.fault_random.uniform(0.5, 3))
            sim.unstall()
        elif kind == "kill_worker":
            name = self.fault_random.choice(["upstream-1", "upstream-2"])
            self.processes[name].send_signal(signal.SIGKILL)
            self.processes[name].wait()
            time.sleep(self.fault_random.uniform(0.2, 2))
            self.start(name, "run_upstream", "--tick", "0.2")
        elif kind == "restart_daphne":
            name = self.fault_random.choice(list(self.ports))
            stop(self.processes[name])
            self.start_daphne(name)
            wait(lambda: healthy(f"http://127.0.0.1:{self.ports[name]}"), 60, "Daphne to come back")
        else:
            node = self.fault_random.choice(["ImageInvert", "ImageBlur", "SaveImage"])
            sim.fail_node(node, "chaos: injected failure")
        return kind

    # --- the verdict --------------------------------------------------------------------------------------

    def verify(self, ids):
        tasks = list(Task.objects.filter(pk__in=ids).prefetch_related("outputs"))
        statuses = Counter(task.status for task in tasks)
        problems = []
        if len(tasks) != len(ids):
            problems.append(f"{len(ids) - len(tasks)} tasks lost")
        stuck = [task for task in tasks if task.is_active]
        if stuck:
            problems.append(f"{len(stuck)} tasks never ended: {[str(t.pk) for t in stuck[:5]]}")
        silent = [t for t in tasks if t.status == TaskStatus.FAILED and not t.error]
        if silent:
            problems.append(f"{len(silent)} failed tasks without a reason")
        completed = Counter()
        for sim in self.sims:
            for prompt_id, _start, _end, succeeded in sim.sim.job_log:
                if succeeded:
                    completed[prompt_id] += 1
        prompts = {}
        for task_id, prompt_id in TaskEvent.objects.filter(task_id__in=ids).exclude(prompt_id="").values_list(
            "task_id", "prompt_id"
        ):
            prompts.setdefault(task_id, set()).add(prompt_id)
        # The same prompt completing twice means the hub sent a prompt the server already had: a bug. A task
        # completing under two prompts means a server lost a finished result (restart) and it was run again.
        same_prompt_twice = [p for p, n in completed.items() if n > 1]
        if same_prompt_twice:
            problems.append(f"{len(same_prompt_twice)} prompts completed twice: {same_prompt_twice[:5]}")
        twice = [t for t in tasks if sum(completed[p] for p in prompts.get(t.pk, ())) > 1]
        bad_outputs = 0
        for task in tasks:
            if task.status != TaskStatus.SUCCEEDED:
                continue
            if not task.outputs.all():
                bad_outputs += 1
            for output in task.outputs.all():
                # Through the storage the workers wrote to: their MEDIA_ROOT, or the bucket when one is set.
                with override_settings(MEDIA_ROOT=str(self.scratch / "media")):
                    try:
                        found = digest(output.file.name)
                    except (OSError, StorageUnavailable):
                        bad_outputs += 1
                        continue
                if found != (output.size, output.sha256):
                    bad_outputs += 1
        if bad_outputs:
            problems.append(f"{bad_outputs} outputs of succeeded tasks missing or not matching their sha256")
        reasons = Counter(t.error_kind for t in tasks if t.status == TaskStatus.FAILED)
        self.stdout.write(
            f"tasks: {len(tasks)} of {len(ids)}; {dict(statuses)}; failure kinds {dict(reasons)}; "
            f"run again after a server lost a finished result: {len(twice)} (one result kept for each)"
        )
        if problems:
            for problem in problems:
                self.stderr.write(f"FAILED: {problem}")
            self.print_trails([*same_prompt_twice[:3]], [t.pk for t in stuck[:3]])
            return False
        self.stdout.write("chaos run passed: no task lost, every task ended with its outputs or a reason")
        return True


    def print_trails(self, prompt_ids, task_ids):
        """The timelines behind a failed verdict: the database is thrown away when the run ends."""
        task_ids = {*task_ids, *TaskEvent.objects.filter(prompt_id__in=prompt_ids).values_list("task_id", flat=True)}
        for task_id in task_ids:
            self.stderr.write(f"-- task {task_id}")
            for event in TaskEvent.objects.filter(task_id=task_id).select_related("server").order_by("at", "pk"):
                self.stderr.write(
                    f"   {event.at:%H:%M:%S.%f} {event.kind:<20} {event.from_status or '-'} -> "
                    f"{event.to_status or '-'} {event.server.name if event.server else '-'} "
                    f"{event.prompt_id or '-'} {event.message}"
                )
        for sim in self.sims:
            for prompt_id, start, end, succeeded in sim.sim.job_log:
                if prompt_id in prompt_ids:
                    self.stderr.write(
                        f"   {sim.sim.name}: ran {prompt_id} {time.strftime('%H:%M:%S', time.localtime(start))}"
                        f"+{end - start:.2f} s, {'succeeded' if succeeded else 'did not succeed'}"
                    )


def post(client, path, what, **kwargs):
    """POST, retrying for a while: a Daphne process may be restarting under the chaos."""
    for _ in range(40):
        try:
            reply = client.post(path, **kwargs)
            reply.raise_for_status()
            return reply.json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise CommandError(f"could not submit {what}")


def wait(predicate, timeout, what, fail=True):
    try:
        return wait_until(predicate, timeout, what, error=CommandError)
    except CommandError:
        if fail:
            raise
        return False
