"""
Several `manage.py run_upstream` processes against one database: the ownership leases (Lock rows with purpose
"upstream", one per server) decide which process holds a server's websocket and dispatches its tasks.

The workers are real subprocesses on the pytest-django test database (hence `transaction=True`: they only see
committed rows), with short leases so that a takeover happens within the test. Their logs are in tmp_path and
every failure message ends with their tails.
"""

import hashlib
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from comfyhub.harness import database_url
from comfysim import SimulatorThread
from servers.models import Lock, LockPurpose, Server
from tasks.models import ON_SERVER_STATUSES, TERMINAL_STATUSES, Task, TaskOutput, TaskStatus

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
TICK = "0.2"
LEASE_SECONDS = 3
# blur-sharpen takes ~10 s at time scale 1: ~0.5-0.8 s a task here, so a batch of 20 lasts several seconds.
TIME_SCALE = 0.05
WORKFLOW = "blur-sharpen"
# For the paused-worker test: how often the workers compare a server's tasks with its /queue and /history.
RECONCILE_SECONDS = 2


def owner_pid(owner):
    """A supervisor's owner string is "<hostname>:<pid>:<hex>"."""
    return int(owner.rsplit(":", 2)[1])


class Worker:
    """One `manage.py run_upstream` process, its output in a log file."""

    def __init__(self, name, tmp_path, media_root, lease_seconds=LEASE_SECONDS, **extra_env):
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115  (closed by close())
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "MEDIA_ROOT": str(media_root),
            "COMFYHUB_LEASE_SECONDS": str(lease_seconds),
            "PYTHONUNBUFFERED": "1",  # the owner line and the log reach the file at once
            **extra_env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "run_upstream", "--tick", TICK],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid

    def __repr__(self):
        return f"<Worker {self.name} pid {self.pid}>"

    def text(self):
        return self.log_path.read_text(errors="replace")

    def tail(self, records=30, lines=15):
        """The last log records (tracebacks left out), then the last raw lines of the log."""
        text = self.text().splitlines()
        kept = [line for line in text if re.match(r"\d{4}-\d\d-\d\d |Upstream supervisor ", line)][-records:]
        return "\n".join(
            [f"--- {self.name} (pid {self.pid}), last {records} records:", *kept, f"--- last {lines} lines:"]
            + text[-lines:]
        )

    def owner(self, timeout=60):
        """The supervisor's owner string, as the command prints it when it starts."""

        def printed():
            if self.process.poll() is not None:
                pytest.fail(f"{self} exited with {self.process.returncode}\n{self.tail()}")
            found = re.search(r"Upstream supervisor (\S+) running", self.text())
            return found and found.group(1)

        owner = wait(printed, f"{self} to start", [self], timeout=timeout)
        assert owner_pid(owner) == self.pid, owner
        return owner

    def alive(self):
        return self.process.poll() is None

    def close(self):
        """Stop the process if it still runs (SIGINT, then SIGKILL after 5 s), wait for it, close its log."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)  # in case a test left it paused
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
        finally:
            self.log.close()


def leases():
    """{server pk: (owner, expires_at)} of every upstream lease row."""
    return {
        int(lock.key.removeprefix("server:")): (lock.owner, lock.expires_at)
        for lock in Lock.objects.filter(purpose=LockPurpose.UPSTREAM)
    }


def held_by(server_pks):
    """{server pk: owner} when every one of `server_pks` has an unexpired lease, else None."""
    now = timezone.now()
    rows = leases()
    if all(pk in rows and rows[pk][1] > now for pk in server_pks):
        return {pk: rows[pk][0] for pk in server_pks}
    return None


class LeaseWatch(threading.Thread):
    """Samples the upstream lease rows every 50 ms on its own connection: each server's owners, in order."""

    def __init__(self):
        super().__init__(name="lease-watch", daemon=True)
        self.owners = {}
        self.error = None
        self._halt = threading.Event()

    def run(self):
        try:
            while not self._halt.is_set():
                for pk, (owner, _expires) in leases().items():
                    seen = self.owners.setdefault(pk, [])
                    if not seen or seen[-1] != owner:
                        seen.append(owner)
                self._halt.wait(0.05)
        except Exception as exc:  # reported by stop()
            self.error = exc
        finally:
            connection.close()

    def halt(self):
        self._halt.set()
        if self.is_alive():
            self.join(timeout=10)

    def stop(self):
        """Stop sampling; return {server pk: [owners in the order they held its lease]}."""
        self.halt()
        assert self.error is None, f"the lease watch failed: {self.error!r}"
        return self.owners


