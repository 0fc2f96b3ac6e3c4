"""The figures bench_sockets prints for one run, and the side-by-side table of several runs."""

import statistics

from bench.live_load import bucket_quantile, longest
from comfyhub.harness import percentile


def summarize(f):
    """The numbers of one run, flat: what report() writes and table() compares."""
    rec, tasks = f["recorder"], f["tasks"]
    done = [t for t in tasks if t[4] == "succeeded"]
    runs = [(t[2], t[3]) for t in tasks if t[2] and t[3]]
    task_seconds = sum(end - start for start, end in runs)
    accepted = [(t[1] - t[0]) * 1000 for t in tasks if t[1]]
    progress = rec.latencies.get("progress") or rec.latencies.get("row") or []
    previews = rec.per_task("preview")
    rates = [(len(times) - 1) / (times[-1] - times[0]) for times in previews.values() if len(times) > 2]
    facts = rec.per_task("progress") or rec.per_task("row")
    receiving = [count for count in rec.frames.values() if count]
    s = {
        "tasks": len(tasks), "done": len(done), "concurrent": most_at_once(runs), "task_seconds": task_seconds,
        "accepted_p50": percentile(accepted, 50), "accepted_p99": percentile(accepted, 99),
        "opened": f["opened"], "sockets": f["sockets"], "open_time": f["open_time"],
        "progress_kind": "progress" if rec.latencies.get("progress") else "row",
        "progress_n": len(progress), "progress_p50": percentile(progress, 50),
        "progress_p90": percentile(progress, 90), "progress_p99": percentile(progress, 99),
        "progress_max": max(progress, default=float("nan")),
        "preview_n": len(rec.latencies.get("preview", [])),
        "preview_p50": percentile(rec.latencies.get("preview", []), 50),
        "preview_p99": percentile(rec.latencies.get("preview", []), 99),
        "preview_rate": statistics.median(rates) if rates else float("nan"),
        "progress_facts": sum(len(v) for v in facts.values()) / max(len(tasks), 1),
        "preview_facts": sum(len(v) for v in previews.values()) / max(len(tasks), 1),
        "frames": sum(receiving), "receiving": len(receiving),
        "frames_per_socket": statistics.mean(receiving) if receiving else 0,
        "lag_p50": bucket_quantile(f["lag"], 0.5) * 1000, "lag_p99": bucket_quantile(f["lag"], 0.99) * 1000,
        "lag_mean": f["lag"]["sum"] / f["lag"]["count"] * 1000 if f["lag"]["count"] else float("nan"),
        "lag_n": f["lag"]["count"], "client_lag_p99": bucket_quantile(f["client_lag"], 0.99) * 1000,
        "rss_rest": f["rss_rest"] / 1024, "rss_sockets": f["rss_sockets"] / 1024,
    }
    for kind in ("progress", "preview", "row", "other"):
        sizes = rec.sizes.get(kind, [])
        s[f"{kind}_frames"] = len(sizes)
        s[f"{kind}_bytes_p99"] = percentile(sizes, 99)
        s[f"{kind}_bytes_max"] = max(sizes, default=float("nan"))
    if f.get("upstream_lag"):
        s["upstream_lag_p50"] = bucket_quantile(f["upstream_lag"], 0.5) * 1000
        s["upstream_lag_p99"] = bucket_quantile(f["upstream_lag"], 0.99) * 1000
    for command, label in (("serve", "daphne"), ("run_upstream", "upstream")):
        pauses = f.get("gc", {}).get(command)
        if pauses:
            full = pauses.get("2", {"buckets": [], "sum": 0.0, "count": 0.0})
            s[f"{label}_gc_full"] = full["count"]
            s[f"{label}_gc_full_longest"] = longest(full) * 1000
            s[f"{label}_gc_ms"] = sum(h["sum"] for h in pauses.values()) * 1000
    before, after = f["before"], f["after"]
    if before["pg"]:
        pg = {key: after["pg"][key] - before["pg"][key] for key in before["pg"]}
        s["task_updates"] = pg["task_updates"] / max(len(tasks), 1)
        s["task_updates_per_s"] = pg["task_updates"] / task_seconds if task_seconds else float("nan")
        s["commits"] = (pg["commits"] - 1) / max(len(tasks), 1)
        s["rows_written"] = pg["rows_written"] / max(len(tasks), 1)
    if before["redis"]:
        s["redis_total"] = (after["redis"]["total"] - before["redis"]["total"]) / max(len(tasks), 1)
        s["redis_publish"] = (after["redis"]["publish"] - before["redis"]["publish"]) / max(len(tasks), 1)
        s["redis_eval"] = (after["redis"]["eval"] - before["redis"]["eval"]) / max(len(tasks), 1)
    return s


def most_at_once(runs):
    edges = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])
    running = best = 0
    for _, step in edges:
        running += step
        best = max(best, running)
    return best


