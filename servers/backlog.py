"""
The queued tasks as one supervisor holds them in memory, so that a wake-up plans over what changed instead of
reading and sorting the whole queue.

- Loaded whole when the supervisor starts and again every REBUILD_SECONDS: that brings in what another process
  changed without putting a task back in the queue (a cancel, a claim by another worker, a priority edited in the
  admin).
- Between rebuilds, each dispatch pass catches up with one indexed query: the queued tasks whose last event is
  newer than the last look (a submission, a task put back in the queue). Its margin covers transactions that
  commit a little after they stamped the row.
- A task this process claims leaves at once. One it failed to claim is looked up on the next pass and leaves if it
  is no longer queued.

Of a graph the planner needs only the node classes and the model files it names (servers/dispatch.py
missing_requirements). Each task keeps that much, shared between tasks that need the same, so a queue of 100,000
costs little memory, and a server's verdict on it is worked out once per server, not once per task and wake-up.
"""

import bisect
import time
from collections import defaultdict
from datetime import timedelta
from types import SimpleNamespace

from django.utils import timezone

from servers.dispatch import MODEL_EXTENSIONS, Candidate, missing_requirements
from servers.models import Server
from tasks.models import Task, TaskStatus, affinity_keys

REBUILD_SECONDS = 30.0
FULL_SECONDS = 15.0
MARGIN = timedelta(seconds=2)
FIELDS = ("id", "owner_id", "priority", "created_at", "waiting_reason", "graph_hash", "image_inputs")
LIGHT = ("id", "owner_id", "priority", "created_at")  # what a rebuild reads of a task already known
CHUNK = 2000


