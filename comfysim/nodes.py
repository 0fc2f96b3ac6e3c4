"""
Node classes of the ComfyUI simulator (the server is comfysim/server.py).

Each class mirrors the stock ComfyUI node of the same name: the same inputs, limits and choices as
`GET /object_info` shows on ComfyUI 0.3.64, the same output types, and real pixel work done with Pillow.
Images travel between nodes as lists of RGB `PIL.Image` objects (a batch), which no node ever mutates in
place, so a batch may hold the same object several times.

Durations: every node calls `ctx.spend(seconds)` with what the real node costs on a 2-core CPU (slow.json
about 10 s, fast.json about 20 ms, KSampler 0.15 s per 512x512 step); the simulator scales that by its
time_scale. The real Pillow work comes on top and is kept small.

Also here, because they are about what a graph means rather than about the server: the output cache
(`OutputCache`, whose node signatures decide what `execution_cached` lists), the execution order
(`ExecutionList`) and `validate_prompt()`, which reproduces ComfyUI's execution.validate_prompt(): the same
error types, messages and node_errors layout, including its quirks (an exception while validating becomes an
error entry).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import secrets
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CHECKPOINTS = ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"]
# fmt: off
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal"]
# fmt: on
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# The cost of one 512x512 sampling step on the simulated machine, the unit of KSampler and VAEDecode.
STEP_SECONDS = 0.15
_SD_AREA = 512 * 512


class Interrupted(Exception):
    """Raised at an interrupt check point (ComfyUI's InterruptProcessingException)."""


@dataclass(frozen=True)
class Folders:
    """The input/, output/ and temp/ folders of one simulated server (absolute paths)."""

    input: str
    output: str
    temp: str

    def by_type(self, kind: str | None) -> str | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or "")


class NodeContext(Protocol):
    """What the simulator gives a running node."""

    node_id: str
    folders: Folders
    prompt: dict
    extra_data: dict
    preview_method: str  # how sampler previews are drawn: "none" sends none

    async def spend(self, seconds: float) -> None:
        """Simulated work: sleep `seconds` times the time scale (stalls and restarts apply)."""

    async def compute(self, fn, /, *args) -> Any:
        """Real pixel work, run in a thread so the server keeps answering."""

    async def progress(self, value: int, total: int, preview_png: bytes | None = None) -> None:
        """A ProgressBar update: interrupt check point, `progress` + `progress_state` (+ a binary frame)."""


def annotated_path(name: str, folders: Folders, default: str = "input") -> str | None:
    """ComfyUI's annotated file names: "sub/a.png", or "a.png [output]" to pick another folder.

    None for a name that leaves its folder: unlike ComfyUI, a graph cannot read files elsewhere on the server.
    """
    base = folders.by_type(default)
    for kind in ("input", "output", "temp"):
        if name.endswith(f" [{kind}]"):
            name, base = name[: -len(kind) - 3], folders.by_type(kind)
    path = os.path.abspath(os.path.join(base, name))
    return path if os.path.commonpath((base, path)) == base else None