def describe(task_ids, workers, timelines_of=None):
    """
    For failure messages: the tasks' statuses, the timelines of those that did not simply succeed (and of every
    task on the server `timelines_of`), the lease rows and the workers' log tails.
    """
    lines = []
    for task in Task.objects.filter(pk__in=task_ids).select_related("server").order_by("created_at"):
        lines.append(
            f"{task.pk} {task.status} on {task.server} prompt {task.prompt_id} attempts {task.attempts} "
            f"{task.error_kind} {task.error}".rstrip()
        )
        on_server = timelines_of is not None and task.server_id == timelines_of.pk
        if task.status != TaskStatus.SUCCEEDED or task.attempts != 1 or on_server:
            for event in task.events.all():
                lines.append(
                    f"    {event.at:%H:%M:%S.%f} {event.kind} {event.from_status}->{event.to_status} "
                    f"server={event.server_id} prompt={event.prompt_id} {event.message}"
                )
    lines.append(f"leases: {leases()}")
    return "\n".join(lines + [worker.tail() for worker in workers])


def wait(predicate, what, workers, task_ids=(), *, timeout=15.0, interval=0.05, timelines_of=None):
    """Poll until predicate() is truthy and return its value; on timeout fail with describe() of the moment."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{describe(task_ids, workers, timelines_of)}")
        time.sleep(interval)


def submit_batch(api, count, first_color):
    ids = []
    for n in range(count):
        reply = api.submit(WORKFLOW, {"color": first_color + n})  # distinct colours: no cached reruns
        assert reply.status_code == 201, reply.content
        ids.append(reply.json()["id"])
    return ids


def count(task_ids, **filters):
    return Task.objects.filter(pk__in=task_ids, **filters).count()


def wait_until_finished(task_ids, workers, timeout=90):
    wait(
        lambda: count(task_ids, status__in=TERMINAL_STATUSES) == len(task_ids),
        "every task to finish",
        workers,
        task_ids,
        timeout=timeout,
        interval=0.1,
    )


def hold_busy(sim, workers):
    """
    Freeze a simulator's GPU with a job running and another waiting behind it, as real jobs (~10 s) would be
    through a takeover: the next lease holder must adopt them, not find them finished.
    """
    sim.stall()
    wait(lambda: sim.call(sim.sim.queue_snapshot)[1], f"a task waiting on {sim.url}", workers, timeout=10)


def connected(sim, server):
    """Whether the simulator has a websocket registered under one of the server's clientIds (one per holder)."""
    return any(c.startswith(f"{server.client_id}.") for c in sim.call(sim.sim.connected_clients))


def open_sockets(sim):
    """How many websockets the simulator has open, registered under a clientId or orphaned (§2.6)."""
    return sim.call(lambda: len(sim.sim._open_sockets))


def in_a_transaction(seconds=0.5):
    """Whether a connection (a paused worker's) has kept a database transaction open for `seconds`."""
    if connection.vendor == "sqlite":
        # One writer at a time: if the write lock stays taken for `seconds`, the paused worker holds it.
        probe = sqlite3.connect(connection.settings_dict["NAME"], timeout=seconds, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    time.sleep(seconds + 0.1)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%%' AND state_change < now() - %s * interval '1 second'",
            [seconds],
        )
        return cursor.fetchone()[0] > 0


def pause(worker, workers):
    """
    SIGSTOP the worker at a moment when it holds no database transaction. A process frozen inside one would
    block the others' writes (all of them on SQLite, which has one writer), which is the database's nature and
    not what the tests are about: they freeze a worker that holds a server's socket, not the database.
    """
    for _ in range(20):
        worker.process.send_signal(signal.SIGSTOP)
        if not in_a_transaction():
            return
        worker.process.send_signal(signal.SIGCONT)
        time.sleep(0.05 + 0.1 * random.random())  # noqa: S311
    pytest.fail(f"could not pause {worker} outside a database transaction\n{describe([], workers)}")