def report(f):
    s = f["summary"] = summarize(f)
    lines = [
        f"tasks: {s['done']} of {s['tasks']} succeeded, at most {s['concurrent']} running at once, "
        f"{s['task_seconds']:.0f} task-seconds of running; submit -> server queue p50 {s['accepted_p50']:.0f} ms, "
        f"p99 {s['accepted_p99']:.0f} ms",
        f"browser sockets: {s['opened']} of {s['sockets']} open in {s['open_time']:.1f} s; "
        f"{s['receiving']} (the task owners' windows) received {s['frames']} frames, "
        f"{s['frames_per_socket']:.0f} a socket",
        f"upstream progress -> websocket frame ({s['progress_kind']} fragments): p50 {s['progress_p50']:.0f} ms, "
        f"p90 {s['progress_p90']:.0f} ms, p99 {s['progress_p99']:.0f} ms, max {s['progress_max']:.0f} ms "
        f"({s['progress_n']} samples; {s['progress_facts']:.0f} distinct progress pushes a task)",
        f"preview -> websocket frame: p50 {s['preview_p50']:.0f} ms, p99 {s['preview_p99']:.0f} ms "
        f"({s['preview_n']} samples; {s['preview_facts']:.0f} previews a task, {s['preview_rate']:.2f} a second "
        "a task while sampling, median)",
        "frame sizes (bytes, p99 / max): " + ", ".join(
            f"{kind} {s[f'{kind}_bytes_p99']:.0f} / {s[f'{kind}_bytes_max']:.0f} ({s[f'{kind}_frames']} frames)"
            for kind in ("progress", "preview", "row") if s[f"{kind}_frames"]
        ),
        f"Daphne event-loop lag over the run: p50 {s['lag_p50']:.1f} ms, p99 {s['lag_p99']:.1f} ms, "
        f"mean {s['lag_mean']:.1f} ms ({s['lag_n']:.0f} wake-ups of a 50 ms sleep; from histogram buckets); "
        f"load client's own loop lag p99 {s['client_lag_p99']:.1f} ms",
        *([f"run_upstream event-loop lag over the run: p50 {s['upstream_lag_p50']:.1f} ms, "
           f"p99 {s['upstream_lag_p99']:.1f} ms"] if "upstream_lag_p99" in s else []),
        *[f"{name}'s garbage collector over the run: {s[f'{label}_gc_full']:.0f} full collections (the longest "
          f"<= {s[f'{label}_gc_full_longest']:.0f} ms), {s[f'{label}_gc_ms']:.0f} ms of pauses in all"
          for name, label in (("Daphne", "daphne"), ("run_upstream", "upstream")) if f"{label}_gc_full" in s],
        f"Daphne memory: {s['rss_rest']:.0f} MiB at rest, {s['rss_sockets']:.0f} MiB with the sockets open",
    ]
    if "task_updates" in s:
        lines.append(
            f"PostgreSQL, a task: {s['task_updates']:.1f} task-row UPDATEs ({s['task_updates_per_s']:.2f} a "
            f"second of running), {s['commits']:.1f} commits, {s['rows_written']:.1f} rows written (all tables)"
        )
    if "redis_total" in s:
        lines.append(
            f"Redis, a task: {s['redis_total']:.0f} commands, {s['redis_publish']:.0f} PUBLISH, "
            f"{s['redis_eval']:.0f} EVAL/EVALSHA (the whole server: other clients count too)"
        )
    return lines


ROWS = [
    ("progress -> frame p50 / p99 (ms)", "{progress_p50:.0f} / {progress_p99:.0f}"),
    ("  samples; pushes a task", "{progress_n}; {progress_facts:.0f}"),
    ("preview -> frame p50 / p99 (ms)", "{preview_p50:.0f} / {preview_p99:.0f}"),
    ("previews a second a task", "{preview_rate:.2f}"),
    ("progress frame p99 / max (B)", "{progress_bytes_p99:.0f} / {progress_bytes_max:.0f}"),
    ("preview frame p99 / max (B)", "{preview_bytes_p99:.0f} / {preview_bytes_max:.0f}"),
    ("row frame p99 / max (B)", "{row_bytes_p99:.0f} / {row_bytes_max:.0f}"),
    ("frames a receiving socket", "{frames_per_socket:.0f}"),
    ("Daphne loop lag p50 / p99 (ms)", "{lag_p50:.1f} / {lag_p99:.1f}"),
    ("run_upstream loop lag p50 / p99 (ms)", "{upstream_lag_p50:.1f} / {upstream_lag_p99:.1f}"),
    ("client loop lag p99 (ms)", "{client_lag_p99:.1f}"),
    ("Daphne full GCs (longest, ms); all GC ms",
     "{daphne_gc_full:.0f} (<= {daphne_gc_full_longest:.0f}); {daphne_gc_ms:.0f}"),
    ("run_upstream full GCs (longest, ms); all GC ms",
     "{upstream_gc_full:.0f} (<= {upstream_gc_full_longest:.0f}); {upstream_gc_ms:.0f}"),
    ("task-row UPDATEs a task (a second)", "{task_updates:.1f} ({task_updates_per_s:.2f})"),
    ("commits a task", "{commits:.1f}"),
    ("Redis commands a task (PUBLISH / EVAL)", "{redis_total:.0f} ({redis_publish:.0f} / {redis_eval:.0f})"),
    ("Daphne MiB at rest / sockets", "{rss_rest:.0f} / {rss_sockets:.0f}"),
    ("tasks done; most at once", "{done}/{tasks}; {concurrent}"),
]


def table(results):
    lines = ["| figure | " + " | ".join(f["label"] for f in results) + " |",
             "|---" * (len(results) + 1) + "|"]
    for name, fmt in ROWS:
        cells = []
        for f in results:
            try:
                cells.append(fmt.format(**f["summary"]))
            except KeyError:
                cells.append("n/a")
        if any(cell != "n/a" for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
