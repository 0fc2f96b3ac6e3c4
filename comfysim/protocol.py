"""What the simulator answers that ComfyUI fixes: version, limits, frame codes, and small helpers."""

from __future__ import annotations

import ipaddress
import time

COMFYUI_VERSION = "0.3.64"
# --preview-method: none draws no sampler previews (ComfyUI's default); taesd draws them at full size.
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
MAX_UPLOAD_SIZE = 100 * 1024 * 1024
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
MAXIMUM_HISTORY_SIZE = 10000
# Kept out of the queue item and the history (ComfyUI's SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision", "style_models",
    "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "latent_upscale_models",
    "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
]  # fmt: skip
# Binary websocket frames: [uint32 event][payload]. PNG is the image format code inside PREVIEW_IMAGE.
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, PNG = 1, 4, 2
# What aiohttp (and so ComfyUI) answers when a handler raises, e.g. on a body that is not JSON.
SERVER_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
# A stalled or slowed node sleeps in slices of at most this many real seconds, so that stall() and
# set_time_scale() take effect within that time even in the middle of a long node.
SLICE_SECONDS = 0.1


def version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    """Whether a version string such as "0.5.1" is at least `minimum`, e.g. (0, 5)."""
    try:
        parts = tuple(int(part) for part in version.lstrip("v").split(".")[: len(minimum)])
    except ValueError:
        return False
    return parts >= minimum


def now_ms() -> int:
    return int(time.time() * 1000)


def type_name(ex: BaseException) -> str:
    # ComfyUI's full_type_name(): builtins by bare name, anything else with its module.
    module = type(ex).__module__
    return type(ex).__qualname__ if module == "builtins" else f"{module}.{type(ex).__qualname__}"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"