def image_files(folder: str) -> list[str]:
    """Image files below `folder`, as LoadImage lists them (relative, "/"-separated, sorted)."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def _megapixels(images: list[Image.Image]) -> float:
    return sum(img.width * img.height for img in images) / 1e6


def _is_flat(img: Image.Image) -> bool:
    # Blurring or sharpening a one-colour picture gives the same picture: skip the pixel work (slow.json is
    # exactly that case, and its simulated duration still comes from ctx.spend()).
    return all(low == high for low, high in img.getextrema())


def _map_batch(fn, images: list[Image.Image]) -> list[Image.Image]:
    # A batch from EmptyImage repeats one picture: transform each distinct picture once.
    done: dict[int, Image.Image] = {}
    for img in images:
        if id(img) not in done:
            done[id(img)] = fn(img)
    return [done[id(img)] for img in images]


class Node:
    """Base of the node classes: the class attributes mirror the ComfyUI ones of the same name."""

    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_NODE: ClassVar[bool] = False
    CATEGORY: ClassVar[str] = ""
    DISPLAY_NAME: ClassVar[str | None] = None
    DESCRIPTION: ClassVar[str] = ""
    PYTHON_MODULE: ClassVar[str] = "nodes"
    # Inputs checked by validate() instead of the generic min/max/choice checks (ComfyUI's VALIDATE_INPUTS).
    VALIDATED_INPUTS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def input_types(cls, folders: Folders) -> dict:
        return {"required": {}}

    @classmethod
    def validate(cls, folders: Folders, **inputs) -> bool | str:
        return True

    @classmethod
    def fingerprint(cls, folders: Folders, inputs: dict) -> str | None:
        """ComfyUI's IS_CHANGED: part of the cache key. None means "the inputs say it all"."""
        return None

    @classmethod
    async def run(cls, ctx: NodeContext, **inputs) -> tuple[tuple, dict | None]:
        """Returns (outputs, ui): outputs as RETURN_TYPES, ui as the `executed` output (None for no UI)."""
        raise NotImplementedError

    @classmethod
    def info(cls, folders: Folders) -> dict:
        """The node's entry in GET /object_info."""
        types = cls.input_types(folders)
        return {
            "input": types,
            "input_order": {section: list(names) for section, names in types.items()},
            "output": list(cls.RETURN_TYPES),
            "output_is_list": [False] * len(cls.RETURN_TYPES),
            "output_name": list(cls.RETURN_NAMES or cls.RETURN_TYPES),
            "name": cls.__name__,
            "display_name": cls.DISPLAY_NAME or cls.__name__,
            "description": cls.DESCRIPTION,
            "python_module": cls.PYTHON_MODULE,
            "category": cls.CATEGORY,
            "output_node": cls.OUTPUT_NODE,
        }


def _int(default, minimum, maximum, step=1, **extra) -> tuple:
    return ("INT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra})


def _float(default, minimum, maximum, step, **extra) -> tuple:
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra})


_IMAGES = {"images": ("IMAGE", {"tooltip": "The images to save."})}
_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


class EmptyImage(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "width": _int(512, 1, MAX_RESOLUTION),
                "height": _int(512, 1, MAX_RESOLUTION),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": _int(0, 0, 0xFFFFFF, display="color"),
            }
        }

    @classmethod
    async def run(cls, ctx, width, height, batch_size, color):
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        img = await ctx.compute(Image.new, "RGB", (width, height), rgb)
        await ctx.spend(0.008 + 0.01 * width * height * batch_size / 1e6)
        return ([img] * batch_size,), None


class ImageInvert(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image"

    @classmethod
    def input_types(cls, folders):
        return {"required": {"image": ("IMAGE",)}}

    @classmethod
    async def run(cls, ctx, image):
        out = await ctx.compute(_map_batch, ImageOps.invert, image)
        await ctx.spend(0.003 + 0.02 * _megapixels(image))
        return (out,), None


class ImageScaleBy(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image By"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "image": ("IMAGE",),
                "upscale_method": (UPSCALE_METHODS,),
                "scale_by": _float(1.0, 0.01, 8.0, 0.01),
            }
        }

    @classmethod
    async def run(cls, ctx, image, upscale_method, scale_by):
        def scale(img):
            size = (max(1, round(img.width * scale_by)), max(1, round(img.height * scale_by)))
            return img.resize(size, _RESAMPLE[upscale_method])

        return (await _resize_batch(ctx, scale, image),), None


class ImageScale(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "image": ("IMAGE",),
                "upscale_method": (UPSCALE_METHODS,),
                "width": _int(512, 0, MAX_RESOLUTION),
                "height": _int(512, 0, MAX_RESOLUTION),
                "crop": (["disabled", "center"],),
            }
        }

    @classmethod
    async def run(cls, ctx, image, upscale_method, width, height, crop):
        def scale(img):
            # As ComfyUI: 0 for one side keeps the aspect ratio, 0 for both leaves the image alone.
            if width == 0 and height == 0:
                return img
            w = width or max(1, round(img.width * height / img.height))
            h = height or max(1, round(img.height * width / img.width))
            if crop == "center":
                return ImageOps.fit(img, (w, h), _RESAMPLE[upscale_method])
            return img.resize((w, h), _RESAMPLE[upscale_method])

        return (await _resize_batch(ctx, scale, image),), None


async def _resize_batch(ctx: NodeContext, scale, images: list[Image.Image]) -> list[Image.Image]:
    """Resize every image of a batch, charging what a resample of that many pixels costs on a GPU host."""
    out = await ctx.compute(_map_batch, scale, images)
    await ctx.spend(0.003 + 0.03 * (_megapixels(images) + _megapixels(out)))
    return out


