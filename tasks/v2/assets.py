"""
Comfy API v2 assets: upload (kept once per user and content), mint from a hash the user already has, probe a hash,
read, download (with Range) and delete. Another user's asset, or hash, is not found, exactly like a missing one.

What an upload may hold: a PNG, JPEG or WebP image, checked from its bytes (tasks/submission.py read_image). Those are
what a job can take as input today: the engine copies them to the job's server as uploads (tasks/v2/refs.py).
Job outputs are assets too (output_asset), whatever their type, as the hub stored them.
"""

import hashlib
import re
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from ninja import File, Form, Router, Schema, Status
from ninja.files import UploadedFile

from tasks.models import Asset, blake3_of
from tasks.models.assets import asset_path
from tasks.quota import StorageFull, check_storage
from tasks.ranges import Missing, stored_response
from tasks.storage import Spool, delete_quietly, save_verified
from tasks.submission import UPLOAD_FORMATS, describe_size, read_image
from tasks.validators import BindingError, text_problem

router = Router(tags=["assets"])

HASH = re.compile(r"^(?:blake3:)?([0-9a-f]{64})$")
# The content URL is the content endpoint itself, behind the same bearer token; it never expires, but the contract
# wants a time after which a client should ask for a fresh one.
URL_LIFETIME = timedelta(hours=1)


class AssetOut(Schema):
    id: str
    hash: str | None
    size_bytes: int
    content_type: str
    file_path: str | None = None
    created_new: bool | None = None
    created_at: datetime
    url: str
    url_expires_at: datetime
    expires_at: datetime | None = None
    job_id: str | None = None


class ErrorBody(Schema):
    code: str
    message: str
    details: dict | None = None


class ErrorOut(Schema):
    error: ErrorBody


class FromHashIn(Schema):
    hash: str
    file_path: str | None = None
    tags: list[str] | None = None


def error(status, code, message, details=None):
    return JsonResponse({"error": {"code": code, "message": message, "details": details or {}}}, status=status)


def storage_full(exc):
    """403 as for a job (tasks/v2/jobs.py): only deleting files or a larger quota lets a new one in."""
    return error(403, exc.code, exc.message, exc.details)


def not_found():
    return error(404, "not_found", "There is no such asset.")


def asset_json(request, asset, created_new=None):
    return {
        "id": str(asset.pk),
        "hash": asset.hash,
        "size_bytes": asset.size,
        "content_type": asset.content_type,
        "file_path": asset.original_name or None,
        "created_new": created_new,
        "created_at": asset.created_at,
        "url": request.build_absolute_uri(f"/api/v2/assets/{asset.pk}/content"),
        "url_expires_at": timezone.now() + URL_LIFETIME,
        "expires_at": None,
        "job_id": asset.job_id,
    }


def own_assets(user):
    return Asset.objects.owned_by(user).select_related("output")


def parse_hash(value):
    """The hex blake3 of `blake3:<hex>` (or bare hex), or None."""
    match = HASH.match(value.strip().lower()) if isinstance(value, str) else None
    return match.group(1) if match else None


def name_problem(file_path):
    if file_path is None:
        return None
    problem = text_problem(file_path)
    if problem:
        return f"file_path {problem}"
    if len(file_path) > 255:
        return "file_path must be at most 255 characters"
    return None


def output_asset(output):
    """
    The asset of a task's output, made the first time it is asked for. It points at the output's stored file (the
    bytes are kept once, and go when the task's outputs go); its blake3 is read from that file, or left unknown
    (the contract's null hash) while the file is missing from storage.
    """
    try:
        return output.asset
    except Asset.DoesNotExist:
        pass
    try:
        with output.file.open("rb") as file:
            digest = blake3_of(file)
    except FileNotFoundError:
        digest = ""
    asset = Asset(
        owner_id=output.task.owner_id,
        blake3=digest,
        sha256=output.sha256,
        size=output.size,
        content_type=output.content_type,
        original_name=output.display_name,
        output=output,
    )
    asset.file.name = output.file.name
    try:
        with transaction.atomic():
            asset.save()
    except IntegrityError:
        # Another request made it first (one asset per output).
        return Asset.objects.get(output=output)
    return asset


def mint(user, data, content_type, file_path, digest=None):
    """
    Return (asset, created): the user's asset of these bytes, stored now unless they already had it. StorageFull
    when they did not and their storage quota is used up (the asset they already have costs nothing more).
    """
    digest = digest or blake3_of(ContentFile(data))
    existing = Asset.objects.owned_by(user).uploaded().filter(blake3=digest).first()
    if existing is not None:
        return existing, False
    check_storage(user)
    asset = Asset(
        id=uuid.uuid4(),
        owner=user,
        blake3=digest,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        content_type=content_type,
        original_name=(file_path or "")[:255],
    )
    asset.file.name = save_verified(asset_path(asset, asset.extension), Spool.of(data))
    try:
        with transaction.atomic():
            asset.save()
    except IntegrityError:
        # The same bytes arrived twice at once: the other request stored them.
        delete_quietly(asset.file.name)
        return Asset.objects.owned_by(user).uploaded().get(blake3=digest), False
    except BaseException:
        delete_quietly(asset.file.name)
        raise
    return asset, True