def check_ran_once(task_ids, sims, servers, workers):
    """
    Every task succeeded, ran exactly once on its own server under its final prompt_id, and nothing else ran:
    a worker dying or stopping must neither lose a task nor make a GPU run it twice.
    """
    diagnosis = describe(task_ids, workers)
    tasks = list(Task.objects.filter(pk__in=task_ids))
    assert len(tasks) == len(task_ids)
    assert all(task.status == TaskStatus.SUCCEEDED for task in tasks), diagnosis
    executed = {server.pk: list(sim.sim.executed_prompt_ids) for sim, server in zip(sims, servers, strict=True)}
    for server_pk, prompt_ids in executed.items():
        repeats = sorted({p for p in prompt_ids if prompt_ids.count(p) > 1})
        assert not repeats, f"server {server_pk} ran {repeats} more than once\n{diagnosis}"
    for task in tasks:
        ran_on = [pk for pk, prompt_ids in executed.items() if task.prompt_id in prompt_ids]
        assert ran_on == [task.server_id], f"{task.pk} ({task.prompt_id}) ran on {ran_on}\n{diagnosis}"
    stray = {p for prompt_ids in executed.values() for p in prompt_ids} - {task.prompt_id for task in tasks}
    assert not stray, f"prompts executed that no task ended with (a task ran twice): {stray}\n{diagnosis}"
    assert all(task.attempts == 1 for task in tasks), diagnosis


def check_outputs(task_ids, media_root):
    """Every task has its outputs, and each stored file is the one its row describes."""
    for task_id in task_ids:
        rows = list(TaskOutput.objects.filter(task_id=task_id))
        assert rows, f"task {task_id} succeeded without outputs"
        for row in rows:
            data = (Path(media_root) / row.file.name).read_bytes()
            assert len(data) == row.size, row.file.name
            assert hashlib.sha256(data).hexdigest() == row.sha256, row.file.name
            assert data.startswith(b"\x89PNG"), row.file.name


def start_one_worker_per_server(stack, workers, watch, tmp_path, media_root, **extra_env):
    """Two simulators, two servers, and two workers A and B holding one server each: gpu-1 is A's, gpu-2 B's."""
    sims = [stack.enter_context(SimulatorThread(time_scale=TIME_SCALE, name=f"sim-{i}")) for i in (1, 2)]
    gpu1 = Server.objects.create(name="gpu-1", base_url=sims[0].url)

    # Worker A starts alone and leases gpu-1.
    a = Worker("worker-a", tmp_path, media_root, **extra_env)
    workers.append(a)
    a_owner = a.owner()
    wait(lambda: held_by([gpu1.pk]), "worker A to lease gpu-1", workers, timeout=30)
    assert held_by([gpu1.pk]) == {gpu1.pk: a_owner}

    # Worker B starts; gpu-2 appears with its lease already B's, as if B had won the race for it (which process
    # wins a free server is otherwise down to timing, and the tests want one server each).
    b = Worker("worker-b", tmp_path, media_root, **extra_env)
    workers.append(b)
    b_owner = b.owner()
    gpu2 = Server.objects.create(name="gpu-2", base_url=sims[1].url)
    injected_expiry = timezone.now() + timedelta(seconds=LEASE_SECONDS)
    Lock.objects.create(
        purpose=LockPurpose.UPSTREAM, key=f"server:{gpu2.pk}", owner=b_owner, server=gpu2, expires_at=injected_expiry
    )
    watch.start()

    # B renews that lease (so it is really B's), and A keeps renewing its own.
    wait(
        lambda: leases()[gpu2.pk][0] == b_owner and leases()[gpu2.pk][1] > injected_expiry,
        "worker B to renew its lease on gpu-2",
        workers,
        timeout=10,
    )
    owners = held_by([gpu1.pk, gpu2.pk])
    assert owners == {gpu1.pk: a_owner, gpu2.pk: b_owner}, describe([], workers)
    assert {owner_pid(owner) for owner in owners.values()} == {a.pid, b.pid}
    wait(lambda: connected(sims[0], gpu1) and connected(sims[1], gpu2), "both workers to connect", workers, timeout=10)
    return sims, (gpu1, gpu2), (a, a_owner), (b, b_owner)