def _kernel_cost(radius: int) -> float:
    # ComfyUI convolves with a full (2r+1)^2 kernel: 2048x2048 at radius 31 takes about 4.8 s on 2 cores.
    return 1.15 * ((2 * radius + 1) / 63) ** 2


class ImageBlur(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/postprocessing"
    DISPLAY_NAME = "Image Blur"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "image": ("IMAGE",),
                "blur_radius": _int(1, 1, 31),
                "sigma": _float(1.0, 0.1, 10.0, 0.1),
            }
        }

    @classmethod
    async def run(cls, ctx, image, blur_radius, sigma):
        def blur(img):
            return img if _is_flat(img) else img.filter(ImageFilter.GaussianBlur(min(sigma, blur_radius)))

        out = await ctx.compute(_map_batch, blur, image)
        await ctx.spend(0.002 + _kernel_cost(blur_radius) * _megapixels(image))
        return (out,), None


class ImageSharpen(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/postprocessing"
    DISPLAY_NAME = "Image Sharpen"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "image": ("IMAGE",),
                "sharpen_radius": _int(1, 1, 31),
                "sigma": _float(1.0, 0.1, 10.0, 0.01),
                "alpha": _float(1.0, 0.0, 5.0, 0.01),
            }
        }

    @classmethod
    async def run(cls, ctx, image, sharpen_radius, sigma, alpha):
        def sharpen(img):
            if _is_flat(img):
                return img
            return img.filter(ImageFilter.UnsharpMask(min(sigma, sharpen_radius), round(alpha * 100), 0))

        out = await ctx.compute(_map_batch, sharpen, image)
        await ctx.spend(0.002 + _kernel_cost(sharpen_radius) * _megapixels(image))
        return (out,), None


class LoadImage(Node):
    RETURN_TYPES = ("IMAGE", "MASK")
    CATEGORY = "image"
    DISPLAY_NAME = "Load Image"
    VALIDATED_INPUTS = ("image",)

    @classmethod
    def input_types(cls, folders):
        return {"required": {"image": (image_files(folders.input), {"image_upload": True})}}

    @classmethod
    def validate(cls, folders, image, **_):
        path = annotated_path(str(image), folders)
        if path is None or not os.path.isfile(path):
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def fingerprint(cls, folders, inputs):
        # As ComfyUI: the file's hash, so that replacing an uploaded file re-runs the graph.
        try:
            with open(annotated_path(str(inputs.get("image")), folders) or "", "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return None

    @classmethod
    async def run(cls, ctx, image):
        def load():
            with Image.open(annotated_path(image, ctx.folders)) as opened:
                img = ImageOps.exif_transpose(opened)
                img.load()
            # ComfyUI's mask is 1 - alpha, or an empty 64x64 mask for pictures without alpha.
            has_alpha = "A" in img.getbands()
            mask = ImageOps.invert(img.getchannel("A")) if has_alpha else Image.new("L", (64, 64), 0)
            return img.convert("RGB"), mask

        img, mask = await ctx.compute(load)
        await ctx.spend(0.005 + 0.03 * _megapixels([img]))
        return ([img], [mask]), None


def save_image_path(prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's folder_paths.get_save_image_path: (folder, file prefix, next counter, subfolder)."""
    prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
    subfolder = os.path.dirname(os.path.normpath(prefix))
    filename = os.path.basename(os.path.normpath(prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    common = os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))
    if common != output_dir:
        # A bare Exception, as ComfyUI: clients see exception_type "Exception".
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}"
        )
    counter = 1
    try:
        names = os.listdir(full_output_folder)
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        names = []
    for name in names:
        # Files are "<prefix>_<counter>_.png": continue after the highest counter already on disk.
        rest = name[len(filename) :]
        if name.startswith(filename) and rest.startswith("_"):
            digits = rest[1:].split("_")[0]
            if digits.isdigit():
                counter = max(counter, int(digits) + 1)
    return full_output_folder, filename, counter, subfolder


def _png_info(prompt: dict | None, extra_data: dict) -> PngImagePlugin.PngInfo:
    # SaveImage embeds the graph (and the UI workflow) in the PNG, so a file dragged back into ComfyUI loads it.
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_data.get("extra_pnginfo") or {}).items():
        info.add_text(str(key), json.dumps(value))
    return info


