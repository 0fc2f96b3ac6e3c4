"""The database side of dispatch: what the planner is told about servers and queued tasks, and the claim."""

import time
import uuid
from collections import defaultdict
from dataclasses import replace
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists
from django.utils import timezone

from servers.backlog import Backlog
from servers.dispatch import Slot, judge_pool, plan, plan_naive
from servers.models import ACCEPTING_STATES, Lock, LockPurpose, Server, upstream_key
from tasks.models import ON_SERVER_STATUSES, Task, TaskEvent, TaskStatus, affinity_keys, binding, update_and_record


def slots_and_load(local, backlog, depths=None):
    """
    A Slot per enabled server (`local`: {server pk: Server} of the servers this process holds and can send to
    now) and the number of tasks each user has on servers. Capabilities come through `backlog`'s cache; `depths`
    are the pipeline depths the local servers need now (servers/pace.py), else their setting.
    """
    depths = depths or {}
    servers = list(Server.objects.enabled().defer("capabilities"))
    capabilities = backlog.capabilities_of(servers)
    on_server = Task.objects.filter(status__in=ON_SERVER_STATUSES).values_list(
        "server_id", "owner_id", "status", "progress"
    )
    per_server = defaultdict(list)
    per_user = defaultdict(int)
    for server_id, owner_id, status, progress in on_server:
        per_server[server_id].append((status, progress))
        per_user[owner_id] += 1
    slots = []
    for server in servers:
        fresh = local.get(server.pk, server)
        tasks = per_server.get(server.pk, [])
        running = [1.0 - progress for status, progress in tasks if status == TaskStatus.RUNNING]
        pending = sum(1 for status, _ in tasks if status != TaskStatus.RUNNING)
        running_left = max(running, default=0.0)
        if not running and (pending or server.foreign_queue):
            running_left = 1.0  # something is about to start
        slots.append(
            Slot(
                server_id=server.pk,
                name=server.name,
                weight=fresh.weight,
                depth=depths.get(server.pk, fresh.effective_depth),
                limit=max(fresh.max_in_flight, 1),
                in_flight=len(tasks),
                running_left=running_left,
                backlog=sum(running) + pending + server.foreign_queue,
                capabilities=capabilities.get(server.pk),
                local=server.pk in local,
                # Draining as the row says now, not as this process last copied it: a task queued after an
                # operator drained the server must not go there.
                accepting=not server.draining and (server.pk in local or server.state in ACCEPTING_STATES),
                state="draining" if server.draining else server.state,
            )
        )
    return slots, dict(per_user)


def affinity_pins():
    """
    {key: server pk} of the unexpired affinity locks. All are read: there are as many as tasks on servers use an
    upload or share a graph, not as many as are queued.
    """
    return dict(
        Lock.objects.filter(
            purpose=LockPurpose.AFFINITY, expires_at__gt=timezone.now(), server__isnull=False
        ).values_list("key", "server_id")
    )


def pin(found, pins):
    """Set each candidate's pinned server from `pins` (affinity_pins())."""
    for candidate in found:
        candidate.pinned_server = next((pins[key] for key in candidate.keys if key in pins), None)