@pytest.mark.django_db(transaction=True)
def test_two_workers_share_the_servers_and_a_killed_one_is_replaced(alice_api, workflows, tmp_path, media_root):
    workers = []
    watch = LeaseWatch()
    with ExitStack() as stack:
        try:
            sims, (gpu1, gpu2), (a, a_owner), (b, b_owner) = start_one_worker_per_server(
                stack, workers, watch, tmp_path, media_root
            )
            servers, pks = [gpu1, gpu2], [gpu1.pk, gpu2.pk]
            task_ids = submit_batch(alice_api, 20, first_color=1000)

            # Both servers get work: each worker dispatches to the server it holds.
            wait(
                lambda: (
                    set(Task.objects.filter(pk__in=task_ids, server__isnull=False).values_list("server", flat=True))
                    == set(pks)
                ),
                "both workers to dispatch tasks",
                workers,
                task_ids,
                timeout=30,
            )

            # Kill A (SIGKILL: no clean-up at all) mid-batch, with a task running on gpu-1 and one waiting there.
            wait(
                lambda: (
                    count(task_ids, status=TaskStatus.SUCCEEDED) >= 3
                    and count(task_ids, server=gpu1, status=TaskStatus.RUNNING) > 0
                ),
                "a task running on worker A's server",
                workers,
                task_ids,
                timeout=60,
                interval=0.01,
            )
            hold_busy(sims[0], workers)
            in_flight = dict(
                Task.objects.filter(pk__in=task_ids, server=gpu1, status__in=ON_SERVER_STATUSES).values_list(
                    "pk", "prompt_id"
                )
            )
            a.process.kill()
            killed_at, killed_wall = time.monotonic(), timezone.now()
            a.process.wait(timeout=10)
            assert in_flight, "nothing was on gpu-1 when its worker was killed"

            # B takes gpu-1 over once A's lease has expired, and keeps gpu-2.
            wait(
                lambda: held_by(pks) == {gpu1.pk: b_owner, gpu2.pk: b_owner},
                "worker B to hold both leases",
                workers,
                task_ids,
                timeout=LEASE_SECONDS + 5,
            )
            takeover = time.monotonic() - killed_at
            still_queued = count(task_ids, status=TaskStatus.QUEUED)
            wait(lambda: connected(sims[0], gpu1), "worker B to connect to gpu-1", workers, task_ids, timeout=10)
            sims[0].unstall()
            logger.info("takeover %.2fs after the kill; %d on gpu-1, %d queued", takeover, len(in_flight), still_queued)

            wait_until_finished(task_ids, workers)
            check_ran_once(task_ids, sims, servers, workers)
            diagnosis = describe(task_ids, workers)
            # What was on gpu-1 when A died was adopted by B, not sent again.
            for pk, prompt_id in in_flight.items():
                assert Task.objects.get(pk=pk).prompt_id == prompt_id, diagnosis
            # B also gives gpu-1 new work once it holds it (if any was left by then).
            if still_queued:
                assert count(task_ids, server=gpu1, submitted_at__gt=killed_wall) > 0, diagnosis
            assert b.alive(), diagnosis
            assert held_by(pks) == {gpu1.pk: b_owner, gpu2.pk: b_owner}, diagnosis
            check_outputs(task_ids, media_root)
            # Each lease changed hands once at most: A's to B after the kill, and never back and forth.
            assert watch.stop() == {gpu1.pk: [a_owner, b_owner], gpu2.pk: [b_owner]}, diagnosis
        finally:
            watch.halt()
            for worker in workers:
                worker.close()


