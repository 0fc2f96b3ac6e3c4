"""
The load client of bench_sockets and what it counts: browser sockets on /ws/tasks/, the latency of each live
fragment they receive, frame sizes by kind, and the counters read around a run (the hub's event-loop lag from
/metrics, PostgreSQL's row and commit statistics, Redis' command counts). No Django here: it runs in the
benchmark's own process, never in the hub's.
"""

import asyncio
import re
import time
from collections import Counter, defaultdict

from websockets.asyncio.client import connect

from comfyhub import looplag

# A live fragment with its upstream time: the progress part (`-live`), the preview (`-preview`) or, on the old
# path, the whole row. Base64 never contains '>', so `[^>]*?` stays inside one tag.
FRAGMENT = re.compile(r'id="task-([0-9a-f-]{36})(-live|-preview)?"[^>]*?data-upstream-at="([0-9.]+)"')
KINDS = {"-live": "progress", "-preview": "preview", "": "row"}
LAG_SAMPLE = re.compile(r'^comfyhub_event_loop_lag_seconds_(bucket|sum|count)(?:\{le="([^"]+)"\})? (\S+)$', re.M)


def frame_kind(frame):
    """What a frame mainly carries: a preview image, a whole row (status change), progress, or something else."""
    if 'class="task__preview"' in frame and 'src="data:' in frame:
        return "preview"
    if "<article" in frame:
        return "row"
    if "task__live" in frame:
        return "progress"
    return "other"


class Recorder:
    """Everything the sockets of one run received."""

    def __init__(self):
        self.ready_at = time.time()
        self.latencies = defaultdict(list)  # kind -> [ms]
        self.sizes = defaultdict(list)  # frame kind -> [bytes]
        self.facts = defaultdict(set)  # (task, kind) -> {upstream_at}
        self.frames = Counter()  # socket index -> frames
        self.seen = set()
        self.opened = []

    def frame(self, index, frame, now):
        if isinstance(frame, bytes):
            frame = frame.decode("utf-8", "replace")
        self.frames[index] += 1
        self.sizes[frame_kind(frame)].append(len(frame.encode()))
        for task_id, suffix, at in FRAGMENT.findall(frame):
            kind, upstream = KINDS[suffix], float(at)
            key = (index, task_id, kind, at)
            if upstream > self.ready_at and key not in self.seen:
                self.seen.add(key)
                self.latencies[kind].append((now - upstream) * 1000)
                self.facts[(task_id, kind)].add(upstream)

    def per_task(self, kind):
        """{task: sorted upstream times} of the distinct facts of `kind` delivered to any window."""
        return {task: sorted(times) for (task, k), times in self.facts.items() if k == kind}


async def open_sockets(port, sessions, per_user, recorder, handshakes=50):
    """Opens per_user sockets for each session, at most `handshakes` at a time; returns the listening tasks."""
    gate = asyncio.Semaphore(handshakes)

    async def listen(index, session):
        async with gate:
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws/tasks/",
                additional_headers={"Cookie": f"sessionid={session}", "Origin": f"http://127.0.0.1:{port}"},
                max_size=None, open_timeout=60,
            )
        async with ws:
            recorder.opened.append(time.monotonic())
            async for frame in ws:
                recorder.frame(index, frame, time.time())

    sockets = [session for session in sessions for _ in range(per_user)]
    return [asyncio.create_task(listen(n, session)) for n, session in enumerate(sockets)]


def lag_buckets(text):
    """{"buckets": [(le, cumulative count)], "sum", "count"} of the loop-lag histogram in a /metrics page."""
    buckets, totals = [], {"sum": 0.0, "count": 0.0}
    for part, le, value in LAG_SAMPLE.findall(text):
        if part == "bucket":
            buckets.append((float("inf") if le == "+Inf" else float(le), float(value)))
        else:
            totals[part] = float(value)
    return {"buckets": sorted(buckets), **totals}


GC_SAMPLE = re.compile(
    r'^bench_gc_pause_seconds_(bucket|sum|count)\{generation="(\d)"(?:,le="([^"]+)")?\} (\S+)$', re.M
)


def gc_pauses(text):
    """{generation: histogram as lag_buckets() gives it} of the collector-pause histogram a hub process wrote."""
    found = {}
    for part, generation, le, value in GC_SAMPLE.findall(text):
        histogram = found.setdefault(generation, {"buckets": [], "sum": 0.0, "count": 0.0})
        if part == "bucket":
            histogram["buckets"].append((float("inf") if le == "+Inf" else float(le), float(value)))
        else:
            histogram[part] = float(value)
    for histogram in found.values():
        histogram["buckets"].sort()
    return found


def gc_delta(before, after):
    empty = {"buckets": [], "sum": 0.0, "count": 0.0}
    return {generation: lag_delta(before.get(generation, empty), histogram) for generation, histogram in after.items()}


def longest(histogram):
    """The upper bound of the bucket the longest observation fell in (seconds); 0 when there was none."""
    for le, count in histogram["buckets"]:
        if count >= histogram["count"]:
            return 0.0 if not histogram["count"] else le
    return float("inf")


def lag_delta(before, after):
    earlier = dict(before["buckets"])
    return {
        "buckets": [(le, count - earlier.get(le, 0.0)) for le, count in after["buckets"]],
        "sum": after["sum"] - before["sum"],
        "count": after["count"] - before["count"],
    }


def bucket_quantile(histogram, q):
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in (seconds); NaN if empty."""
    buckets, total = histogram["buckets"], histogram["count"]
    if not total or not buckets:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


class LoopLagProbe:
    """The load client's own event-loop lag: if it is large, the client, not the hub, adds to the latencies."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Histogram

        registry = CollectorRegistry()
        self.histogram = Histogram("client_lag_seconds", "", buckets=looplag.BUCKETS, registry=registry)
        self.task = asyncio.create_task(looplag.measure(self.histogram))

    def stop(self):
        self.task.cancel()
        samples = {(s.name, s.labels.get("le")): s.value for s in self.histogram.collect()[0].samples}
        buckets = sorted((float(le), v) for (name, le), v in samples.items() if name.endswith("_bucket"))
        return {"buckets": buckets, "sum": samples[("client_lag_seconds_sum", None)],
                "count": samples[("client_lag_seconds_count", None)]}


def postgres_counts(url):
    """Row and transaction counters of the database `url` names (its own statistics, no one else's)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(n_tup_upd) FILTER (WHERE relname = 'tasks_task'), 0),"
            " coalesce(sum(n_tup_ins) FILTER (WHERE relname = 'tasks_task'), 0),"
            " coalesce(sum(n_tup_upd + n_tup_ins + n_tup_del), 0) FROM pg_stat_user_tables"
        ).fetchone()
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]
    # The benchmark's own connection commits too: subtract one per reading when comparing.
    return {"task_updates": int(row[0]), "task_inserts": int(row[1]), "rows_written": int(row[2]),
            "commits": int(commits)}


def redis_counts(url):
    """Commands this Redis server ran so far (the whole server: other clients count too)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        total = client.info("stats")["total_commands_processed"]
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}
    return {"total": total, "publish": calls.get("publish", 0),
            "eval": calls.get("eval", 0) + calls.get("evalsha", 0), "bzpopmin": calls.get("bzpopmin", 0)}