def make_plan(local, horizon, policy="fair", turn=0, backlog=None, depths=None):
    """
    Snapshot the pool and plan; returns (Plan, turn). Sends go to `local` servers only. `backlog` is the
    supervisor's queue in memory (servers/backlog.py); without one the queue is read whole.

    A full pass, every Backlog.full_seconds, looks at `horizon` queued tasks of each user, so that every one of
    them is told why it waits. In between, a pass looks only as deep as the servers have room: a user's tasks
    beyond that cannot be sent in this pass anyway. When a local server is left with room while some task was
    kept for a busier one (earliest finish), the pass looks four times deeper, up to `horizon`, so the later
    tasks can fill it.
    """
    backlog = backlog if backlog is not None else Backlog()
    backlog.refresh()
    slots, per_user = slots_and_load(local, backlog, depths)
    limit = settings.COMFYHUB["USER_MAX_IN_FLIGHT"] or None
    depth = horizon
    if not backlog.full_pass_due():
        room = sum(max(0, slot.depth - slot.in_flight) for slot in slots if slot.accepting)
        depth = min(horizon, room + 1)
    pins = affinity_pins() if backlog.entries else {}
    while True:
        found = backlog.heads(depth)
        pin(found, pins)
        planned = [replace(slot) for slot in slots]  # plan() counts its sends on the slots
        if policy == "naive":
            return plan_naive(found, planned, turn)
        result = plan(found, planned, per_user, user_limit=limit, problems=backlog.problems)
        if depth >= horizon or not _left_room(found, planned, result) or not backlog.deeper_than(depth):
            break
        depth = min(horizon, depth * 4)
    unrunnable = fail_unrunnable(found, planned, result, backlog.problems)
    for task_id in unrunnable:
        backlog.discard(task_id)
    record_waiting([candidate for candidate in found if candidate.task_id not in unrunnable], result)
    return result, turn


def _left_room(found, slots, result):
    """A local server kept room below its depth while a candidate waits, on paper, for a busier server."""
    if not any(slot.local and slot.accepting and slot.in_flight < slot.depth for slot in slots):
        return False
    sent = {candidate.task_id for candidate, _, _ in result.sends}
    return any(c.task_id not in sent and c.task_id not in result.waiting for c in found)


# The waiting reasons under which a task may be one no server can run (not: draining, or its owner's limit).
NOT_RUNNABLE_YET = ("waiting: no online server can run it", "waiting: no server is online")


def fail_unrunnable(found, slots, result, problems):
    """
    Fail the queued tasks that no enabled server can run: at once when what every server can run is known (the
    same judgement as at submit, reached later: the graph came in while a server was not known yet), and after
    COMFYHUB_UNRUNNABLE_SECONDS while some server is still not known. Returns the ids of the tasks failed.
    Only tasks that wait for a capable server are judged, so the cost stays with the few that need it.
    """
    servers = [(slot.name, slot.capabilities) for slot in slots]
    deadline = timezone.now() - timedelta(seconds=settings.COMFYHUB["UNRUNNABLE_SECONDS"])
    failed = set()
    for candidate in found:
        reason = result.waiting.get(candidate.task_id, "")
        if not reason.startswith(NOT_RUNNABLE_YET):
            continue
        verdict = judge_pool(candidate.graph, servers, problems)
        if not (verdict.refused or (verdict.hopeless_for_now and candidate.created_at < deadline)):
            continue
        task = Task.objects.filter(pk=candidate.task_id, status=TaskStatus.QUEUED).first()
        explanation = verdict.explain()
        if verdict.hopeless_for_now:
            explanation += f"; gave up after waiting {settings.COMFYHUB['UNRUNNABLE_SECONDS']} s"
        if task is not None and task.mark_failed(
            "no_capable_server", explanation[0].upper() + explanation[1:], {"servers": dict(verdict.lacking)}
        ):
            failed.add(candidate.task_id)
    return failed


def record_waiting(found, result):
    """
    Tell the owners of queued tasks why they wait, when that changed (and clear it when it no longer holds): one
    UPDATE for all the tasks that now wait for the same reason.
    """
    from tasks.progress import emit_task_update

    sent = {candidate.task_id for candidate, _, _ in result.sends}
    changed = defaultdict(list)  # reason -> candidates
    for candidate in found:
        reason = result.waiting.get(candidate.task_id, "")
        if candidate.task_id not in sent and reason != candidate.extra.get("waiting_reason", ""):
            changed[reason].append(candidate)
    for reason, candidates in changed.items():
        ids = [candidate.task_id for candidate in candidates]
        if Task.objects.filter(pk__in=ids, status=TaskStatus.QUEUED).update(waiting_reason=reason):
            for candidate in candidates:
                # What the owner's feed needs to read the row again; one claimed meanwhile is read as it is now.
                task = Task(pk=candidate.task_id, owner_id=candidate.owner_id, status=TaskStatus.QUEUED)
                transaction.on_commit(lambda task=task: emit_task_update(task))
                candidate.extra["waiting_reason"] = reason


