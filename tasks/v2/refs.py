"""
`core/ASSET` references in a v2 job's graph, made into what the engine already sends: the SDKs put
{"__type": "core/ASSET", "info": {"id": ...}} where a node input would name a file, and the hub turns each into the
user's Upload of the same bytes, which servers/sending.py copies to the job's own server before its prompt.
"""

import copy
import hashlib
import uuid

from django.core.files.base import ContentFile

from tasks.models import Asset, Upload
from tasks.params import BindingError
from tasks.submission import UPLOAD_FORMATS, store_upload

ASSET_TYPE = "core/ASSET"
IMAGE_TYPES = frozenset(UPLOAD_FORMATS.values())


class MissingAsset(BindingError):
    """A reference that is malformed, or names no asset of the user's the engine can send (the contract's 422)."""

    code = "missing_asset"


def is_reference(value):
    return isinstance(value, dict) and value.get("__type") == ASSET_TYPE


def _references_inside(value):
    """Whether a reference hides deeper than a node input's own value (in a list, an object), where none can go."""
    if is_reference(value):
        return True
    if isinstance(value, dict):
        return any(_references_inside(item) for item in value.values())
    if isinstance(value, list):
        return any(_references_inside(item) for item in value)
    return False


def _asset_of(user, reference):
    """The user's asset a reference names, or a sentence saying why there is none the engine can send."""
    info = reference.get("info")
    raw = info.get("id") if isinstance(info, dict) else None
    try:
        asset_id = uuid.UUID(raw) if isinstance(raw, str) else None
    except ValueError:
        asset_id = None
    if asset_id is None:
        return None, "is a core/ASSET reference without an asset id in info.id"
    # info.hash and info.file_path are hints the contract says never override a present id: not read.
    asset = Asset.objects.owned_by(user).filter(pk=asset_id).first()
    if asset is None:
        return None, f"names asset {asset_id}, which you do not have"
    if asset.content_type not in IMAGE_TYPES:
        return None, f"names asset {asset_id}, which is not a PNG, JPEG or WebP image: only images can be job inputs"
    return asset, None


def upload_of(asset):
    """The owner's Upload of the asset's bytes: the one they already have (same sha256), else one made now."""
    upload = Upload.objects.filter(owner_id=asset.owner_id, sha256=asset.sha256).first()
    if upload is not None:
        return upload
    with asset.file.open("rb") as file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != asset.sha256:
        raise MissingAsset("An asset's file is damaged.", {str(asset.pk): "its stored bytes changed"})
    name = asset.original_name.rsplit("/", 1)[-1] or f"{asset.pk}{asset.extension}"
    return store_upload(asset.owner, ContentFile(data, name=name))


def resolve_asset_refs(user, graph):
    """
    Return (a copy of `graph` with every core/ASSET input replaced by the name of the user's Upload of its bytes,
    the engine's image inputs [{"node", "input", "upload"}] for Task.image_inputs). Raises MissingAsset, with one
    sentence per offending `<node>.<input>`, when a reference is malformed, not the user's, or not an image.
    """
    graph = copy.deepcopy(graph)
    problems, found = {}, []
    for node_id, node in graph.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for name, value in inputs.items():
            where = f"{node_id}.{name}"
            if not is_reference(value):
                if _references_inside(value):
                    problems[where] = "holds a core/ASSET reference inside it: a reference must be an input's value"
                continue
            asset, problem = _asset_of(user, value)
            if problem:
                problems[where] = problem
            else:
                found.append((str(node_id), name, asset))
    if problems:
        # Before any Upload is made: a refused graph leaves nothing behind.
        raise MissingAsset("Some asset references cannot be used.", problems)
    images = []
    for node_id, name, asset in found:
        upload = upload_of(asset)
        graph[node_id]["inputs"][name] = upload.remote_name
        images.append({"node": node_id, "input": name, "upload": str(upload.pk)})
    return graph, images
