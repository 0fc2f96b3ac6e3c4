"""
Settings for comfyhub, read from the environment.

Unset means the embedded default: a SQLite file in the project, Channels' in-memory layer and the upstream
supervisor running inside the Daphne process. That default exists so that one command starts a usable hub on
a fresh machine with no database or Redis server. Production sets DATABASE_URL (PostgreSQL) and REDIS_URL and
runs `manage.py run_upstream` beside any number of Daphne processes.
"""

import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from comfyhub.env import env_bool, env_float, env_int, env_list
from comfyhub.object_storage import storages_setting

BASE_DIR = Path(__file__).resolve().parent.parent
# The embedded hub's own files: its SQLite database, media, static files and the demo simulators' outputs, unless
# the variables below name other places. One `serve` at a time owns it (tasks/management/commands/serve.py).
VAR_DIR = Path(os.environ.get("COMFYHUB_VAR_DIR") or BASE_DIR / "var").resolve()


DEBUG = env_bool("DEBUG", False)
# The embedded default needs no configuration; COMFYHUB_PRODUCTION refuses to start with it (see below).
EMBEDDED_SECRET_KEY = "comfyhub-embedded-default-not-for-production"  # noqa: S105  (refused in production)
SECRET_KEY = os.environ.get("SECRET_KEY") or EMBEDDED_SECRET_KEY
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "axes",
    "django_htmx",
    "template_partials",
    "servers",
    "tasks",
    "ops",
    "bench",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Before anything reads a query string or form: text that is not UTF-8 is a 400 naming the field.
    "comfyhub.middleware.refuse_undecodable_text",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as its docs ask: it turns a login that axes refused into the lockout page (comfyhub/lockout.py).
    "axes.middleware.AxesMiddleware",
    # Sync only, at the bottom: the whole chain runs in the views' thread (comfyhub/middleware.py).
    "comfyhub.middleware.sync_chain",
]

ROOT_URLCONF = "comfyhub.urls"
ASGI_APPLICATION = "comfyhub.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tasks.context_processors.running_count",
                "tasks.context_processors.demo",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'comfyhub.sqlite3'}"
try:
    _database = dj_database_url.parse(DATABASE_URL, conn_max_age=0)
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL this hub understands: {exc}") from None
if _database["ENGINE"] == "django.db.backends.sqlite3":
    if _database["NAME"] not in ("", ":memory:"):
        Path(_database["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Several threads (request handlers, the supervisor) write at once: IMMEDIATE transactions take the write
    # lock up front so that they queue behind the busy timeout instead of failing with "database is locked".
    _database.setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file (not :memory:) so that subprocesses started by the tests see the same database.
    _database["TEST"] = {"NAME": os.environ.get("COMFYHUB_TEST_SQLITE") or str(VAR_DIR / "test.sqlite3")}
elif _database["ENGINE"] == "django.db.backends.postgresql":
    # Under ASGI every database_sync_to_async call (each websocket render, each supervisor step) opens and closes
    # a connection; a PostgreSQL connection costs milliseconds to open. psycopg's pool keeps a few open per process
    # (Django 5.1+; CONN_MAX_AGE must stay 0 with it). Keep DB_POOL_MAX x processes under max_connections.
    _database.setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": env_int("COMFYHUB_DB_POOL_MAX", 10, minimum=2),
        "timeout": 30,
    }
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USING_SQLITE = _database["ENGINE"] == "django.db.backends.sqlite3"

# --- Channel layer and cache ----------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
REDIS_PREFIX = os.environ.get("REDIS_PREFIX", "comfyhub")
# A user's live feed in one Daphne process reads one channel (tasks/consumers.py); it drains it as fast as messages
# arrive, so the layers' default cap of 100 queued messages on a channel (over it, a message is dropped without a
# word) is only reached by a burst. Give the process's channels room. (Feeds use the consumers' "specific" prefix:
# channels_redis' core layer reads only one prefix of a process's own channels at a time.)
FEED_CAPACITY = {"specific*": env_int("COMFYHUB_FEED_CAPACITY", 10_000, minimum=100)}
# Which channels_redis layer: "pubsub" (Redis PUBLISH/SUBSCRIBE: one round trip per message sent, none per message
# received) or "core" (lists read with BZPOPMIN: durable for a minute, four round trips per message). BENCHMARKS.md
# has the figures that chose the default.
REDIS_LAYER = os.environ.get("COMFYHUB_REDIS_LAYER", "pubsub")
if REDIS_LAYER not in ("pubsub", "core"):
    raise ImproperlyConfigured(f"COMFYHUB_REDIS_LAYER must be pubsub or core, not {REDIS_LAYER!r}")
if REDIS_URL:
    _redis_host = {
        # redis-py's default 5 s socket timeout equals channels_redis' 5 s BRPOP: an idle receive() would fail
        # with a timeout instead of simply returning nothing. Give reads more room than that.
        "address": REDIS_URL,
        "socket_timeout": 15,
        "socket_connect_timeout": 5,
    }
    if REDIS_LAYER == "pubsub":
        CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                # A subscriber's socket may sit idle for as long as nothing is published: no read timeout.
                "CONFIG": {"hosts": [{**_redis_host, "socket_timeout": None}], "prefix": REDIS_PREFIX},
            }
        }
    else:
        CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {
                    # redis-py 8 caps a pool at 100 connections and fails the 101st command at once instead of
                    # waiting: a burst of browser sockets opening together (a deploy, a Wi-Fi reconnect) would get
                    # HTTP 500 from group_add. Idle connections are reused, so the cap only bounds bursts.
                    "hosts": [
                        {**_redis_host, "max_connections": env_int("COMFYHUB_REDIS_MAX_CONNECTIONS", 2000)}
                    ],
                    "prefix": REDIS_PREFIX,
                    "channel_capacity": FEED_CAPACITY,
                },
            }
        }
    # The bearer-token failure counters (comfyhub/ratelimit.py) must be shared by every process.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
            "OPTIONS": {"socket_timeout": 2, "socket_connect_timeout": 2},
        }
    }
