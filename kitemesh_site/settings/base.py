"""Settings shared by every environment; everything that varies comes from the environment."""

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dj_database_url
from csp.constants import NONCE, NONE, SELF

from core.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = BASE_DIR / "var"  # the default SQLite database and test databases live here
VAR_DIR.mkdir(exist_ok=True)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


# --- Core -----------------------------------------------------------------------------------------
# The dev key only serves `make run` and tests; production.py refuses to start without a real one.
DEV_SECRET_KEY = "dev-insecure-kitemesh-key-change-me"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", DEV_SECRET_KEY)
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "adrf",
    "django_eventstream",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from our own static files, never a CDN
    "django_tasks",
    "django_tasks_db",
    "core",
    "chat",
    "approvals",
    "billing",
]

MIDDLEWARE = [
    "core.middleware.api_request_middleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
]

ROOT_URLCONF = "kitemesh_site.urls"
ASGI_APPLICATION = "kitemesh_site.asgi.application"

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

# --- Database -------------------------------------------------------------------------------------
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'kitemesh.sqlite3'}",
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several writers (API requests, commands) share one file: wait for the lock instead of failing.
    # WAL lets pages read while the API writes; synchronous=NORMAL syncs at checkpoints rather than at
    # every commit (a power cut may lose the last commits, never corrupt the file).
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
elif (
    DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    and os.environ.get("DATABASE_SERVER_SIDE_BINDING", "1") != "0"
):
    # Server-side parameter binding, and psycopg preparing a statement from its fifth run: PostgreSQL
    # parses and plans the statements every request runs once per connection (README Benchmarks). Behind
    # a pooler in transaction mode that cannot keep prepared statements, set DATABASE_SERVER_SIDE_BINDING=0.
    DATABASES["default"].setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=5)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth and pages -------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/approvals/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# --- Content-Security-Policy of the pages (django-csp; the API answers JSON and carries none) ----------
# Our own files only; the pages' few inline <style> and <script> blocks carry the request's nonce.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, NONCE],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

# --- API ------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["chat.authentication.ApiTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [],
    "EXCEPTION_HANDLER": "chat.wire.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI schema (/api/schema/) and its docs page (/api/docs/); the shapes live in chat/openapi.py.