@pytest.mark.django_db(transaction=True)
def test_a_restarted_worker_takes_its_servers_back_after_a_clean_stop(alice_api, workflows, tmp_path, media_root):
    # A long lease here: a successor that gets the servers within seconds can only have been let in by the
    # stopped worker releasing its leases (Supervisor.shutdown), not by their expiry.
    lease = 30
    workers = []
    watch = LeaseWatch()
    with ExitStack() as stack:
        try:
            sims = [stack.enter_context(SimulatorThread(time_scale=TIME_SCALE, name=f"sim-{i}")) for i in (1, 2)]
            servers = [Server.objects.create(name=f"gpu-{i}", base_url=sim.url) for i, sim in enumerate(sims, start=1)]
            pks = [server.pk for server in servers]
            watch.start()

            first = Worker("worker-1", tmp_path, media_root, lease_seconds=lease)
            workers.append(first)
            first_owner = first.owner()
            wait(
                lambda: held_by(pks) == dict.fromkeys(pks, first_owner),
                "the first worker to lease both servers",
                workers,
                timeout=30,
            )

            task_ids = submit_batch(alice_api, 12, first_color=2000)
            wait(
                lambda: (
                    count(task_ids, status=TaskStatus.SUCCEEDED) >= 2
                    and count(task_ids, server=servers[0], status=TaskStatus.RUNNING) > 0
                ),
                "the batch to be under way",
                workers,
                task_ids,
                timeout=60,
                interval=0.01,
            )

            # A deploy: SIGTERM in the middle of the work. gpu-1 is still busy when the new worker comes; what
            # gpu-2 had finishes while no worker is connected, so the new one finds it in /history.
            hold_busy(sims[0], workers)
            in_flight = dict(
                Task.objects.filter(pk__in=task_ids, status__in=ON_SERVER_STATUSES).values_list("pk", "prompt_id")
            )
            first.process.send_signal(signal.SIGTERM)
            try:
                code = first.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not stop within 15 s of SIGTERM\n{first.tail()}")
            assert code == 0, first.tail()
            assert f"upstream supervisor {first_owner} stopped" in first.text(), first.tail()
            assert in_flight, "nothing was on the servers when the worker stopped"
            # It gave its leases back on the way out.
            assert not Lock.objects.filter(purpose=LockPurpose.UPSTREAM, owner=first_owner).exists(), leases()

            second = Worker("worker-2", tmp_path, media_root, lease_seconds=lease)
            workers.append(second)
            second_owner = second.owner()
            started = time.monotonic()
            wait(
                lambda: held_by(pks) == dict.fromkeys(pks, second_owner),
                "the restarted worker to lease both servers",
                workers,
                task_ids,
                timeout=15,
            )
            logger.info("the restarted worker held both servers %.2fs after it started", time.monotonic() - started)
            wait(lambda: connected(sims[0], servers[0]), "the new worker to connect to gpu-1", workers, timeout=10)
            sims[0].unstall()

            wait_until_finished(task_ids, workers)
            check_ran_once(task_ids, sims, servers, workers)
            diagnosis = describe(task_ids, workers)
            # What was on the servers at the stop was picked up where it was, under the same prompt_id.
            for pk, prompt_id in in_flight.items():
                assert Task.objects.get(pk=pk).prompt_id == prompt_id, diagnosis
            assert second.alive(), diagnosis
            check_outputs(task_ids, media_root)
            assert watch.stop() == dict.fromkeys(pks, [first_owner, second_owner]), diagnosis
        finally:
            watch.halt()
            for worker in workers:
                worker.close()


