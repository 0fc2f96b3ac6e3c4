"""
Django's STORAGES for the hub's files (outputs, uploads, assets, thumbnails): MEDIA_ROOT on local disk by default,
or an S3-compatible bucket through django-storages when COMFYHUB_S3_BUCKET is set, so that any number of web and
worker hosts share one store. Static files keep Django's own default.
"""

from django.core.exceptions import ImproperlyConfigured

STATIC = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
# The variables of a bucket; only COMFYHUB_S3_BUCKET is required (credentials may come from the host's role).
S3_VARIABLES = {
    "COMFYHUB_S3_ENDPOINT_URL": "endpoint_url",  # SeaweedFS, MinIO, R2...; unset: AWS itself
    "COMFYHUB_S3_REGION": "region_name",
    "COMFYHUB_S3_ACCESS_KEY_ID": "access_key",
    "COMFYHUB_S3_SECRET_ACCESS_KEY": "secret_key",
    "COMFYHUB_S3_PREFIX": "location",  # a folder inside the bucket, for a bucket shared with something else
}


def storages_setting(environ):
    """
    The STORAGES setting read from `environ`. Path-style addressing and SigV4 (client_config) work on every
    S3-compatible server; presigned URLs need SigV4 to carry the response headers the hub sets.
    """
    bucket = environ.get("COMFYHUB_S3_BUCKET", "").strip()
    if not bucket:
        for name in S3_VARIABLES:
            if environ.get(name):
                raise ImproperlyConfigured(f"{name} is set but COMFYHUB_S3_BUCKET is not: name the bucket too.")
        # No location option: FileSystemStorage follows MEDIA_ROOT, even when a test changes it.
        return {"default": {"BACKEND": "django.core.files.storage.FileSystemStorage"}, "staticfiles": STATIC}
    options = {
        "bucket_name": bucket,
        "file_overwrite": False,  # a name already taken gets a suffix, as on disk
        "default_acl": None,  # objects stay private: every download goes through the hub's ownership check
        "querystring_auth": True,
        "querystring_expire": 60,
    }
    for name, option in S3_VARIABLES.items():
        value = environ.get(name, "").strip()
        if value:
            options[option] = value.strip("/") if option == "location" else value
    options.setdefault("region_name", "us-east-1")
    options["client_config"] = client_config()
    return {"default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options}, "staticfiles": STATIC}


def client_config():
    """
    botocore's settings for the bucket. Its defaults (60 s to connect, 60 s per read, then retries) would let a bucket
    that hangs hold a worker or a page for minutes; the hub retries a failed save itself (tasks/storage.py).
    """
    from botocore.config import Config

    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
    )


def uses_bucket(storage):
    """Whether `storage` keeps files in an S3 bucket (presigned URLs, ranged GETs) rather than on a disk."""
    return hasattr(storage, "bucket_name") and hasattr(storage, "connection")