else:
    # The in-memory layer cannot cross processes, which is why the supervisor runs inside Daphne then.
    CHANNEL_LAYERS = {
        # InMemoryChannelLayer reads channel_capacity as (compiled pattern, capacity) pairs, unlike channels_redis.
        "default": {
            "BACKEND": "comfyhub.layers.EmbeddedChannelLayer",
            "CONFIG": {"channel_capacity": [(re.compile(r"^specific"), FEED_CAPACITY["specific*"])]},
        }
    }
    # Per process, like the layer: the embedded default is one process.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Auth, i18n, files ----------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Axes refuses a locked-out login before ModelBackend checks the password (the login page's and the admin's).
# It needs the request: authenticate(request, ...) without one raises AxesBackendRequestParameterRequired.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
FORMAT_MODULE_PATH = ["comfyhub.formats"]  # datetimes to the second (comfyhub/formats/en/formats.py)

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or VAR_DIR / "static")
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT") or VAR_DIR / "media")
MEDIA_URL = "/media/"  # never served directly: outputs go through an ownership check
# Outputs, uploads and assets: MEDIA_ROOT on local disk, or an S3-compatible bucket when COMFYHUB_S3_BUCKET is
# set (comfyhub/object_storage.py). Every file goes through Django's storage API; nothing reads MEDIA_ROOT itself.
STORAGES = storages_setting(os.environ)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# --- comfyhub -------------------------------------------------------------------------------------------
COMFYHUB = {
    # How many times a task is sent to a server again after a server lost it (restart) before it fails.
    "MAX_ATTEMPTS": env_int("COMFYHUB_MAX_ATTEMPTS", 3, minimum=1),
    # Seconds between reconciliations of every active task of a connected server against /queue and /history.
    "RECONCILE_INTERVAL": env_int("COMFYHUB_RECONCILE_INTERVAL", 10, minimum=1),
    # Seconds between two writes of a running task's progress to the database (page loads and the API read it;
    # the live path does not): the newest value always lands before the task ends.
    "PROGRESS_INTERVAL": env_float("COMFYHUB_PROGRESS_WRITE_SECONDS", 1.0, minimum=0.01),
    # Seconds between two live progress pushes of one task (ComfyUI can send 200 progress messages a second): the
    # first change after a quiet spell goes out at once, the ones in between fold into the next push.
    "PUSH_INTERVAL": env_float("COMFYHUB_PUSH_INTERVAL", 0.05, minimum=0.001),
    # Sampler previews pushed per second per task, at most (the newest wins); 0 turns them off.
    "PREVIEW_FPS": env_float("COMFYHUB_PREVIEW_FPS", 4.0, minimum=0.0),
    # Seconds between two full garbage collections of a Daphne or run_upstream process (comfyhub/collector.py):
    # in between, collections walk only objects newer than the last full one; 0 leaves the collector as it is.
    "GC_FULL_SECONDS": env_float("COMFYHUB_GC_FULL_SECONDS", 600.0),
    # Largest output file copied off a GPU server, in bytes.
    "MAX_OUTPUT_BYTES": env_int("COMFYHUB_MAX_OUTPUT_BYTES", 200 * 1024 * 1024, minimum=1),
    # Largest image a user may upload, in bytes.
    "MAX_UPLOAD_BYTES": env_int("COMFYHUB_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1),
    # Seconds a worker's ownership lease on a server lasts without a heartbeat.
    "LEASE_SECONDS": env_int("COMFYHUB_LEASE_SECONDS", 15, minimum=2),
    # Seconds a server may be unreachable before its waiting tasks move to other servers (failover).
    "FAILOVER_SECONDS": env_int("COMFYHUB_FAILOVER_SECONDS", 30, minimum=1),
    # Seconds between health probes (/system_stats, /queue) of each server.
    "PROBE_INTERVAL": env_float("COMFYHUB_PROBE_INTERVAL", 5.0, minimum=0.05),
    # A probe slower than this (seconds) marks the server degraded.
    "SLOW_PROBE_SECONDS": env_float("COMFYHUB_SLOW_PROBE_SECONDS", 3.0),
    # Tasks one user may have on servers at once (0: no limit; fair share still takes turns between users).
    "USER_MAX_IN_FLIGHT": env_int("COMFYHUB_USER_MAX_IN_FLIGHT", 16),
    # Tasks one user may have waiting in the hub; over it the API answers 429 and the form says so.
    "USER_MAX_QUEUED": env_int("COMFYHUB_USER_MAX_QUEUED", 500, minimum=1),
    # How long an affinity lock pins a user's related tasks (same upload, same graph) to one server.
    "AFFINITY_SECONDS": env_int("COMFYHUB_AFFINITY_SECONDS", 600, minimum=1),
    # A task quiet longer than this (seconds) while submitted / running is stuck: recovery steps in.
    "STUCK_SUBMITTED": env_int("COMFYHUB_STUCK_SUBMITTED", 600, minimum=1),
    "STUCK_RUNNING": env_int("COMFYHUB_STUCK_RUNNING", 900, minimum=1),
    # Seconds between the supervisor's watchdog rounds over its servers' tasks.
    "WATCHDOG_INTERVAL": env_int("COMFYHUB_WATCHDOG_INTERVAL", 30, minimum=1),
    # Whether the supervisor runs inside Daphne (embedded) or in run_upstream processes (production).
    "EMBEDDED_SUPERVISOR": env_bool("COMFYHUB_EMBEDDED_SUPERVISOR", not REDIS_URL),
    # Bearer token that lets a Prometheus scraper read /metrics. Empty: only staff sessions may read it.
    "METRICS_TOKEN": os.environ.get("COMFYHUB_METRICS_TOKEN", ""),
    # Failed logins of one username from one address before that username is locked out *from that address*
    # (elsewhere it still logs in), and failed logins from one address, whatever the usernames, before the
    # address is locked out (credential stuffing; more, because several people may share an address behind a
    # NAT). A failure counts for LOCKOUT_SECONDS after the latest failure of its username and address; while
    # locked, the right password is refused too. See comfyhub/lockout.py (django-axes).
    "LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS": env_int(
        "COMFYHUB_LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS", 5, minimum=1
    ),
    "LOGIN_FAILURES_PER_ADDRESS": env_int("COMFYHUB_LOGIN_FAILURES_PER_ADDRESS", 20, minimum=1),
    # Invalid API bearer tokens one address may send within LOCKOUT_SECONDS (from the first of them) before its
    # invalid tokens are answered 429. A valid token is never refused.
    "TOKEN_FAILURES_PER_ADDRESS": env_int("COMFYHUB_TOKEN_FAILURES_PER_ADDRESS", 20, minimum=1),
    "LOCKOUT_SECONDS": env_int("COMFYHUB_LOCKOUT_SECONDS", 300, minimum=1),
    # Times one step of one task (send, reconcile, finish, cancel, ...) may fail the same way with an error the
    # hub did not expect before that task is failed with error_kind "internal_error". The other tasks go on.
    "STEP_FAILURES": env_int("COMFYHUB_STEP_FAILURES", 3, minimum=1),
    # Seconds a task may wait for a server able to run it while some enabled server's capabilities are unknown
    # (offline since the hub started); then it fails with error_kind "no_capable_server".
    "UNRUNNABLE_SECONDS": env_int("COMFYHUB_UNRUNNABLE_SECONDS", 600, minimum=1),
    # Webhook URLs may point at loopback, private, link-local or reserved addresses. Off by default: the workers
    # post from inside the operator's network, and a user's webhook must not reach what only they can reach.
    "WEBHOOKS_ALLOW_PRIVATE": env_bool("COMFYHUB_WEBHOOKS_ALLOW_PRIVATE", False),
    # Attempts to deliver one webhook before it is marked failed, and the wait after the first failed attempt,
    # doubled after each further one (5 s, 10 s, 20 s, ... about 10 minutes over 8 attempts).
    "WEBHOOK_MAX_ATTEMPTS": env_int("COMFYHUB_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1),
    "WEBHOOK_BACKOFF_SECONDS": env_float("COMFYHUB_WEBHOOK_BACKOFF_SECONDS", 5.0, minimum=0.01),
    # Seconds a receiver has to answer one webhook.
    "WEBHOOK_TIMEOUT": env_float("COMFYHUB_WEBHOOK_TIMEOUT", 5.0, minimum=0.1),
    # Bytes of outputs, uploads and assets one user may keep; at or over it new tasks and uploads are refused
    # with a message saying so (0: no limit). `manage.py prune_outputs` frees space.
    "USER_STORAGE_BYTES": env_int("COMFYHUB_USER_STORAGE_BYTES", 0),
    # With a bucket: seconds a download's presigned URL stays valid; the hub checks the owner, then redirects to
    # the bucket (at most 60). 0 streams every download through the hub instead.
    "PRESIGNED_SECONDS": env_int("COMFYHUB_S3_PRESIGNED_SECONDS", 0, maximum=60),
}

# Variables renamed when their meaning changed: a value set for the old meaning must not pass unseen.
RENAMED_VARIABLES = {
    "COMFYHUB_LOGIN_FAILURES_PER_USERNAME": (
        "COMFYHUB_LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS: failed logins lock a username out from the address "
        "they came from only"
    ),
}
for _old, _new in RENAMED_VARIABLES.items():
    if _old in os.environ:
        raise ImproperlyConfigured(f"{_old} is now {_new}.")

# django-axes, configured through comfyhub/lockout.py from the COMFYHUB values above (so that one setting
# changed in a test or the environment changes both). Attempts are database rows: every process shares them.
AXES_HANDLER = "comfyhub.lockout.LockoutHandler"
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]  # the address cap is LockoutHandler's (axes has one limit)
AXES_FAILURE_LIMIT = "comfyhub.lockout.failure_limit"
AXES_COOLOFF_TIME = "comfyhub.lockout.cool_off"
AXES_RESET_ON_SUCCESS = True  # a login forgets its username's failures from that address (only those)
# An attempt refused while locked out is not counted: the wait the page shows is the wait there is.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_USERNAME_CALLABLE = "comfyhub.lockout.username_key"
AXES_CLIENT_IP_CALLABLE = "comfyhub.lockout.client_ip"  # REMOTE_ADDR as Daphne (--proxy-headers) sets it
AXES_LOCKOUT_CALLABLE = "comfyhub.lockout.lockout_response"

# --- Production -----------------------------------------------------------------------------------------
# COMFYHUB_PRODUCTION=true is the one switch that says "real users reach this hub over HTTPS". Settings then
# refuse to start unsafe, and cookies, HSTS and the redirect to HTTPS are turned on. It is explicit rather than
# guessed from DATABASE_URL or REDIS_URL because a staging hub on a real database may well run over plain HTTP.
PRODUCTION = env_bool("COMFYHUB_PRODUCTION", False)
if PRODUCTION:
    if DEBUG:
        raise ImproperlyConfigured("COMFYHUB_PRODUCTION is set, so DEBUG must be false: it shows tracebacks.")
    if (
        SECRET_KEY == EMBEDDED_SECRET_KEY
        or len(SECRET_KEY) < 32
        or len(set(SECRET_KEY)) < 5
        or SECRET_KEY.startswith("django-insecure-")
    ):
        raise ImproperlyConfigured(
            "COMFYHUB_PRODUCTION is set, so SECRET_KEY must be a random string of at least 32 characters, "
            "not the embedded default; make one with: python -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
    if COMFYHUB["METRICS_TOKEN"] and len(COMFYHUB["METRICS_TOKEN"]) < 32:
        raise ImproperlyConfigured(
            "COMFYHUB_PRODUCTION is set, so COMFYHUB_METRICS_TOKEN must be empty or a random string of at least 32 "
            "characters: the right token is never locked out, so it must be one nobody can guess."
        )
    if "*" in ALLOWED_HOSTS:
        raise ImproperlyConfigured(
            "COMFYHUB_PRODUCTION is set, so ALLOWED_HOSTS must name the hub's hosts: with '*' any web page "
            "could open the hub's websockets in its visitors' names (the origin check uses ALLOWED_HOSTS)."
        )
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Probes and scrapers talk to Daphne directly over plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # Failed logins and lockouts are warnings; its INFO lines (a start banner, every login and logout) are noise.
        "axes": {"level": "WARNING"},
        # One line per task transition (ops/apps.py); WARNING silences them without silencing the rest.
        "comfyhub.tasks": {"level": os.environ.get("COMFYHUB_TASK_LOG_LEVEL", "INFO")},
    },
}