def _save_batch(images, prefix, folder_root, kind, compress_level, prompt, extra_data) -> list[dict]:
    folder, filename, counter, subfolder = save_image_path(prefix, folder_root, images[0].width, images[0].height)
    results = []
    for batch_number, img in enumerate(images):
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        img.save(os.path.join(folder, name), pnginfo=_png_info(prompt, extra_data), compress_level=compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


class SaveImage(Node):
    OUTPUT_NODE = True
    CATEGORY = "image"
    DISPLAY_NAME = "Save Image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {**_IMAGES, "filename_prefix": ("STRING", {"default": "ComfyUI"})},
            "hidden": _HIDDEN,
        }

    @classmethod
    async def run(cls, ctx, images, filename_prefix):
        results = await ctx.compute(
            _save_batch, images, filename_prefix, ctx.folders.output, "output", 4, ctx.prompt, ctx.extra_data
        )
        await ctx.spend(0.012 + 0.08 * _megapixels(images))
        return (), {"images": results}


class PreviewImage(Node):
    OUTPUT_NODE = True
    CATEGORY = "image"
    DISPLAY_NAME = "Preview Image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    @classmethod
    def input_types(cls, folders):
        return {"required": dict(_IMAGES), "hidden": _HIDDEN}

    @classmethod
    async def run(cls, ctx, images):
        prefix = "ComfyUI_temp_" + "".join(secrets.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        results = await ctx.compute(
            _save_batch, images, prefix, ctx.folders.temp, "temp", 1, ctx.prompt, ctx.extra_data
        )
        await ctx.spend(0.006 + 0.03 * _megapixels(images))
        return (), {"images": results}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SaveImageWebsocket(Node):
    OUTPUT_NODE = True
    CATEGORY = "api node/image"
    PYTHON_MODULE = "custom_nodes.websocket_image_save"

    @classmethod
    def input_types(cls, folders):
        return {"required": {"images": ("IMAGE",)}}

    @classmethod
    def fingerprint(cls, folders, inputs):
        # Its IS_CHANGED returns time.time(): it is never answered from the cache.
        return secrets.token_hex(8)

    @classmethod
    async def run(cls, ctx, images):
        # As ComfyUI: progress 0/N .. N-1/N, one image frame per step, no UI output and no history entry.
        for step, img in enumerate(images):
            png = await ctx.compute(_png_bytes, img)
            await ctx.spend(0.004 + 0.02 * _megapixels([img]))
            await ctx.progress(step, len(images), png)
        return (), None


class CheckpointLoaderSimple(Node):
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load Checkpoint"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {"ckpt_name": (list(CHECKPOINTS), {"tooltip": "The name of the checkpoint (model) to load."})}
        }

    @classmethod
    async def run(cls, ctx, ckpt_name):
        await ctx.spend(0.6)
        model = {"checkpoint": ckpt_name}
        return (model, model, model), None


class CLIPTextEncode(Node):
    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                "clip": ("CLIP",),
            }
        }

    @classmethod
    async def run(cls, ctx, text, clip):
        await ctx.spend(0.05)
        return ({"text": text, "checkpoint": clip["checkpoint"]},), None


