"""
Which queued task goes to which server, and when. Plain functions over plain data, so the policy can be read,
tested and benchmarked apart from the sockets.

The policy, in order:
1. Fair share. Higher priority first; within a priority, users take turns (the user with the fewest tasks in
   flight first, then the one waiting longest), so one user's batch cannot starve another user's single task.
2. Capability. A task may only go to a server whose /object_info has every node class of its graph and every
   model file the graph names. When no accepting server can run it, the task says why instead of waiting silently.
3. Earliest finish. Each task goes, on paper, to the server where it would finish first: the work ahead of it
   (the running task's remainder, our pending tasks, other clients' queued prompts) plus itself, divided by the
   server's weight (its relative speed). It is sent only if that server has room now (its pipeline depth); if
   not, it waits for that server rather than being piled onto a slower one that would finish it later.
4. Pipelining. A server holds up to its pipeline depth (default 2): the running task and the next, so it never
   idles between tasks. The first task of a user with nothing in flight may use the slots above the depth up to
   max_in_flight and is sent to the front of the server's queue: it waits for at most the running task.
5. Affinity. A task pinned by an affinity lock goes to the pinned server while that server accepts work.
"""

from collections import defaultdict
from dataclasses import dataclass, field

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".onnx", ".sft")


@dataclass
class Slot:
    """A server as the planner sees it."""

    server_id: int
    name: str
    weight: float = 1.0
    depth: int = 2
    limit: int = 3
    in_flight: int = 0  # our tasks on it (submitted or running)
    running_left: float = 0.0  # what is left of the running job, in task units
    backlog: float = 0.0  # all work ahead of a new task at the back of its queue, in task units
    capabilities: dict | None = None
    local: bool = True  # held by this supervisor: it may send to it
    accepting: bool = True
    state: str = "online"  # as users read it when no server accepts: online, draining, offline, unknown...

    def finish(self, ahead):
        return (ahead + 1.0) / max(self.weight, 0.01)


@dataclass
class Candidate:
    task_id: object
    owner_id: int
    priority: int
    created_at: object
    graph: dict
    pinned_server: int | None = None
    keys: tuple = ()  # affinity keys: candidates sharing one follow each other within a plan too
    extra: dict = field(default_factory=dict)


@dataclass
class Plan:
    sends: list = field(default_factory=list)  # (candidate, slot, front)
    waiting: dict = field(default_factory=dict)  # task_id -> reason shown to the user


def summarize_object_info(object_info):
    """
    Keep what dispatch needs from /object_info: every node class, and for inputs that list model files, the
    files. A real server's object_info is megabytes; this is what is stored on the Server row.
    """
    classes = {}
    for name, info in (object_info or {}).items():
        files = {}
        inputs = (info or {}).get("input") or {}
        for section in ("required", "optional"):
            for input_name, spec in (inputs.get(section) or {}).items():
                choices = _choices(spec)
                if choices and any(isinstance(c, str) and c.lower().endswith(MODEL_EXTENSIONS) for c in choices):
                    files[input_name] = [c for c in choices if isinstance(c, str)]
        classes[name] = files
    return {"classes": classes}


def _choices(spec):
    if not isinstance(spec, list | tuple) or not spec:
        return None
    if isinstance(spec[0], list | tuple):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options") or [])
    return None


def missing_requirements(graph, capabilities):
    """What `graph` needs that a server with `capabilities` lacks: a list of short sentences (empty: it can run)."""
    if not capabilities or "classes" not in capabilities:
        return ["its node types are not known yet"]
    classes = capabilities["classes"]
    missing_classes, missing_files = set(), set()
    for node in graph.values():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        if class_type not in classes:
            missing_classes.add(str(class_type))
            continue
        files = classes[class_type]
        for input_name, value in (node.get("inputs") or {}).items():
            if (
                input_name in files
                and isinstance(value, str)
                and value.lower().endswith(MODEL_EXTENSIONS)
                and value not in files[input_name]
            ):
                missing_files.add(value)
    problems = []
    if missing_classes:
        problems.append("node types " + ", ".join(sorted(missing_classes)))
    if missing_files:
        problems.append("model files " + ", ".join(sorted(missing_files)))
    return problems


@dataclass(frozen=True)
class PoolVerdict:
    """Whether any enabled server of the pool can run a graph, as far as the pool's capabilities are known."""

    capable: tuple = ()  # names of servers that can run it
    unknown: tuple = ()  # names of servers whose capabilities are not known (never reached)
    lacking: tuple = ()  # (server name, what it lacks) for the servers that cannot

    @property
    def refused(self):
        """Every server is known and none can run it: nothing the hub waits for can change that."""
        return not self.capable and not self.unknown and bool(self.lacking)

    @property
    def hopeless_for_now(self):
        """No server known to be able to run it; some are not known yet."""
        return not self.capable and bool(self.unknown)

    def explain(self):
        """One sentence naming what is missing and where it was looked for."""
        by_problem = defaultdict(list)
        for name, problem in self.lacking:
            by_problem[problem].append(name)
        parts = [
            f"{_names(names)} {'lacks' if len(names) == 1 else 'lack'} {problem}"
            for problem, names in by_problem.items()
        ]
        if self.unknown:
            parts.append(f"what {_names(self.unknown)} can run is not known yet (never reached)")
        return "no server in the pool can run it: " + "; ".join(parts)