SPECTACULAR_SETTINGS = {
    "TITLE": "KiteMesh API",
    "VERSION": "1.0.0",
    "DESCRIPTION": (
        "OpenAI-compatible chat completions answered by a KiteMesh group, with human approval of tool calls "
        "and credit billing. Point an OpenAI SDK at `<host>/v1` with a `km_…` token. Every error has the "
        "`Error` envelope and every response an `X-Request-ID` header."
    ),
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # 3.1: its schema objects are JSON Schema 2020-12, which the request and answer models are written in.
    "OAS_VERSION": "3.1.0",
    "PREPROCESSING_HOOKS": ["chat.openapi.api_endpoints_only"],
    "POSTPROCESSING_HOOKS": ["chat.openapi.chat_answer_postprocess"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # validatorUrl null: Swagger UI would otherwise fetch a badge from validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "displayOperationId": True, "validatorUrl": None},
}

KITEMESH_MAX_BODY_BYTES = env_int("KITEMESH_MAX_BODY_BYTES", 8 * 1024 * 1024)
# Django refuses to read a larger body too (the ASGI guard normally answers 413 before that).
DATA_UPLOAD_MAX_MEMORY_SIZE = KITEMESH_MAX_BODY_BYTES

# Fernet keys, comma-separated, newest first (older ones still decrypt during a rotation).
# The default serves development only; production.py requires a real one.
DEV_VAULT_KEY = "a2l0ZW1lc2gtZGV2LXZhdWx0LWtleS0zMi1ieXRlcyE="
KITEMESH_VAULT_KEY = os.environ.get("KITEMESH_VAULT_KEY") or DEV_VAULT_KEY

KITEMESH_METRICS_TOKEN = os.environ.get("KITEMESH_METRICS_TOKEN", "")
# Without a token, /metrics is open here (development) and off in production (production.py).
KITEMESH_METRICS_OPEN_WITHOUT_TOKEN = True
KITEMESH_TOOL_HOST_ALLOWLIST = [
    h.strip() for h in os.environ.get("KITEMESH_TOOL_HOST_ALLOWLIST", "").split(",") if h.strip()
]
# Upstream model calls: connect fast, allow long generations between bytes.
KITEMESH_UPSTREAM_CONNECT_TIMEOUT = float(os.environ.get("KITEMESH_UPSTREAM_CONNECT_TIMEOUT", "5"))
KITEMESH_UPSTREAM_READ_TIMEOUT = float(os.environ.get("KITEMESH_UPSTREAM_READ_TIMEOUT", "120"))
# Failures that certainly did not reach the model are retried (before any byte reaches the client).
KITEMESH_UPSTREAM_RETRIES = env_int("KITEMESH_UPSTREAM_RETRIES", 2)
KITEMESH_UPSTREAM_RETRY_BACKOFF = float(os.environ.get("KITEMESH_UPSTREAM_RETRY_BACKOFF", "0.25"))
KITEMESH_CIRCUIT_FAILURES = env_int("KITEMESH_CIRCUIT_FAILURES", 5)
KITEMESH_CIRCUIT_COOLDOWN = float(os.environ.get("KITEMESH_CIRCUIT_COOLDOWN", "30"))
# PostgreSQL: threads (each with its own connection) a worker runs its request path's transactions on.
KITEMESH_DB_THREADS = int(os.environ.get("KITEMESH_DB_THREADS", "4"))
# Output-token cap sent upstream (and reserved for) when the client gives no max_tokens.
KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS = env_int("KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS", 1024)
# A person chatting on /chat/: the limits on each user (the team's limits apply too), and a message's length.
KITEMESH_CHAT_REQUESTS_PER_MINUTE = env_int("KITEMESH_CHAT_REQUESTS_PER_MINUTE", 30)
KITEMESH_CHAT_CONCURRENT_STREAMS = env_int("KITEMESH_CHAT_CONCURRENT_STREAMS", 3)
KITEMESH_CHAT_MESSAGE_MAX_CHARS = env_int("KITEMESH_CHAT_MESSAGE_MAX_CHARS", 32000)
# A working run renews a lease on its execution every third of this; a run whose lease lapsed had its
# process die, and is recovered (SPEC §7; approvals.recovery).
KITEMESH_RUN_LEASE_SECONDS = float(os.environ.get("KITEMESH_RUN_LEASE_SECONDS", "30"))

REDIS_URL = os.environ.get("REDIS_URL", "")


def redis_options(url: str) -> dict:
    """redis-py connection keywords from a redis:// or rediss:// URL (django-eventstream passes them to both
    its sync publisher and its asyncio subscriber, so only keywords both accept)."""
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "db": int(parts.path.lstrip("/") or 0),
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme == "rediss",
        # Publishing happens after a decision commits: a Redis that is down must fail fast, not hang the page.
        "socket_connect_timeout": 3,
    }


# --- Live approval queue (django-eventstream, SSE on plain ASGI) ----------------------------------
# One channel per team ("team-<id>"); approvals.events decides who may read it. Events are not stored:
# the queue page re-reads the list whenever its stream (re)opens.
EVENTSTREAM_CHANNELMANAGER_CLASS = "approvals.events.ApprovalChannelManager"
if REDIS_URL:
    # Every worker process publishes to Redis and relays what it hears to its own browsers.
    EVENTSTREAM_REDIS = redis_options(REDIS_URL)

# --- Background work: a durable task queue in the database (django-tasks), run by `manage.py worker` ----
# Webhook deliveries are queued in the transaction of what they announce; the worker also queues the
# sweep (crash recovery, approval expiry, stuck deliveries) every KITEMESH_SWEEP_SECONDS.
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
KITEMESH_SWEEP_SECONDS = float(os.environ.get("KITEMESH_SWEEP_SECONDS", "10"))

# --- Webhooks: approval events and credit alerts (core.webhooks) -------------------------------------------
KITEMESH_WEBHOOK_TIMEOUT_SECONDS = float(os.environ.get("KITEMESH_WEBHOOK_TIMEOUT_SECONDS", "5"))
KITEMESH_WEBHOOK_ATTEMPTS = env_int("KITEMESH_WEBHOOK_ATTEMPTS", 4)
# Wait before retry n (1-based): backoff × 2^(n-1).
KITEMESH_WEBHOOK_BACKOFF_SECONDS = float(os.environ.get("KITEMESH_WEBHOOK_BACKOFF_SECONDS", "1"))

# --- Logging --------------------------------------------------------------------------------------
# text: plain lines for a terminal (`make run`); json: one object a line with the request id (production's
# default, see production.py).
KITEMESH_LOG_LEVEL = os.environ.get("KITEMESH_LOG_LEVEL", "INFO")
LOGGING = logging_config(log_format=os.environ.get("KITEMESH_LOG_FORMAT") or "text", level=KITEMESH_LOG_LEVEL)