class Backlog:
    def __init__(self, rebuild_seconds=REBUILD_SECONDS, full_seconds=FULL_SECONDS):
        self.rebuild_seconds = rebuild_seconds
        self.full_seconds = full_seconds
        self.next_full = 0.0
        self.entries = {}  # task id -> Candidate (its graph: the shared requirements)
        self.lines = defaultdict(list)  # (priority, owner id) -> sorted [(created_at, str(task id), task id)]
        self.mark = None  # when the last look at the database began
        self.next_rebuild = 0.0
        self.recheck = set()  # ids whose claim failed: still queued?
        self.shapes = {}  # requirements, interned
        self.verdicts = {}  # id(capabilities) -> (capabilities, {id(requirements): problems})
        self.capabilities = {}  # server pk -> (capabilities_at, capabilities)

    def __len__(self):
        return len(self.entries)

    # --- keeping up with the database ----------------------------------------------------------------------

    def refresh(self):
        """Bring the backlog up to date: a rebuild when one is due, else the changes since the last look."""
        if time.monotonic() >= self.next_rebuild:
            self.rebuild()
        else:
            self.catch_up()

    def rebuild(self):
        mark = timezone.now()
        known = self.entries
        self.entries, self.lines = {}, defaultdict(list)
        unknown = []
        for task_id, owner_id, priority, created_at in Task.objects.queued().values_list(*LIGHT).iterator(CHUNK):
            entry = known.get(task_id)
            if entry is None or entry.owner_id != owner_id:
                unknown.append(task_id)
            else:
                entry.priority, entry.created_at = priority, created_at
                self._put(entry)
        for start in range(0, len(unknown), CHUNK):
            self._load(list(Task.objects.filter(pk__in=unknown[start : start + CHUNK]).values_list(*FIELDS)))
        self.recheck.clear()
        self.mark = mark
        self.next_rebuild = time.monotonic() + self.rebuild_seconds
        # What was worked out for capabilities that no server has any more goes.
        current = {id(capabilities) for _, capabilities in self.capabilities.values()}
        self.verdicts = {key: held for key, held in self.verdicts.items() if key in current}

    def catch_up(self):
        mark = timezone.now()
        if self.recheck:
            gone = Task.objects.filter(pk__in=list(self.recheck)).exclude(status=TaskStatus.QUEUED)
            for task_id in gone.values_list("id", flat=True):
                self.discard(task_id)
            self.recheck.clear()
        rows = Task.objects.queued().filter(last_event_at__gte=self.mark - MARGIN).values_list(*FIELDS)
        self._load([row for row in rows if row[0] not in self.entries])
        self.mark = mark

    def _load(self, rows):
        """Add `rows` (FIELDS), reading their graphs in chunks."""
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            graphs = dict(Task.objects.filter(pk__in=[row[0] for row in chunk]).values_list("id", "graph"))
            for row in chunk:
                if row[0] in graphs:
                    self._add(row, self.requirements(graphs[row[0]]))

    def _add(self, row, requirements):
        task_id, owner_id, priority, created_at, waiting_reason, graph_hash, image_inputs = row
        keys = affinity_keys(SimpleNamespace(owner_id=owner_id, graph_hash=graph_hash, image_inputs=image_inputs))
        self._put(Candidate(
            task_id=task_id, owner_id=owner_id, priority=priority, created_at=created_at, graph=requirements,
            keys=tuple(keys), extra={"waiting_reason": waiting_reason},
        ))  # fmt: skip

    def _put(self, entry):
        self.entries[entry.task_id] = entry
        place = (entry.created_at, str(entry.task_id), entry.task_id)
        bisect.insort(self.lines[(entry.priority, entry.owner_id)], place)

    def discard(self, task_id):
        """The task left the queue (claimed, failed, gone)."""
        entry = self.entries.pop(task_id, None)
        if entry is None:
            return
        line = self.lines[(entry.priority, entry.owner_id)]
        index = bisect.bisect_left(line, (entry.created_at, str(task_id)))
        if index < len(line) and line[index][1] == str(task_id):
            del line[index]
        if not line:
            del self.lines[(entry.priority, entry.owner_id)]

    def doubt(self, task_id):
        """A claim of the task failed: another process may have it, or it was cancelled. Looked up next pass."""
        self.recheck.add(task_id)

    # --- what the planner reads ---------------------------------------------------------------------------

    def full_pass_due(self):
        """True once every `full_seconds` (and at first): the caller then plans over all it may look at."""
        if time.monotonic() < self.next_full:
            return False
        self.next_full = time.monotonic() + self.full_seconds
        return True

    def deeper_than(self, depth):
        """Whether some user has more than `depth` queued tasks at a priority."""
        return any(len(line) > depth for line in self.lines.values())

    def heads(self, depth):
        """The first `depth` queued tasks of each user at each priority (a user's later ones cannot go before)."""
        return [self.entries[task_id] for line in self.lines.values() for _, _, task_id in line[:depth]]

    def requirements(self, graph):
        """What dispatch reads of `graph`: each node's class and the model files it names, interned."""
        nodes = []
        for node in (graph or {}).values():
            if isinstance(node, dict):
                files = sorted(
                    (name, value)
                    for name, value in (node.get("inputs") or {}).items()
                    if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)
                )
                nodes.append((str(node.get("class_type")), tuple(files)))
        shape = tuple(sorted(set(nodes)))
        found = self.shapes.get(shape)
        if found is None:
            found = self.shapes[shape] = {
                str(n): {"class_type": class_type, "inputs": dict(files)} for n, (class_type, files) in enumerate(shape)
            }
        return found

    def capabilities_of(self, servers):
        """{pk: capabilities} of `servers` (read without them): read again only when their capabilities_at moved."""
        stale = [
            server.pk for server in servers
            if server.pk not in self.capabilities or self.capabilities[server.pk][0] != server.capabilities_at
        ]  # fmt: skip
        if stale:
            rows = Server.objects.filter(pk__in=stale).values_list("pk", "capabilities_at", "capabilities")
            for pk, capabilities_at, capabilities in rows:
                self.capabilities[pk] = (capabilities_at, capabilities)
        return {server.pk: self.capabilities[server.pk][1] for server in servers if server.pk in self.capabilities}

    def problems(self, graph, capabilities):
        """missing_requirements(graph, capabilities), worked out once per requirements and capabilities."""
        held = self.verdicts.get(id(capabilities))
        if held is None or held[0] is not capabilities:
            # The capabilities are held here too, so that their id cannot be reused while this is kept.
            held = self.verdicts[id(capabilities)] = (capabilities, {})
        verdicts = held[1]
        found = verdicts.get(id(graph))
        if found is None:
            found = verdicts[id(graph)] = missing_requirements(graph, capabilities)
        return found