def _names(names):
    names = sorted(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def judge_pool(graph, servers, problems=missing_requirements):
    """
    A PoolVerdict of `graph` over `servers`: (name, capabilities) of every enabled server. `problems` is
    missing_requirements or a cache of it.
    """
    capable, unknown, lacking = [], [], []
    for name, capabilities in servers:
        if not capabilities or "classes" not in capabilities:
            unknown.append(name)
            continue
        lacks = problems(graph, capabilities)
        if lacks:
            lacking.append((name, " and ".join(lacks)))
        else:
            capable.append(name)
    return PoolVerdict(tuple(capable), tuple(unknown), tuple(lacking))


def fair_order(candidates, in_flight_by_user):
    """Priority first; within a priority, users take turns, the least served user first."""
    by_priority = defaultdict(lambda: defaultdict(list))
    for candidate in sorted(candidates, key=lambda c: (c.created_at, str(c.task_id))):
        by_priority[candidate.priority][candidate.owner_id].append(candidate)
    ordered = []
    for priority in sorted(by_priority, reverse=True):
        queues = by_priority[priority]
        users = sorted(queues, key=lambda u: (in_flight_by_user.get(u, 0), queues[u][0].created_at))
        depth = max(len(q) for q in queues.values())
        for index in range(depth):
            ordered.extend(queues[user][index] for user in users if index < len(queues[user]))
    return ordered


def not_accepting_reason(slots):
    """Why no server takes a task now, in words that tell a draining pool from one that is down."""
    if not slots:
        return "waiting: no server is online (the pool has no enabled server)"
    states = defaultdict(list)
    for slot in slots:
        states[slot.state].append(slot.name)
    said = "; ".join(f"{_names(names)} {state}" for state, names in sorted(states.items()))
    if set(states) == {"draining"}:
        return f"waiting: every server is draining, taking no new tasks until an operator ends it ({said})"
    if "draining" in states or "online" in states or "degraded" in states:
        return f"waiting: no server is taking new tasks ({said})"
    return f"waiting: no server is online ({said})"


def plan(candidates, slots, in_flight_by_user, *, user_limit=None, problems=missing_requirements):
    """
    Decide which candidates to send now and where; see the module docstring for the policy. `problems` is
    missing_requirements or a cache of it.
    """
    result = Plan()
    accepting = [slot for slot in slots if slot.accepting]
    load = {slot.server_id: slot.backlog for slot in slots}
    users = dict(in_flight_by_user)
    placed = {}  # affinity key -> server chosen earlier in this plan
    for candidate in fair_order(candidates, in_flight_by_user):
        owner_load = users.get(candidate.owner_id, 0)
        if user_limit is not None and owner_load >= user_limit:
            result.waiting[candidate.task_id] = (
                f"waiting: you have {owner_load} tasks on servers, the most one user may have at once"
            )
            continue
        if not accepting:
            result.waiting[candidate.task_id] = not_accepting_reason(slots)
            continue
        capable, reasons = [], []
        for slot in accepting:
            lacks = problems(candidate.graph, slot.capabilities)
            if lacks:
                reasons.append(f"{slot.name} lacks {' and '.join(lacks)}")
            else:
                capable.append(slot)
        if not capable:
            result.waiting[candidate.task_id] = "waiting: no online server can run it (" + "; ".join(reasons) + ")"
            continue
        pin = candidate.pinned_server or next((placed[k] for k in candidate.keys if k in placed), None)
        pinned = [slot for slot in capable if slot.server_id == pin]
        if pinned:
            capable = pinned
        first = owner_load == 0

        def finish(slot, first=first):
            return slot.finish(slot.running_left if first else load[slot.server_id])

        best = min(capable, key=lambda slot: (finish(slot), slot.in_flight, slot.server_id))
        load[best.server_id] += 1.0
        users[candidate.owner_id] = owner_load + 1
        placed.update(dict.fromkeys(candidate.keys, best.server_id))
        room = best.in_flight < (best.limit if first else best.depth)
        if room and best.local:
            best.in_flight += 1
            if first:
                best.running_left = best.running_left or 1.0
            result.sends.append((candidate, best, first and best.in_flight > 1))
    return result


def plan_naive(candidates, slots, turn=0):
    """
    What simple gateways do, kept for comparison in the benchmark: oldest task first, servers in turn, and a
    server gets a task only when it has none. Returns (Plan, the next turn).
    """
    result = Plan()
    order = sorted(candidates, key=lambda c: (c.created_at, str(c.task_id)))
    ring = [slot for slot in slots if slot.accepting]
    if not ring:
        return result, turn
    ring = ring[turn % len(ring) :] + ring[: turn % len(ring)]
    for slot in ring:
        turn += 1
        if not order:
            break
        if slot.local and slot.in_flight == 0 and not missing_requirements(order[0].graph, slot.capabilities):
            slot.in_flight += 1
            result.sends.append((order.pop(0), slot, False))
    return result, turn