def claim(task_id, server, holder=None, margin=0.0):
    """
    Bind a planned task to `server`; None when another worker (or a cancel) got to it first, or when `holder`
    (the worker's lease owner) does not hold the server's upstream lease for `margin` seconds more: a worker that
    was frozen past its lease must not hand work to a server another worker now follows. The task remembers when
    the lease was seen (`lease_seen`, monotonic), so that the send right after need not ask again.
    """
    if connection.vendor == "postgresql":
        task = claim_in_one(task_id, server, holder, margin)
        if task is not None:
            pin_affinity(task, server)
    else:
        task = claim_in_transaction(task_id, server, holder, margin)
    if task is not None:
        task.lease_seen = time.monotonic() if holder is not None else None
    return task


def claim_in_transaction(task_id, server, holder, margin):
    """The claim elsewhere (SQLite): the lease and the row read, bound and pinned in one IMMEDIATE transaction."""
    with transaction.atomic():
        lease = Lock.held(LockPurpose.UPSTREAM, upstream_key(server.pk), holder, margin)
        if holder is not None and not lease.exists():
            return None
        task = Task.objects.filter(pk=task_id, status=TaskStatus.QUEUED).select_related("server").first()
        # The conditional UPDATE in bind() is the real guard. The row was read in this transaction, which holds
        # SQLite's write lock: its attempt count holds.
        if task is None or not task.bind(server, str(uuid.uuid4()), attempts=task.attempts + 1):
            return None
        pin_affinity(task, server)
    return task


def claim_in_one(task_id, server, holder, margin):
    """
    The claim on PostgreSQL in one statement: the task's conditional UPDATE (still queued, and `holder` holds the
    server's lease for `margin` more seconds) with its event, returning the row. No lease row is locked: a takeover
    needs the lease expired, which the margin rules out for the send that follows (servers/sending.py).
    """
    rows = Task.objects.filter(pk=task_id, status=TaskStatus.QUEUED)
    if holder is not None:
        rows = rows.filter(Exists(Lock.held(LockPurpose.UPSTREAM, upstream_key(server.pk), holder, margin)))
    prompt_id = str(uuid.uuid4())
    changes = {"last_event_at": timezone.now(), "status": TaskStatus.SUBMITTED, **binding(server, prompt_id)}
    event = TaskEvent(
        task_id=task_id, kind="submitted", from_status=TaskStatus.QUEUED, to_status=TaskStatus.SUBMITTED,
        server_id=server.pk, prompt_id=prompt_id, message=f"bound to {server.name}", detail={},
    )  # fmt: skip
    task = update_and_record(rows, changes, event, returning=True)
    if task is None:
        return None
    task.server = server
    from tasks.progress import emit_task_update

    transaction.on_commit(lambda: emit_task_update(task))
    return task


def pin_affinity(task, server):
    """Pin the task's uploads and exact graph to `server` while the owner's tasks that use them are pending."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.COMFYHUB["AFFINITY_SECONDS"])
    pins = [
        Lock(purpose=LockPurpose.AFFINITY, key=key, owner=f"user:{task.owner_id}", server=server, acquired_at=now,
             expires_at=expires)
        for key in affinity_keys(task)
    ]  # fmt: skip
    # One statement for all of them: INSERT … ON CONFLICT (purpose, key) DO UPDATE.
    Lock.objects.bulk_create(
        pins, update_conflicts=True, unique_fields=["purpose", "key"], update_fields=["owner", "server", "expires_at"]
    )
