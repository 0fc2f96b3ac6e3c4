"""The HTTP API of a simulated ComfyUI server: the same routes, replies and error shapes as ComfyUI's server.py."""

from __future__ import annotations

import asyncio
import heapq
import logging
import mimetypes
import os
import sys
import uuid
from io import BytesIO
from urllib.parse import urlparse, urlsplit

from aiohttp import web
from PIL import Image

from comfysim.nodes import CHECKPOINTS, NODE_CLASSES, is_image_file, validate_prompt
from comfysim.protocol import (
    COMFY_PACKAGE_VERSIONS,
    DEPLOY_ENVIRONMENT,
    MAX_UPLOAD_SIZE,
    MODEL_FOLDERS,
    SENSITIVE_EXTRA_DATA_KEYS,
    SERVER_ERROR_TEXT,
    invalid_prompt_id_error,
    is_canonical_uuid,
    is_loopback,
    missing_node_type_error,
    now_ms,
)

logger = logging.getLogger(__name__)


class HttpRoutes:
    """Mixed into Simulator: one handler per ComfyUI route (each also under /api)."""


    def _make_app(self) -> web.Application:
        middlewares = [_cross_site_check] if self.modern else []
        middlewares += [_origin_check, self._errors]
        app = web.Application(middlewares=middlewares, client_max_size=MAX_UPLOAD_SIZE)
        routes = [
            ("GET", "/ws", self._websocket),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("POST", "/upload/image", self._upload_image),
            ("GET", "/view", self._view),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info),
            ("GET", "/features", self._features),
            ("GET", "/embeddings", _constant([])),
            ("GET", "/extensions", _constant([])),
            ("GET", "/models", _constant(MODEL_FOLDERS)),
            ("GET", "/models/{folder}", self._models),
        ]
        if self.modern:
            routes += self._jobs_routes()
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/", self._index)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        # The same reply as aiohttp's own for an exception (what ComfyUI sends), logged through our logger.
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ValueError as exc:  # a body or query parameter that does not parse
            logger.warning("Simulator %s: %s %s: %s", self.name, request.method, request.path, exc)
        except Exception:
            logger.exception("Simulator %s: %s %s failed", self.name, request.method, request.path)
        return web.Response(status=500, text=SERVER_ERROR_TEXT)

    async def _index(self, request: web.Request) -> web.Response:
        body = f"<!doctype html><title>ComfyUI simulator {self.name}</title><p>ComfyUI {self.comfyui_version} simulator"
        return web.Response(text=body, content_type="text/html")

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    async def _post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "number" in body:
            number = float(body["number"])
        else:
            # The counter moves on every POST without a number, rejected ones included.
            number = -self._number if body.get("front") else self._number
            self._number += 1
        if "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided"}
            return web.json_response({"error": {**error, "extra_info": {}}, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        if self.modern and body.get("prompt_id") is not None and not is_canonical_uuid(body["prompt_id"]):
            # 0.26: refused before anything else is looked at, but after the counter moved on (§7.1).
            logger.info("Simulator %s: refused prompt_id %r", self.name, body["prompt_id"])
            return web.json_response({"error": invalid_prompt_id_error(), "node_errors": {}}, status=400)
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        if self.modern and body.get("prompt_id") is None:
            prompt_id = str(uuid.uuid4())
        error = self._missing_node_type(prompt) if self.modern else None
        if error is None:
            error, outputs, node_errors = validate_prompt(prompt, body.get("partial_execution_targets"), self.folders)
            error = self._capability_error(prompt) or error
        else:
            outputs, node_errors = [], {}
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if self.modern:
            extra_data["create_time"] = now_ms()
        if error is not None:
            logger.info("Simulator %s: invalid prompt: %s", self.name, error["message"])
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        item = [number, prompt_id, prompt, extra_data, outputs]
        # (number, prompt_id) orders the heap as ComfyUI's does; the sequence number only breaks the tie that
        # would crash ComfyUI's worker (same number and prompt_id, §4), so that this simulator stays usable.
        heapq.heappush(self._pending, (number, prompt_id, self._sequence, item))
        self._sequence += 1
        self._wakeup.set()
        self._queue_updated()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def _missing_node_type(self, prompt) -> dict | None:
        """0.26's first check of a graph: every node names a class this server has (§7.3)."""
        if not isinstance(prompt, dict):
            return None
        for node_id, node in prompt.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            if class_type not in NODE_CLASSES or class_type in self.missing_nodes:
                return missing_node_type_error(node_id, node)
        return None

    async def _get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.queue_snapshot()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self._pending = []
            self._queue_updated()
        for prompt_id in body.get("delete", []):
            for index, entry in enumerate(self._pending):
                if entry[1] == prompt_id:  # the first match only, as ComfyUI; the running job is not here
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                    self._queue_updated()
                    break
        return web.Response()

    async def _get_history(self, request: web.Request) -> web.Response:
        max_items = request.query.get("max_items")
        max_items = int(max_items) if max_items is not None else None
        offset = int(request.query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        selected = list(self._history.items())[max(offset, 0) :]
        if max_items is not None:
            selected = selected[:max_items]
        return web.json_response(dict(selected))

    async def _get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self._history.clear()
        for prompt_id in body.get("delete", []):
            self._history.pop(prompt_id, None)
        return web.Response()

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        target = body.get("prompt_id") if isinstance(body, dict) else None
        if not target or self._running is not None and self._running[1] == target:
            self._interrupt_requested = True
        else:
            logger.info("Simulator %s: prompt %s is not running, interrupt ignored", self.name, target)
        return web.Response()

    async def _post_free(self, request: web.Request) -> web.Response:
        await request.json()
        return web.Response()

    async def _upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        kind = post.get("type") or "input"
        root = self.folders.by_type(kind)
        if not isinstance(image, web.FileField) or not image.filename or root is None:
            return web.Response(status=400, text="Expected an image file and type input, temp or output")
        subfolder = str(post.get("subfolder", ""))
        overwrite = post.get("overwrite") in ("true", "1")
        data = image.file.read()
        name = await asyncio.to_thread(_store_upload, root, subfolder, image.filename, data, overwrite)
        if name is None:
            return web.Response(status=400, text="Not an image, or a path outside the folder")
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def _view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        filename = query.get("filename")
        if filename is None:
            return web.Response(status=404)
        root = None
        for kind in ("input", "output", "temp"):  # ComfyUI's annotated names: "a.png [output]"
            if filename.endswith(f" [{kind}]"):
                filename, root = filename[: -len(kind) - 3], self.folders.by_type(kind)
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        root = root or self.folders.by_type(query.get("type", "output"))
        if root is None:
            return web.Response(status=400)
        if "subfolder" in query:
            folder = os.path.join(root, query["subfolder"])
            if os.path.commonpath((os.path.abspath(folder), root)) != root:
                return web.Response(status=403)
            root = folder
        filename = os.path.basename(filename)
        path = os.path.join(root, filename)
        if not os.path.isfile(path):
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        if "preview" in query or query.get("channel", "rgba") != "rgba":
            body, content_type = await asyncio.to_thread(_reencode, path, query.get("preview"), query.get("channel"))
            return web.Response(body=body, content_type=content_type, headers=disposition)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
            content_type = "application/octet-stream"  # as ComfyUI: never let a browser render these
        return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})

    async def _system_stats(self, request: web.Request) -> web.Response:
        ram_total, ram_free = 16 * 1024**3, 12 * 1024**3
        argv = ["main.py", "--cpu", "--listen", self._host, "--port", str(self.port)]
        argv += ["--simulator-name", self.name, "--simulator-started", self.started_at.isoformat()]
        system = {
            "os": sys.platform if self.modern else os.name,  # "linux" on 0.26, "posix" before
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": self.comfyui_version,
            "required_frontend_version": "1.27.10",
            "python_version": sys.version,
            "pytorch_version": "2.8.0+cpu",
            "embedded_python": False,
            "argv": argv,
        }
        if self.modern:
            system.update(comfy_package_versions=COMFY_PACKAGE_VERSIONS, deploy_environment=DEPLOY_ENVIRONMENT)
        device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free}
        device.update(torch_vram_total=ram_total, torch_vram_free=ram_free)
        return web.json_response({"system": system, "devices": [device]})

    async def _object_info(self, request: web.Request) -> web.Response:
        wanted = request.match_info.get("node_class")
        names = [wanted] if wanted is not None else list(NODE_CLASSES)
        names = [name for name in names if name not in self.missing_nodes]
        info = await asyncio.to_thread(
            lambda: {name: NODE_CLASSES[name].info(self.folders) for name in names if name in NODE_CLASSES}
        )
        if self.checkpoints is not None and "CheckpointLoaderSimple" in info:
            required = info["CheckpointLoaderSimple"]["input"]["required"]
            required["ckpt_name"] = [list(self.checkpoints), *required["ckpt_name"][1:]]
        return web.json_response(info)

    async def _models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(list(CHECKPOINTS) if folder == "checkpoints" else [])


    async def _features(self, request: web.Request) -> web.Response:
        return web.json_response(self.features)


