"""
ComfyUI 0.26's `/api/jobs` (comfyui-protocol.md §7.5), built like upstream's comfy_execution/jobs.py from the
in-memory queue and history, so it knows nothing a restart lost, and nothing of a pending job cancelled before
it ran: that job vanishes (404), which is why a client has to record such a cancel itself.

Mixed into Simulator; the routes exist only when the simulator plays 0.26 or later (404 on 0.3.64).
"""

from __future__ import annotations

import heapq
import logging

from aiohttp import web

from comfysim.protocol import is_canonical_uuid

logger = logging.getLogger(__name__)

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "pending", "in_progress", "completed", "failed", "cancelled"
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_FIELDS = ("created_at", "execution_duration")
SORT_ORDERS = ("desc", "asc")
NOT_FOUND = {"error": "Job not found"}


def _pruned(job: dict) -> dict:
    return {key: value for key, value in job.items() if value is not None}


def queue_job(item: list, status: str) -> dict:
    return _pruned(
        {"id": item[1], "status": status, "priority": item[0], "create_time": item[3].get("create_time"),
         "outputs_count": 0}
    )  # fmt: skip


def history_status(entry: dict) -> str:
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    if messages and messages[-1][0] == "execution_interrupted":
        return CANCELLED  # by /interrupt or by a cancel of the running job
    return FAILED if status.get("status_str") == "error" else COMPLETED


def _outputs_summary(outputs: dict) -> tuple[int, dict | None]:
    """How many output files, and the first one worth a preview (an output file before a temp one)."""
    count, preview, fallback = 0, None, None
    for node_id, node_outputs in outputs.items():
        for media_type, items in (node_outputs or {}).items():
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if media_type in ("images", "video", "audio") and preview is None:
                    enriched = {**item, "nodeId": node_id, "mediaType": media_type}
                    if item.get("type") == "output":
                        preview = enriched
                    elif fallback is None:
                        fallback = enriched
    return count, preview or fallback


def history_job(prompt_id: str, entry: dict, *, detail: bool = False) -> dict:
    number, _, prompt, extra_data, _ = entry["prompt"]
    start = end = error = None
    for event, data in entry["status"]["messages"]:
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if event == "execution_error" else None
    count, preview = _outputs_summary(entry["outputs"])
    job = _pruned(
        {"id": prompt_id, "status": history_status(entry), "priority": number,
         "create_time": extra_data.get("create_time"), "execution_start_time": start, "execution_end_time": end,
         "outputs_count": count, "preview_output": preview}
    )  # fmt: skip
    if detail:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = entry["status"]
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
        if error is not None:
            job["execution_error"] = error
    return job


def _duration(job: dict) -> int:
    start, end = job.get("execution_start_time"), job.get("execution_end_time")
    return end - start if start and end else 0


def _parse_list_query(query) -> tuple[dict | None, str | None]:
    """The list's filters, or the sentence that says what is wrong with them."""
    statuses = [s.strip() for s in query.get("status", ",".join(STATUSES)).split(",") if s.strip()]
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown or not statuses:
        return None, f"Invalid status value(s): {', '.join(unknown) or '(none)'}. Valid values: {', '.join(STATUSES)}"
    sort_by, sort_order = query.get("sort_by", "created_at"), query.get("sort_order", "desc")
    if sort_by not in SORT_FIELDS:
        return None, f"sort_by must be one of: {', '.join(SORT_FIELDS)}"
    if sort_order not in SORT_ORDERS:
        return None, f"sort_order must be one of: {', '.join(SORT_ORDERS)}"
    numbers = {}
    for name, default, minimum in (("limit", None, 1), ("offset", "0", 0)):
        raw = query.get(name, default)
        if raw is None:
            numbers[name] = None
            continue
        try:
            numbers[name] = int(raw)
        except ValueError:
            numbers[name] = None
        if numbers[name] is None or numbers[name] < minimum:
            return None, f"{name} must be an integer of at least {minimum}"
    return {"statuses": statuses, "sort_by": sort_by, "sort_order": sort_order, **numbers}, None


class JobsRoutes:
    """Mixed into Simulator: GET /api/jobs[/{id}], POST /api/jobs/{id}/cancel, POST /api/jobs/cancel."""

    def _jobs_routes(self) -> list[tuple]:
        return [
            ("GET", "/api/jobs", self._list_jobs),
            ("GET", "/api/jobs/{job_id}", self._get_job),
            ("POST", "/api/jobs/cancel", self._cancel_jobs),
            ("POST", "/api/jobs/{job_id}/cancel", self._cancel_job),
        ]

    def _all_jobs(self, statuses) -> list[dict]:
        running, pending = self.queue_snapshot()
        jobs = [queue_job(item, IN_PROGRESS) for item in running if IN_PROGRESS in statuses]
        jobs += [queue_job(item, PENDING) for item in pending if PENDING in statuses]
        for prompt_id, entry in self._history.items():
            job = history_job(prompt_id, entry)
            if job["status"] in statuses:
                jobs.append(job)
        return jobs

    async def _list_jobs(self, request: web.Request) -> web.Response:
        options, problem = _parse_list_query(request.query)
        if problem is not None:
            return web.json_response({"error": problem}, status=400)
        jobs = self._all_jobs(options["statuses"])
        key = _duration if options["sort_by"] == "execution_duration" else (lambda job: job.get("create_time", 0))
        jobs.sort(key=key, reverse=options["sort_order"] == "desc")
        total, offset, limit = len(jobs), options["offset"], options["limit"]
        page = jobs[offset:] if limit is None else jobs[offset : offset + limit]
        pagination = {"offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total}
        return web.json_response({"jobs": page, "pagination": pagination})

    async def _get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if not is_canonical_uuid(job_id):
            return web.json_response(NOT_FOUND, status=404)
        if job_id in self._history:
            return web.json_response(history_job(job_id, self._history[job_id], detail=True))
        running, pending = self.queue_snapshot()
        for items, status in ((running, IN_PROGRESS), (pending, PENDING)):
            for item in items:
                if item[1] == job_id:
                    return web.json_response(queue_job(item, status))
        return web.json_response(NOT_FOUND, status=404)

    def _cancel(self, job_id: str) -> bool:
        """Check and act in one step of the loop: a pending job leaves the queue without a trace, the running
        one is interrupted at its next node boundary; a finished or unknown one is left alone."""
        cancelled = False
        kept = [entry for entry in self._pending if entry[1] != job_id]
        if len(kept) != len(self._pending):
            self._pending = kept
            heapq.heapify(self._pending)
            self._queue_updated()
            cancelled = True
        if self._running is not None and self._running[1] == job_id:
            self._interrupt_requested = True
            cancelled = True
        if cancelled:
            logger.info("Simulator %s: job %s cancelled", self.name, job_id)
        return cancelled

    async def _cancel_job(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": self._cancel(request.match_info["job_id"])})

    async def _cancel_jobs(self, request: web.Request) -> web.Response:
        body = await request.json()
        job_ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(job_ids, list):
            return web.json_response({"error": "job_ids must be a list of job ids"}, status=400)
        invalid = [job_id for job_id in job_ids if not is_canonical_uuid(job_id)]
        if invalid:
            return web.json_response({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status=400)
        results = [self._cancel(job_id) for job_id in job_ids]
        return web.json_response({"cancelled": any(results)})
