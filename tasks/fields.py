"""A JSONField that can always be shown: rows stored with lone surrogates read back with U+FFFD in their place."""

import json
import re

from django.db import models

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(value):
    """`value` (decoded JSON) with every lone surrogate, in text and in keys, replaced by U+FFFD."""
    if isinstance(value, str):
        return value if value.isascii() else LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {without_lone_surrogates(key): without_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    return value


class SurrogateSafeDecoder(json.JSONDecoder):
    """
    JSON allows "\\ud800", UTF-8 cannot hold it: SQLite kept such text (escaped) before the API refused it, and a
    page or an upstream request holding it fails to encode. Only text holding a surrogate escape is walked, so
    the common row costs two substring scans.
    """

    def decode(self, s, *args, **kwargs):
        value = super().decode(s, *args, **kwargs)
        if "\\ud" in s or "\\uD" in s:
            return without_lone_surrogates(value)
        return value


class JSONField(models.JSONField):
    """models.JSONField that reads with SurrogateSafeDecoder. A read-side repair only: same column, same SQL."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("decoder", SurrogateSafeDecoder)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        # Migrations see a plain JSONField: the decoder changes nothing in the database.
        name, _path, args, kwargs = super().deconstruct()
        if kwargs.get("decoder") is SurrogateSafeDecoder:
            del kwargs["decoder"]
        return name, "django.db.models.JSONField", args, kwargs
