"""
Settings for comfyhub, read from the environment.

Unset means the embedded default: a SQLite file in the project, Channels' in-memory layer and the upstream
supervisor running inside the Daphne process. That default exists so that one command starts a usable hub on
a fresh machine with no database or Redis server. Production sets DATABASE_URL (PostgreSQL) and REDIS_URL and
runs `manage.py run_upstream` beside any number of Daphne processes.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


def env_int(name, default, minimum=0):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {number}")
    return number


def env_list(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY") or "comfyhub-embedded-default-not-for-production"
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
    "channels",
    "django_htmx",
    "template_partials",
    "servers",
    "tasks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
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
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'var' / 'comfyhub.sqlite3'}"
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
    _database["TEST"] = {"NAME": str(BASE_DIR / "var" / "test.sqlite3")}
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USING_SQLITE = _database["ENGINE"] == "django.db.backends.sqlite3"

# --- Channel layer --------------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": os.environ.get("REDIS_PREFIX", "comfyhub")},
        }
    }
else:
    # The in-memory layer cannot cross processes, which is why the supervisor runs inside Daphne then.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Auth, i18n, files ----------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or BASE_DIR / "var" / "static")
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT") or BASE_DIR / "var" / "media")
MEDIA_URL = "/media/"  # never served directly: outputs go through an ownership check
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# --- comfyhub -------------------------------------------------------------------------------------------
COMFYHUB = {
    # How many times a task is sent to a server again after a server lost it (restart) before it fails.
    "MAX_ATTEMPTS": env_int("COMFYHUB_MAX_ATTEMPTS", 3, minimum=1),
    # Seconds between reconciliations of every active task of a connected server against /queue and /history.
    "RECONCILE_INTERVAL": env_int("COMFYHUB_RECONCILE_INTERVAL", 10, minimum=1),
    # How often a task's progress may be written and pushed (ComfyUI can send 200 progress messages a second).
    "PROGRESS_INTERVAL": float(os.environ.get("COMFYHUB_PROGRESS_INTERVAL") or 0.25),
    # Largest output file copied off a GPU server, in bytes.
    "MAX_OUTPUT_BYTES": env_int("COMFYHUB_MAX_OUTPUT_BYTES", 200 * 1024 * 1024, minimum=1),
    # Largest image a user may upload, in bytes.
    "MAX_UPLOAD_BYTES": env_int("COMFYHUB_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1),
    # Seconds a worker's ownership lease on a server lasts without a heartbeat.
    "LEASE_SECONDS": env_int("COMFYHUB_LEASE_SECONDS", 15, minimum=2),
    # Whether the supervisor runs inside Daphne (embedded) or in run_upstream processes (production).
    "EMBEDDED_SUPERVISOR": env_bool("COMFYHUB_EMBEDDED_SUPERVISOR", not REDIS_URL),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}
