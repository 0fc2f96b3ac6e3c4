"""
An asyncio client for one ComfyUI server: HTTP through httpx, the event stream through websockets.

No ORM here. Every error is a ComfyError (servers/comfy_replies.py, with the shapes replies are parsed into) whose
`permanent` flag tells the caller whether trying again can help: ComfyRejected (the server said no: a 400 with
ComfyUI's error shape, a 404) is permanent; ComfyUnavailable (refused connection, timeout, 5xx, a reply we could not
read) is not.
"""

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from servers.comfy_replies import ComfyRejected, ComfyUnavailable, HistoryEntry, OutputFile, QueueSnapshot, Submitted
from servers.frames import parse_frame
from tasks.storage import Spool

logger = logging.getLogger(__name__)


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