class EmptyLatentImage(Node):
    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent"
    DISPLAY_NAME = "Empty Latent Image"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "width": _int(512, 16, MAX_RESOLUTION, 8),
                "height": _int(512, 16, MAX_RESOLUTION, 8),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        }

    @classmethod
    async def run(cls, ctx, width, height, batch_size):
        await ctx.spend(0.002)
        # Latents are 1/8 of the picture in each direction: round down like ComfyUI does.
        return ({"width": width // 8 * 8, "height": height // 8 * 8, "batch_size": batch_size},), None


class KSampler(Node):
    RETURN_TYPES = ("LATENT",)
    CATEGORY = "sampling"

    @classmethod
    def input_types(cls, folders):
        return {
            "required": {
                "model": ("MODEL",),
                "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                "steps": _int(20, 1, 10000),
                "cfg": _float(8.0, 0.0, 100.0, 0.1, round=0.01),
                "sampler_name": (SAMPLERS,),
                "scheduler": (SCHEDULERS,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": _float(1.0, 0.0, 1.0, 0.01),
            }
        }

    @classmethod
    async def run(
        cls, ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
    ):
        area = latent_image["width"] * latent_image["height"] * latent_image["batch_size"]
        for step in range(1, steps + 1):
            await ctx.spend(STEP_SECONDS * max(area / _SD_AREA, 0.25))
            preview = None
            if ctx.preview_method != "none":
                preview = await ctx.compute(sampler_preview, latent_image, seed, step, steps, ctx.preview_method)
            await ctx.progress(step, steps, preview)
        return ({**latent_image, "seed": seed, "text": positive["text"]},), None


def preview_color(seed: int) -> tuple[int, int, int]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible picture, nothing secret
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def sampler_preview(latent: dict, seed: int, step: int, steps: int, method: str) -> bytes:
    """
    A PNG of the picture forming: latent size (latent2rgb, auto), or full size (taesd). Its colour is the seed's
    (`preview_color`), so that whose preview a picture is can be told; a white bar across the top grows with the steps.
    """
    scale = 1 if method == "taesd" else 8
    size = (max(latent["width"] // scale, 8), max(latent["height"] // scale, 8))
    picture = Image.new("RGB", size, preview_color(seed))
    ImageDraw.Draw(picture).rectangle((0, 0, size[0] * step // steps, size[1] // 4), fill=(255, 255, 255))
    out = io.BytesIO()
    picture.save(out, "PNG", compress_level=1)
    return out.getvalue()


class VAEDecode(Node):
    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "latent"
    DISPLAY_NAME = "VAE Decode"

    @classmethod
    def input_types(cls, folders):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    @classmethod
    async def run(cls, ctx, samples, vae):
        width, height = samples["width"], samples["height"]
        seed, text = samples.get("seed", 0), samples.get("text", "")
        images = [
            await ctx.compute(placeholder_picture, width, height, seed + i, text) for i in range(samples["batch_size"])
        ]
        await ctx.spend(0.25 * max(width * height * len(images) / _SD_AREA, 0.25))
        return (images,), None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def placeholder_picture(width: int, height: int, seed: int, text: str) -> Image.Image:
    """What the simulated VAEDecode "generates": a gradient with shapes chosen by the seed, and the prompt."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible picture, nothing secret
    top, bottom = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    img = ImageOps.colorize(Image.linear_gradient("L").resize((width, height)), top, bottom)
    draw = ImageDraw.Draw(img, "RGBA")
    short = min(width, height)
    for _ in range(rng.randint(4, 9)):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randint(short // 12 + 1, short // 4 + 2)
        fill = (rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randint(70, 170))
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=fill)
    size = max(10, width // 26)
    font = _font(size)
    lines = textwrap.wrap(text, width=max(8, int(width / (size * 0.55))))[:6] + [f"seed {seed}"]
    box_top = height - (len(lines) * (size + 4) + 12)
    draw.rectangle((0, box_top, width, height), fill=(0, 0, 0, 140))
    for i, line in enumerate(lines):
        draw.text((8, box_top + 6 + i * (size + 4)), line, fill=(255, 255, 255, 255), font=font)
    return img


# fmt: off
NODE_CLASSES: dict[str, type[Node]] = {
    cls.__name__: cls
    for cls in (
        EmptyImage, ImageInvert, ImageScaleBy, ImageScale, ImageBlur, ImageSharpen, LoadImage, SaveImage,
        PreviewImage, SaveImageWebsocket, CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler,
        VAEDecode,
    )
}
# fmt: on


def is_image_file(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    return True


def is_link(value) -> bool:
    """An input value [node_id, output_index] is a link to another node's output."""
    return isinstance(value, list) and len(value) == 2


# --- Caching and execution order: ComfyUI's caching.py and graph.py, reduced to what these nodes need --------------


@dataclass
class CacheEntry:
    outputs: tuple
    ui: dict | None


class OutputCache:
    """ComfyUI's default ("classic") output cache.

    Entries are keyed by a node's signature: class_type, IS_CHANGED and inputs, with links replaced by the
    upstream node's signature, so identical nodes are shared within and across jobs. When a job starts,
    everything its graph does not use is dropped, so only the previous job's nodes can be served from cache.
    """

    def __init__(self):
        self._entries: dict[str, CacheEntry] = {}

    def signatures(self, prompt: dict, folders: Folders) -> dict[str, str]:
        keys: dict[str, str] = {}

        def key(node_id, trail=()) -> str:
            node = prompt.get(node_id) if isinstance(node_id, str) else None
            if node is None or node_id in trail:
                return f"unresolvable:{node_id}"
            if node_id not in keys:
                given = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
                inputs = {
                    name: ["link", key(value[0], (*trail, node_id)), value[1]] if is_link(value) else value
                    for name, value in given.items()
                }
                fingerprint = NODE_CLASSES[node["class_type"]].fingerprint(folders, given)
                signature = [node["class_type"], fingerprint, inputs]
                keys[node_id] = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()
            return keys[node_id]

        for node_id in prompt:
            key(node_id)
        return keys

    def retain(self, keys) -> None:
        keep = set(keys)
        self._entries = {k: v for k, v in self._entries.items() if k in keep}

    def get(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    def set(self, key: str, entry: CacheEntry) -> None:
        self._entries[key] = entry


class ExecutionList:
    """ComfyUI's ExecutionList: the nodes the outputs need that are not cached, in a UX-friendly order."""

    def __init__(self, prompt: dict, outputs: list[str], is_cached):
        self.prompt = prompt
        self.waiting_for: dict[str, set[str]] = {}  # node -> upstream nodes it still needs
        self.blocking: dict[str, set[str]] = {}  # node -> downstream nodes that wait for it
        for output in outputs:
            stack = [output]
            while stack:
                node_id = stack.pop()
                if node_id in self.waiting_for:
                    continue
                self.waiting_for[node_id] = set()
                self.blocking.setdefault(node_id, set())
                for value in prompt[node_id]["inputs"].values():
                    # Cached upstream nodes are not run again: their outputs come from the cache.
                    if is_link(value) and not is_cached(value[0]):
                        stack.append(value[0])
                        self.waiting_for[node_id].add(value[0])
                        self.blocking.setdefault(value[0], set()).add(node_id)

    def __bool__(self) -> bool:
        return bool(self.waiting_for)

    def _is_output(self, node_id: str) -> bool:
        return NODE_CLASSES[self.prompt[node_id]["class_type"]].OUTPUT_NODE

    def next(self) -> str:
        ready = [node_id for node_id, waits in self.waiting_for.items() if not waits]
        if not ready:
            raise RuntimeError("Dependency cycle detected")
        # As ComfyUI: an output first, then a node an output waits for, then one two steps away.
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(self._is_output(b2) for b in self.blocking[node_id] for b2 in self.blocking[b]):
                return node_id
        return ready[0]

    def done(self, node_id: str) -> None:
        del self.waiting_for[node_id]
        for waiter in self.blocking[node_id]:
            if waiter in self.waiting_for:
                self.waiting_for[waiter].discard(node_id)


# --- Validation: ComfyUI's execution.validate_prompt / validate_inputs ------------------------------------------


def _error(kind: str, message: str, details: str, **extra_info) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _exception_info(ex: Exception) -> dict:
    return {"exception_type": type(ex).__qualname__, "traceback": traceback.format_tb(ex.__traceback__)}


class _Validator:
    def __init__(self, prompt: dict, folders: Folders):
        self.prompt = prompt
        self.folders = folders
        self.validated: dict[str, tuple[bool, list]] = {}

    def node(self, node_id: str) -> tuple[bool, list]:
        if node_id in self.validated:
            return self.validated[node_id]
        inputs = self.prompt[node_id]["inputs"]
        cls = NODE_CLASSES[self.prompt[node_id]["class_type"]]
        declared = cls.input_types(self.folders)
        errors, valid = [], True
        for section in ("required", "optional"):
            for name, spec in declared.get(section, {}).items():
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if name not in inputs:
                    if section == "required":
                        errors.append(
                            _error("required_input_missing", "Required input is missing", name, input_name=name)
                        )
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    valid = self._link(node_id, name, spec, value, errors) and valid
                else:
                    self._literal(inputs, name, kind, options, spec, cls, errors)
        if cls.VALIDATED_INPUTS:
            result = cls.validate(self.folders, **{k: inputs[k] for k in cls.VALIDATED_INPUTS if k in inputs})
            if result is not True:
                for name in cls.VALIDATED_INPUTS:
                    details = name if result is False else f"{name} - {result}"
                    errors.append(
                        _error(
                            "custom_validation_failed", "Custom validation failed for node", details, input_name=name
                        )
                    )
        result = (not errors and valid, errors)
        self.validated[node_id] = result
        return result

    def _link(self, node_id, name, spec, value, errors) -> bool:
        if len(value) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            errors.append(
                _error("bad_linked_input", message, name, input_name=name, input_config=spec, received_value=value)
            )
            return True
        # A missing node raises KeyError here, on purpose: ComfyUI reports it as exception_during_validation.
        source = self.prompt[value[0]]
        received = NODE_CLASSES[source["class_type"]].RETURN_TYPES[value[1]]
        if received != spec[0] and "*" not in (received, spec[0]):
            errors.append(
                _error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{name}, received_type({received}) mismatch input_type({spec[0]})",
                    input_name=name,
                    input_config=spec,
                    received_type=received,
                    linked_node=value,
                )
            )
            return True
        try:
            return self.node(value[0])[0]
        except Exception as ex:
            error = _error(
                "exception_during_inner_validation",
                "Exception when validating inner node",
                str(ex),
                input_name=name,
                input_config=spec,
                exception_message=str(ex),
                linked_node=value,
                **_exception_info(ex),
            )
            self.validated[value[0]] = (False, [error])
            return False

    def _literal(self, inputs, name, kind, options, spec, cls, errors) -> None:
        value = inputs[name]
        try:
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
            converter = converters.get(kind) if isinstance(kind, str) else None  # a list is a choice input
            if converter is not None:
                # ComfyUI stores the converted value back into the graph (it shows in /queue and /history).
                value = inputs[name] = converter(value)
        except Exception as ex:
            errors.append(
                _error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {kind} value",
                    f"{name}, {value}, {ex}",
                    input_name=name,
                    input_config=spec,
                    received_value=value,
                    exception_message=str(ex),
                )
            )
            return
        if name in cls.VALIDATED_INPUTS:
            return
        if "min" in options and value < options["min"]:
            kind, message, details = (
                "value_smaller_than_min",
                f"Value {value} smaller than min of {options['min']}",
                name,
            )
        elif "max" in options and value > options["max"]:
            kind, message, details = "value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name
        elif isinstance(kind, list) and value not in kind:
            # Like ComfyUI, long lists (model folders) are not echoed back in full.
            listing = f"(list of length {len(kind)})" if len(kind) > 20 else " - ".join(str(x) for x in kind)
            spec = None if len(kind) > 20 else spec
            kind, message, details = "value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}"
        else:
            return
        errors.append(_error(kind, message, details, input_name=name, input_config=spec, received_value=value))


def validate_prompt(prompt: Any, targets: Any, folders: Folders) -> tuple[dict | None, list[str], dict]:
    """Returns (error, outputs to execute, node_errors). `error` set means the prompt is refused (HTTP 400).

    Converted input values are written back into `prompt`, as ComfyUI does.
    """
    if not isinstance(prompt, dict):
        # ComfyUI answers 500 here (it crashes on the attribute access); a clear 400 is kinder and harmless.
        return _error("invalid_prompt", "Cannot execute because the prompt is not a JSON object.", ""), [], {}
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            return _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
        cls = NODE_CLASSES.get(node["class_type"])
        if cls is None:
            message = f"Cannot execute because node {node['class_type']} does not exist."
            return _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
        if cls.OUTPUT_NODE and (targets is None or node_id in targets):
            outputs.append(node_id)
    if not outputs:
        return _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    validator = _Validator(prompt, folders)
    good, failures, node_errors = [], [], {}
    for output in outputs:
        try:
            valid, reasons = validator.node(output)
        except Exception as ex:
            info = _exception_info(ex)
            valid, reasons = (
                False,
                [_error("exception_during_validation", "Exception when validating node", str(ex), **info)],
            )
            validator.validated[output] = (False, reasons)
        if valid:
            good.append(output)
            continue
        if reasons:
            failures.extend(f"{r['message']}: {r['details']}" for r in reasons)
        # As ComfyUI: every invalid node seen so far that has errors of its own names this output as dependent.
        for node_id, (node_valid, node_reasons) in validator.validated.items():
            if not node_valid and node_reasons:
                entry = node_errors.setdefault(
                    node_id,
                    {"errors": node_reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
                )
                entry["dependent_outputs"].append(output)
    if not good:
        return (
            _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(failures)),
            [],
            node_errors,
        )
    return None, good, node_errors