@pytest.mark.django_db(transaction=True)
def test_a_paused_worker_gives_its_server_up_without_disturbing_the_new_holder(
    alice_api, workflows, tmp_path, media_root
):
    """
    A worker frozen past its lease (SIGSTOP: a VM pause, a host stuck in swap) wakes up after another worker has
    taken its server over. It must give the server up without harm: nothing runs twice, and the new holder goes
    on following the server live. ComfyUI unregisters a clientId's newer socket when an older socket with the
    same clientId closes (protocol §2.6), so the woken worker closing its old socket must not leave the new
    holder's socket orphaned for good.
    """
    workers = []
    watch = LeaseWatch()
    with ExitStack() as stack:
        try:
            sims, (gpu1, gpu2), (a, a_owner), (b, b_owner) = start_one_worker_per_server(
                stack,
                workers,
                watch,
                tmp_path,
                media_root,
                COMFYHUB_RECONCILE_INTERVAL=str(RECONCILE_SECONDS),
            )
            servers, pks = [gpu1, gpu2], [gpu1.pk, gpu2.pk]
            task_ids = submit_batch(alice_api, 12, first_color=3000)
            wait(
                lambda: (
                    count(task_ids, status=TaskStatus.SUCCEEDED) >= 2
                    and count(task_ids, server=gpu1, status=TaskStatus.RUNNING) > 0
                ),
                "a task running on worker A's server",
                workers,
                task_ids,
                timeout=60,
                interval=0.01,
            )
            pause(a, workers)
            try:
                wait(
                    lambda: held_by(pks) == {gpu1.pk: b_owner, gpu2.pk: b_owner},
                    "worker B to take gpu-1 over from the paused A",
                    workers,
                    task_ids,
                    timeout=LEASE_SECONDS + 5,
                )
                # B's socket is open beside A's, which the paused process cannot close.
                wait(lambda: open_sockets(sims[0]) == 2, "worker B to connect to gpu-1", workers, timeout=10)
            finally:
                a.process.send_signal(signal.SIGCONT)
            # A wakes, finds the lease gone and closes its socket.
            wait(lambda: open_sockets(sims[0]) == 1, "worker A to close its socket to gpu-1", workers, timeout=10)

            wait_until_finished(task_ids, workers)
            check_ran_once(task_ids, sims, servers, workers)
            assert a.alive() and b.alive(), describe(task_ids, workers)
            owners = watch.stop()
            # gpu-1 went to B. Once awake, A is a worker again and may be handed one server back (its share of
            # the pool), but no lease went back and forth more than that.
            assert owners[gpu1.pk][:2] == [a_owner, b_owner] and len(owners[gpu1.pk]) <= 3, owners
            assert owners[gpu2.pk] in ([b_owner], [b_owner, a_owner]), owners
            check_outputs(task_ids, media_root)

            # B still follows gpu-1 live: the simulator knows its socket under gpu-1's clientId, now or again after
            # a reconciliation at the latest (an orphaned socket receives nothing, not even `status`, and B's
            # tasks there would never be seen running, only found finished in /history by the timer).
            wait(
                lambda: connected(sims[0], gpu1),
                "worker B's socket to gpu-1 to be registered again after A closed its own (protocol §2.6)",
                workers,
                task_ids,
                timeout=RECONCILE_SECONDS + 5,
                interval=0.1,
                timelines_of=gpu1,
            )
        finally:
            watch.halt()
            for worker in workers:
                worker.close()


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_joins_gets_its_share_at_once_and_hands_it_back_when_it_leaves(
    alice_api, workflows, tmp_path, media_root
):
    # Long leases: a newcomer that gets servers within seconds was handed them, not let in by a lease's expiry.
    lease = 30
    workers = []
    watch = LeaseWatch()
    with ExitStack() as stack:
        try:
            sims = [stack.enter_context(SimulatorThread(time_scale=TIME_SCALE, name=f"sim-{i}")) for i in range(4)]
            servers = [Server.objects.create(name=f"gpu-{i}", base_url=sim.url) for i, sim in enumerate(sims)]
            pks = [server.pk for server in servers]
            watch.start()
            first = Worker("worker-1", tmp_path, media_root, lease_seconds=lease)
            workers.append(first)
            first_owner = first.owner()
            wait(lambda: held_by(pks) == dict.fromkeys(pks, first_owner), "worker 1 to lease all four", workers)
            task_ids = submit_batch(alice_api, 24, first_color=3000)
            wait(lambda: count(task_ids, status=TaskStatus.SUCCEEDED) >= 2, "the batch to be under way", workers,
                 task_ids, timeout=60)  # fmt: skip

            second = Worker("worker-2", tmp_path, media_root, lease_seconds=lease)
            workers.append(second)
            second_owner = second.owner()

            def split():
                owners = held_by(pks) or {}
                shares = sorted(list(owners.values()).count(owner) for owner in (first_owner, second_owner))
                return shares == [2, 2]

            wait(split, "the two workers to hold two servers each", workers, task_ids, timeout=15)
            wait_until_finished(task_ids, workers)
            check_ran_once(task_ids, sims, servers, workers)
            check_outputs(task_ids, media_root)
            diagnosis = describe(task_ids, workers)
            assert {Task.objects.get(pk=pk).server_id for pk in task_ids} == set(pks), diagnosis

            second.process.send_signal(signal.SIGTERM)
            assert second.process.wait(timeout=15) == 0, second.tail()
            wait(lambda: held_by(pks) == dict.fromkeys(pks, first_owner), "worker 1 to take all four back", workers,
                 timeout=15)  # fmt: skip
            owners = watch.stop()
            moved = [pk for pk in pks if owners[pk] != [first_owner]]
            assert len(moved) == 2, owners  # two servers went to worker 2 and came back, the others never moved
            # Each went to worker 2 once, and (the wait above) back to worker 1: nothing moved back and forth.
            assert all(owners[pk][:2] == [first_owner, second_owner] and len(owners[pk]) <= 3 for pk in moved), owners
        finally:
            watch.halt()
            for worker in workers:
                worker.close()
