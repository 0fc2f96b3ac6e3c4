"""
An asyncio client for one ComfyUI server: HTTP through httpx, the event stream through websockets.

No ORM here. Every error is a ComfyError whose `permanent` flag tells the caller whether trying again can help:
ComfyRejected (the server said no: a 400 with ComfyUI's error shape, a 404) is permanent; ComfyUnavailable
(refused connection, timeout, 5xx, a reply we could not read) is not.
"""

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from servers.frames import parse_frame
from tasks.storage import Spool

logger = logging.getLogger(__name__)


class ComfyError(Exception):
    permanent = False

    def __init__(self, message, *, status=None, payload=None, sent=True):
        super().__init__(message)
        self.message = message
        self.status = status
        self.payload = payload
        # False only when the request certainly never reached the server (connection refused).
        self.sent = sent


class ComfyUnavailable(ComfyError):
    """The server could not be reached or did not answer sensibly: worth retrying."""

    permanent = False


class ComfyRejected(ComfyError):
    """The server refused the request: retrying the same request gives the same answer."""

    permanent = True

    @property
    def error(self):
        error = (self.payload or {}).get("error") or {}
        return error if isinstance(error, dict) else {"message": str(error)}

    @property
    def node_errors(self):
        return (self.payload or {}).get("node_errors") or {}