def _constant(value):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(value)

    return handler


@web.middleware
async def _cross_site_check(request: web.Request, handler):
    # 0.26: a browser request another site made is refused on every route, /ws included (§7.2). Only this
    # exact value: "same-site", "none" or a capitalised "Cross-Site" pass.
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        logger.warning("Refused a cross-site request to %s", request.path)
        return web.Response(status=403)
    return await handler(request)


@web.middleware
async def _origin_check(request: web.Request, handler):
    # ComfyUI's origin_only_middleware: on a loopback host, a browser request from another origin is refused,
    # so that a random web page cannot queue jobs on the user's local server.
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        host_domain = host.lower()
        origin_domain = urlparse(origin).netloc.lower()
        if is_loopback(urlsplit("//" + host_domain).hostname) and origin_domain and host_domain != origin_domain:
            logger.warning("Refused a request with non matching host and origin %s != %s", host_domain, origin_domain)
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def _store_upload(root: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str | None:
    """ComfyUI's image_upload(): same name and bytes -> same name; same name, other bytes -> "name (1).png"."""
    folder = os.path.join(root, os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((root, path)) != root or not is_image_file(data):
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stem, suffix = os.path.splitext(filename)
    counter = 1
    while not overwrite and os.path.exists(path):
        with open(path, "rb") as existing:
            if existing.read() == data:
                return filename
        filename = f"{stem} ({counter}){suffix}"
        path = os.path.join(folder, filename)
        counter += 1
    with open(path, "wb") as f:
        f.write(data)
    return filename


def _reencode(path: str, preview: str | None, channel: str | None) -> tuple[bytes, str]:
    """/view with preview=webp;90 or channel=rgb/a, as ComfyUI."""
    buffer = BytesIO()
    with Image.open(path) as img:
        if preview:
            image_format, *rest = preview.split(";")
            if image_format not in ("webp", "jpeg") or "a" in (channel or ""):
                image_format = "webp"
            quality = int(rest[-1]) if rest and rest[-1].isdigit() else 90
            if image_format == "jpeg" or channel == "rgb":
                img = img.convert("RGB")
            img.save(buffer, format=image_format, quality=quality)
            return buffer.getvalue(), f"image/{image_format}"
        if channel == "a":
            alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
            Image.merge("RGBA", (Image.new("L", img.size, 255),) * 3 + (alpha,)).save(buffer, format="PNG")
        else:
            img.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"
