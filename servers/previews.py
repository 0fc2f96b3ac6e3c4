"""
Sampler previews. A binary frame that tracking has attributed to one of this server's tasks is made small (at most
256 px on the long side, re-encoded as WebP), and pushed to the task's owner only, at most `fps` times a second per
task, the newest frame winning. Previews are never stored: a page loaded later shows the progress bar until the
next one arrives. What to ask a server for: `extra_data` with `preview_method` on ComfyUI 0.5 and later.
"""

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from servers.aio import Throttle
from tasks.live import apush, preview_fact

logger = logging.getLogger(__name__)

MAX_SIDE = 256
# A preview is a small latent decoded to pixels; anything far larger is not one, and is not decoded.
MAX_PIXELS = 4096 * 4096
QUALITY = 70
# Bytes of WebP a preview may take: in base64 inside its fragment that is a frame of at most 30 KB. A busy picture
# (noise, early steps) can take more at 256 px; it is sent smaller rather than larger.
MAX_BYTES = 21_000
# Previews are made small on one thread of their own: a pool of them would take the interpreter from the event loop
# that reads the servers' sockets and pushes progress. When it falls behind, each task's newest frame still wins.
_shrinking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")


def shrink(image):
    """(bytes, mime, (width, height)) of a preview: at most MAX_SIDE px on its long side, WebP. Raises on junk."""
    with Image.open(io.BytesIO(image)) as picture:
        if picture.width * picture.height > MAX_PIXELS:
            raise ValueError(f"a {picture.width}x{picture.height} preview is too large")
        picture.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG decodes at a fraction of its size: much faster
        picture = picture.convert("RGB")
        side = MAX_SIDE
        while True:
            picture.thumbnail((side, side))
            out = io.BytesIO()
            picture.save(out, "WEBP", quality=QUALITY, method=0)
            if out.tell() <= MAX_BYTES or side <= 64:
                return out.getvalue(), "image/webp", picture.size
            side = side * 3 // 4


def supports_preview_method(version):
    """Whether a ComfyUI of this version reads `extra_data.preview_method` (0.5 and later); unknown: no."""
    try:
        parts = tuple(int(part) for part in str(version).lstrip("v").split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= (0, 5)


def asks(server):
    """Whether prompts to this server say how to draw previews (0.3 draws them only when started with a flag)."""
    return supports_preview_method(server.comfyui_version)


def extra_data(server, task):
    """The prompt's extra_data on a server that `asks()`: previews as the workflow says, or none (reads the row)."""
    workflow = task.workflow if task.workflow_id else None
    method = getattr(workflow, "preview_method", "auto") if server.previews else "none"
    return {"preview_method": method}


class Preview:
    """The newest preview frame of one task waiting to be pushed, and the throttle that pushes it."""

    def __init__(self, fps, send):
        self.frame = None
        self.throttle = Throttle(1.0 / fps, send)

    def close(self):
        self.frame = None
        self.throttle.close()


class Previews:
    """Made with the server row, the connection's prompt ledger and the highest rate per task (`fps()`)."""

    def __init__(self, server, prompts, *, fps):
        self.server = server
        self.prompts = prompts
        self.fps = fps

    def offer(self, task, node_id, frame):
        fps = self.fps()
        if not self.server.previews or fps <= 0:
            return
        prompt_id = task.prompt_id
        preview = self.prompts.previews.get(prompt_id)
        if preview is None:
            preview = self.prompts.previews[prompt_id] = Preview(fps, lambda: self.send(prompt_id))
        preview.frame = (task, frame, time.time())
        preview.throttle.poke()

    async def send(self, prompt_id):
        preview = self.prompts.previews.get(prompt_id)
        if preview is None or preview.frame is None:
            return
        (task, frame, arrived), preview.frame = preview.frame, None
        try:
            image, mime, size = await asyncio.get_running_loop().run_in_executor(_shrinking, shrink, frame.image)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            # A preview is a hint: a broken one is dropped, and the task goes on.
            logger.warning("%s sent a preview for task %s that cannot be read: %s", self.server.name, task.pk, exc)
            return
        if self.prompts.tasks.get(prompt_id) is not task or prompt_id in self.prompts.finishing:
            return  # it ended (or moved) while the preview was being made small
        await apush(task.owner_id, preview_fact(task.pk, task.owner_id, image, mime, size, upstream_at=arrived))
