"""What the simulator answers that ComfyUI fixes: version, limits, frame codes, and small helpers."""

from __future__ import annotations

import ipaddress
import time
import uuid

# The two ComfyUI releases measured side by side (comfyui-protocol.md §1-6 and §7); the newer is the default.
LEGACY_VERSION = "0.3.64"
COMFYUI_VERSION = "0.26.0"
VERSIONS = (LEGACY_VERSION, COMFYUI_VERSION)
# From this version on: UUID prompt ids, missing_node_type, Sec-Fetch-Site, /api/jobs, create_time (§7).
JOBS_API_VERSION = (0, 26)
# --preview-method: none draws no sampler previews (ComfyUI's default); taesd draws them at full size.
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
MAX_UPLOAD_SIZE = 100 * 1024 * 1024
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
# What 0.26 adds to /features and to the feature_flags reply (§7.7).
SERVER_FEATURES_0_26 = {
    **SERVER_FEATURES,
    "extension": {"manager": {"supports_v4": True}},
    "node_replacements": True,
    "assets": False,
}
# What 0.26's /system_stats adds (§7.7); the values are those of a plain pip install on a workstation.
COMFY_PACKAGE_VERSIONS = {
    "comfyui-frontend-package": "1.36.14",
    "comfyui-workflow-templates": "0.8.4",
    "comfyui-embedded-docs": "0.3.1",
}
DEPLOY_ENVIRONMENT = "local"
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



def is_canonical_uuid(value) -> bool:
    """0.26's prompt_id rule (§7.1): a UUID string in canonical lowercase hyphenated form, any version."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def invalid_prompt_id_error() -> dict:
    details = (
        "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one"
    )
    message = "prompt_id must be a valid UUID"
    return {"type": "invalid_prompt_id", "message": message, "details": details, "extra_info": {}}


def missing_node_type_error(node_id: str, node) -> dict:
    """0.26's reply to a node whose class is unknown or missing (§7.3); 0.3.64 said invalid_prompt."""
    class_type = node.get("class_type") if isinstance(node, dict) else None
    meta = node.get("_meta") if isinstance(node, dict) else None
    title = meta.get("title") if isinstance(meta, dict) and isinstance(meta.get("title"), str) else None
    if class_type is None:
        title = title or f"ID #{node_id}"
        message = f"Node '{title}' has no class_type. The workflow may be corrupted or a custom node is missing."
    else:
        title = title or class_type
        message = f"Node '{title}' not found. The custom node may not be installed."
    extra_info = {"node_id": node_id, "class_type": class_type, "node_title": title}
    details = f"Node ID '#{node_id}'"
    return {"type": "missing_node_type", "message": message, "details": details, "extra_info": extra_info}