def speaks_jobs_api(version):
    """Whether a ComfyUI of this version has /api/jobs with its atomic cancel (0.26 and later); unknown: no."""
    try:
        parts = tuple(int(part) for part in str(version).lstrip("v").split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= (0, 26)


# --- replies --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSnapshot:
    running: list[str]
    pending: list[str]
    # prompt_id -> the client_id it was submitted with (from each item's extra_data), when known
    clients: dict = field(default_factory=dict)

    def foreign(self, client_id):
        """How many queued or running prompts were submitted by other clients than `client_id` (or its ".x" ids)."""
        return sum(1 for pid in [*self.running, *self.pending] if not self.ours(pid, client_id))

    def ours(self, prompt_id, client_id):
        found = self.clients.get(prompt_id) or ""
        return found == client_id or found.startswith(f"{client_id}.")

    def where(self, prompt_id):
        if prompt_id in self.running:
            return "running"
        if prompt_id in self.pending:
            return "pending"
        return None

    def __len__(self):
        return len(self.running) + len(self.pending)


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class HistoryEntry:
    prompt_id: str
    status_str: str
    completed: bool
    messages: list
    outputs: dict

    @classmethod
    def parse(cls, prompt_id, raw):
        if not isinstance(raw, dict):
            raise ComfyUnavailable(f"history entry for {prompt_id} is not an object")
        status = raw.get("status") or {}
        messages = [m for m in status.get("messages") or [] if isinstance(m, list | tuple) and len(m) == 2]
        return cls(
            prompt_id=prompt_id,
            status_str=str(status.get("status_str") or ""),
            completed=bool(status.get("completed")),
            messages=messages,
            outputs=raw.get("outputs") if isinstance(raw.get("outputs"), dict) else {},
        )

    def last(self, kind):
        for name, data in reversed(self.messages):
            if name == kind and isinstance(data, dict):
                return data
        return None

    @property
    def succeeded(self):
        return self.status_str == "success" or (self.completed and self.last("execution_error") is None)

    @property
    def interrupted(self):
        return self.last("execution_interrupted") is not None

    @property
    def error(self):
        return self.last("execution_error")

    def files(self):
        """Every file an output node produced, whatever the key ("images", "gifs", ...)."""
        found = []
        for node_id, output in self.outputs.items():
            if not isinstance(output, dict):
                continue
            for items in output.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and isinstance(item.get("filename"), str):
                        found.append(
                            OutputFile(
                                str(node_id),
                                item["filename"],
                                str(item.get("subfolder") or ""),
                                str(item.get("type") or "output"),
                            )
                        )
        return found


@dataclass(frozen=True)
class Submitted:
    prompt_id: str
    number: Any
    node_errors: dict


# --- the client -----------------------------------------------------------------------------------------


class ComfyClient:
    def __init__(self, base_url, *, timeout=30.0, transport=None):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def close(self):
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _build(self, method, path, **kwargs):
        """
        The request, built apart from sending it: what cannot be encoded (a lone surrogate such as "\\ud800",
        which JSON allows but UTF-8 does not, a NaN, a value JSON has no form for, a bad URL) is the caller's
        request, not the server's state. It is a permanent rejection that certainly never left the hub.
        """
        try:
            return self.http.build_request(method, path, **kwargs)
        except (httpx.InvalidURL, UnicodeError, TypeError, ValueError, RecursionError) as exc:
            raise ComfyRejected(f"the request could not be encoded: {_plain(exc)}", sent=False) from exc

    async def _request(self, method, path, **kwargs):
        request = self._build(method, path, **kwargs)
        try:
            reply = await self.http.send(request)
        except httpx.ConnectError as exc:
            raise ComfyUnavailable(f"cannot connect for {method} {path}: {exc}", sent=False) from exc
        except httpx.TimeoutException as exc:
            raise ComfyUnavailable(
                f"{method} {path} timed out", sent=not isinstance(exc, httpx.ConnectTimeout)
            ) from exc
        except httpx.HTTPError as exc:
            raise ComfyUnavailable(f"{method} {path} failed: {exc.__class__.__name__}: {exc}") from exc
        if reply.status_code >= 500:
            raise ComfyUnavailable(f"{method} {path} answered {reply.status_code}", status=reply.status_code)
        if reply.status_code >= 400:
            try:
                payload = reply.json()
            except ValueError:
                payload = {"error": {"message": reply.text[:500]}}
            error = payload.get("error") if isinstance(payload, dict) else None
            # ComfyUI's /prompt says {"error": {"message": ...}}; 0.26's /api/jobs says {"error": "..."}.
            message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
            raise ComfyRejected(
                message or f"{method} {path} answered {reply.status_code}",
                status=reply.status_code,
                payload=payload if isinstance(payload, dict) else {},
            )
        return reply

    async def _json(self, method, path, **kwargs):
        reply = await self._request(method, path, **kwargs)
        try:
            return reply.json()
        except ValueError as exc:
            raise ComfyUnavailable(f"{method} {path} did not answer JSON") from exc

    async def submit(self, graph, prompt_id, client_id, extra_data=None, *, front=False) -> Submitted:
        body = {"prompt": graph, "prompt_id": prompt_id, "client_id": client_id}
        if extra_data:
            body["extra_data"] = extra_data
        if front:
            body["front"] = True  # runs before the other pending prompts, after the running one
        reply = await self._json("POST", "/prompt", json=body)
        if not isinstance(reply, dict) or str(reply.get("prompt_id")) != prompt_id:
            raise ComfyUnavailable(f"/prompt answered an unexpected body for {prompt_id}")
        return Submitted(prompt_id, reply.get("number"), reply.get("node_errors") or {})

    async def queue(self) -> QueueSnapshot:
        reply = await self._json("GET", "/queue")

        def ids(items):
            return [str(item[1]) for item in items or [] if isinstance(item, list) and len(item) > 1]

        def clients(items):
            found = {}
            for item in items or []:
                if isinstance(item, list) and len(item) > 3 and isinstance(item[3], dict):
                    found[str(item[1])] = item[3].get("client_id")
            return found

        if not isinstance(reply, dict):
            raise ComfyUnavailable("/queue did not answer an object")
        running, pending = reply.get("queue_running"), reply.get("queue_pending")
        return QueueSnapshot(ids(running), ids(pending), {**clients(running), **clients(pending)})

    async def history(self, prompt_id) -> HistoryEntry | None:
        reply = await self._json("GET", f"/history/{prompt_id}")
        if not isinstance(reply, dict):
            raise ComfyUnavailable(f"/history/{prompt_id} did not answer an object")
        if prompt_id not in reply:
            return None
        return HistoryEntry.parse(prompt_id, reply[prompt_id])

    async def delete_from_queue(self, prompt_ids):
        await self._request("POST", "/queue", json={"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id=None):
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else None)

    async def cancel_job(self, prompt_id) -> bool:
        """0.26's atomic cancel: a pending prompt leaves the queue (and every trace), the running one is interrupted
        at its next node boundary. False when the server had it in neither place (finished, unknown)."""
        reply = await self._json("POST", f"/api/jobs/{prompt_id}/cancel")
        if not isinstance(reply, dict) or not isinstance(reply.get("cancelled"), bool):
            raise ComfyUnavailable(f"/api/jobs/{prompt_id}/cancel answered an unexpected body")
        return reply["cancelled"]

    async def job(self, prompt_id) -> dict | None:
        """0.26's GET /api/jobs/{id}; None when the server knows no such job (a cancelled pending one included)."""
        try:
            reply = await self._json("GET", f"/api/jobs/{prompt_id}")
        except ComfyRejected as exc:
            # Only the jobs API's own 404 means "no such job"; a route the server lacks is not an answer.
            if exc.status == 404 and exc.payload.get("error") == "Job not found":
                return None
            raise
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise ComfyUnavailable(f"/api/jobs/{prompt_id} answered an unexpected body")
        return reply

    async def locate(self, prompt_id) -> tuple[str | None, HistoryEntry | None]:
        """
        Where one prompt is, in one call on 0.26 and later (/queue sends every queued graph, /history a second
        request): ("running" or "pending", None), (None, its history entry) once finished, or (None, None).
        """
        job = await self.job(prompt_id)
        if job is None:
            return None, None
        if job["status"] in ("in_progress", "pending"):
            return ("running" if job["status"] == "in_progress" else "pending"), None
        raw = {"status": job.get("execution_status"), "outputs": job.get("outputs")}
        return None, HistoryEntry.parse(prompt_id, raw)

    async def upload_image(self, data, name, *, overwrite=True) -> str:
        files = {"image": (name, data, "application/octet-stream")}
        form = {"type": "input", "overwrite": "true" if overwrite else "false"}
        reply = await self._json("POST", "/upload/image", files=files, data=form)
        if not isinstance(reply, dict) or not reply.get("name"):
            raise ComfyUnavailable("/upload/image answered no name")
        subfolder = reply.get("subfolder") or ""
        return f"{subfolder}/{reply['name']}" if subfolder else reply["name"]

    async def view(self, output: OutputFile, *, max_bytes) -> tuple[Spool, str]:
        """
        Copy one output file into a Spool (counted and hashed on the way, on disk once large), refusing anything
        larger than max_bytes or shorter than announced. The caller closes the spool.
        """
        params = {"filename": output.filename, "subfolder": output.subfolder, "type": output.type}
        request = self._build("GET", "/view", params=params)
        try:
            reply = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ComfyUnavailable(f"/view {output.filename} failed: {exc.__class__.__name__}") from exc
        spool = Spool()
        try:
            if reply.status_code == 404:
                raise ComfyRejected(f"{output.filename} is not on the server", status=404)
            if reply.status_code >= 400:
                error = ComfyRejected if reply.status_code < 500 else ComfyUnavailable
                raise error(f"/view {output.filename} answered {reply.status_code}", status=reply.status_code)
            announced = reply.headers.get("content-length")
            if announced is not None and int(announced) > max_bytes:
                raise ComfyRejected(f"{output.filename} is {announced} bytes, over the limit of {max_bytes}")
            async for chunk in reply.aiter_bytes():
                if spool.size + len(chunk) > max_bytes:
                    raise ComfyRejected(f"{output.filename} is over the limit of {max_bytes} bytes")
                spool.write(chunk)
            if announced is not None and spool.size != int(announced):
                raise ComfyUnavailable(f"{output.filename}: got {spool.size} of {announced} bytes")
            content_type = reply.headers.get("content-type", "application/octet-stream").split(";")[0]
            return spool, content_type
        except httpx.HTTPError as exc:
            spool.close()
            raise ComfyUnavailable(f"/view {output.filename} failed: {exc.__class__.__name__}") from exc
        except BaseException:
            spool.close()
            raise
        finally:
            await reply.aclose()

    async def system_stats(self):
        return await self._json("GET", "/system_stats")

    async def object_info(self):
        return await self._json("GET", "/object_info")

    @asynccontextmanager
    async def events(self, client_id, *, open_timeout=10) -> AsyncIterator["EventStream"]:
        """
        Open the websocket as `client_id`. Leaving the block closes it and waits for the close to finish, which
        matters: ComfyUI orphans a new socket whose clientId is still held by an old one (protocol §2.6).
        """
        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        try:
            socket = await ws_connect(url, max_size=None, open_timeout=open_timeout, ping_interval=20)
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise ComfyUnavailable(f"websocket connect failed: {exc.__class__.__name__}: {exc}") from exc
        try:
            await socket.send(
                json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            )
            yield EventStream(socket)
        finally:
            await socket.close()
            await socket.wait_closed()


def _plain(exc):
    """An exception's text that can be stored and shown anywhere (a lone surrogate becomes its escape)."""
    return str(exc).encode("utf-8", "backslashreplace").decode("utf-8")


class EventStream:
    def __init__(self, socket):
        self.socket = socket

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            frame = await self.socket.recv()
        except websockets.ConnectionClosedOK:
            raise StopAsyncIteration from None
        except (websockets.WebSocketException, OSError) as exc:
            raise ComfyUnavailable(f"websocket lost: {exc.__class__.__name__}: {exc}") from exc
        return parse_frame(frame)