@router.post(
    "/assets",
    response={200: AssetOut, 201: AssetOut, 403: ErrorOut, 409: ErrorOut, 413: ErrorOut, 415: ErrorOut, 422: ErrorOut},
    summary="Upload an asset (multipart); the same bytes again are the same asset",
)
def post_asset(
    request,
    file: File[UploadedFile],
    content_type: Form[str | None] = None,  # the client's guess, never trusted: the type is read from the bytes
    file_path: Form[str | None] = None,
    expected_hash: Form[str | None] = None,
):
    limit = settings.COMFYHUB["MAX_UPLOAD_BYTES"]
    if file.size > limit:
        message = f"The file is {describe_size(file.size)}; an asset may be at most {describe_size(limit)}."
        return error(413, "payload_too_large", message)
    file_path = file_path if file_path is not None else file.name
    problem = name_problem(file_path)
    if problem:
        return error(422, "invalid_request", f"The {problem}.", {"file_path": problem})
    expected = None
    if expected_hash:
        expected = parse_hash(expected_hash)
        if expected is None:
            message = "expected_hash must be blake3: followed by 64 hex digits"
            return error(422, "invalid_request", f"The {message}.", {"expected_hash": message})
    try:
        data, fmt, _, _ = read_image(file)
    except BindingError as exc:
        return error(415, "unsupported_media_type", f"{exc.message} Assets must be PNG, JPEG or WebP images.")
    digest = blake3_of(ContentFile(data))
    if expected is not None and expected != digest:
        return error(
            409, "hash_mismatch", "The file's blake3 is not the expected_hash sent with it; nothing was stored.",
            {"expected_hash": f"blake3:{expected}", "hash": f"blake3:{digest}"},
        )  # fmt: skip
    try:
        asset, created = mint(request.user, data, UPLOAD_FORMATS[fmt], file_path, digest)
    except StorageFull as exc:
        return storage_full(exc)
    return Status(201 if created else 200, asset_json(request, asset, created_new=created))


@router.post(
    "/assets/from-hash",
    response={200: AssetOut, 201: AssetOut, 403: ErrorOut, 404: ErrorOut, 422: ErrorOut},
    summary="The asset of bytes the user already has, by blake3",
)
def asset_from_hash(request, body: FromHashIn):
    digest = parse_hash(body.hash)
    if digest is None:
        message = "hash must be blake3: followed by 64 hex digits"
        return error(422, "invalid_request", f"The {message}.", {"hash": message})
    problem = name_problem(body.file_path)
    if problem:
        return error(422, "invalid_request", f"The {problem}.", {"file_path": problem})
    mine = own_assets(request.user).filter(blake3=digest)
    asset = mine.filter(output__isnull=True).first()
    if asset is not None:
        return Status(200, asset_json(request, asset, created_new=False))
    source = mine.first()  # an output of one of the user's jobs: its bytes become an upload of theirs
    if source is not None:
        try:
            with source.file.open("rb") as file:
                data = file.read()
        except FileNotFoundError:
            source = None
    if source is None:
        return error(404, "blob_not_found", "You have no file with this hash; upload it.")
    try:
        asset, created = mint(request.user, data, source.content_type, body.file_path or source.original_name, digest)
    except StorageFull as exc:
        return storage_full(exc)
    return Status(201 if created else 200, asset_json(request, asset, created_new=created))


@router.api_operation(
    ["HEAD"], "/assets/by-hash/{hash}", url_name="asset_by_hash", summary="Whether the user has a file with this blake3"
)
def head_asset_by_hash(request, hash: str):
    digest = parse_hash(hash)
    found = digest is not None and own_assets(request.user).filter(blake3=digest).exists()
    return HttpResponse(status=200 if found else 404)


@router.get("/assets/{uuid:asset_id}", response={200: AssetOut, 404: ErrorOut}, summary="Asset metadata")
def get_asset(request, asset_id: uuid.UUID):
    asset = own_assets(request.user).filter(pk=asset_id).first()
    if asset is None:
        return not_found()
    return Status(200, asset_json(request, asset))


@router.get(
    "/assets/{uuid:asset_id}/content",
    response={404: ErrorOut, 416: ErrorOut},
    summary="Asset bytes; one byte range (Range: bytes=a-b) answers 206",
)
def get_asset_content(request, asset_id: uuid.UUID):
    asset = own_assets(request.user).filter(pk=asset_id).first()
    if asset is None:
        return not_found()
    name = asset.original_name.rsplit("/", 1)[-1] or f"{asset.pk}{asset.extension}"
    etag = f'"{asset.blake3}"' if asset.blake3 else None
    try:
        return stored_response(request, asset.file.name, asset.size, asset.content_type, name, etag)
    except Missing:
        return error(404, "not_found", "The file of this asset is missing from storage.")


@router.delete("/assets/{uuid:asset_id}", response={204: None, 404: ErrorOut, 409: ErrorOut}, summary="Delete an asset")
def delete_asset(request, asset_id: uuid.UUID):
    asset = own_assets(request.user).filter(pk=asset_id).first()
    if asset is None:
        return not_found()
    if asset.output_id:
        return error(
            409, "asset_is_output",
            f"This asset is an output of job {asset.job_id}; it is kept with its job and cannot be deleted alone.",
        )  # fmt: skip
    name = asset.file.name
    with transaction.atomic():
        asset.delete()
        transaction.on_commit(lambda: delete_quietly(name))
    return Status(204, None)
