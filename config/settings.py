"""Django settings, 12-factor: every value comes from the environment, or from ``.env``.

A bad value fails at start-up with ``ImproperlyConfigured`` naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

from backend.config import ConfigError, EngineConfig, env_bool, env_choice, env_float, env_int, env_list

BASE_DIR = Path(__file__).resolve().parent.parent

# A real environment variable wins over .env; ENV_FILE picks another file (tests use none).
_env_file = os.environ.get("ENV_FILE", str(BASE_DIR / ".env"))
if _env_file and _env_file.lower() != "none":
    load_dotenv(_env_file, override=False)

env = os.environ


def _wrap(fn, *args, **kwargs):  # noqa: ANN001, ANN202
    try:
        return fn(*args, **kwargs)
    except ConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from None


DEBUG = _wrap(env_bool, env, "DEBUG", False)
ENVIRONMENT = _wrap(env_choice, env, "DJANGO_ENV", "development", ("development", "production", "test"))

_INSECURE_KEY = "django-insecure-development-only-key-change-me"
SECRET_KEY = env.get("SECRET_KEY", "")
if not SECRET_KEY:
    if ENVIRONMENT == "production":
        raise ImproperlyConfigured("SECRET_KEY must be set in production (DJANGO_ENV=production)")
    SECRET_KEY = _INSECURE_KEY
elif ENVIRONMENT == "production" and (SECRET_KEY == _INSECURE_KEY or len(SECRET_KEY) < 32):
    raise ImproperlyConfigured("SECRET_KEY must be a random string of at least 32 characters in production")

ALLOWED_HOSTS = list(_wrap(env_list, env, "ALLOWED_HOSTS")) or ["localhost", "127.0.0.1", "[::1]", "testserver"]
CSRF_TRUSTED_ORIGINS = list(_wrap(env_list, env, "CSRF_TRUSTED_ORIGINS"))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "api",
]

MIDDLEWARE = [
    # Outermost, so it counts and times every answer, those of the other middleware included.
    "api.metrics.middleware.RequestMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "api.middleware.RequestSizeLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- Database: SQLite by default, DATABASE_URL for PostgreSQL ------------------------------
DATABASE_URL = env.get("DATABASE_URL", "").strip()
# Each server thread keeps its connection this many seconds (0: a new one for every request),
# checked before it is reused after a request.
DB_CONN_MAX_AGE = _wrap(env_int, env, "DB_CONN_MAX_AGE", 60, minimum=0, maximum=3600)
if DATABASE_URL:
    import dj_database_url

    try:
        DATABASES = {
            "default": dj_database_url.parse(DATABASE_URL, conn_max_age=DB_CONN_MAX_AGE, conn_health_checks=True)
        }
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(BASE_DIR / env.get("SQLITE_PATH", "db.sqlite3")),
            "OPTIONS": {
                # The worker thread writes while request threads read: WAL lets them
                # overlap, IMMEDIATE transactions avoid upgrade deadlocks, and the
                # timeout waits out a busy writer instead of failing.
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": env.get("SQLITE_TEST_PATH") or None},
            "CONN_MAX_AGE": DB_CONN_MAX_AGE,
            "CONN_HEALTH_CHECKS": True,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / env.get("STATIC_ROOT", "staticfiles")
MEDIA_URL = env.get("MEDIA_URL", "/media/")
# Relative paths are relative to the project, not to wherever a process was started.
MEDIA_ROOT = BASE_DIR / env.get("MEDIA_ROOT", "media")
SERVE_MEDIA = _wrap(env_bool, env, "SERVE_MEDIA", True)
# Where generated and uploaded images are kept: the local MEDIA_ROOT, or an S3-compatible bucket
# through django-storages, configured with its own names (AWS_STORAGE_BUCKET_NAME,
# AWS_S3_ENDPOINT_URL for MinIO/R2/..., AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_S3_REGION_NAME, AWS_LOCATION as a key prefix, AWS_S3_CUSTOM_DOMAIN). Image URLs are
# presigned (AWS_QUERYSTRING_AUTH=true, valid AWS_QUERYSTRING_EXPIRE seconds) or public.
MEDIA_STORAGE = _wrap(env_choice, env, "MEDIA_STORAGE", "local", ("local", "s3"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
if MEDIA_STORAGE == "s3":
    AWS_STORAGE_BUCKET_NAME = env.get("AWS_STORAGE_BUCKET_NAME", "").strip()
    if not AWS_STORAGE_BUCKET_NAME:
        raise ImproperlyConfigured("MEDIA_STORAGE=s3 needs AWS_STORAGE_BUCKET_NAME")
    AWS_S3_ENDPOINT_URL = env.get("AWS_S3_ENDPOINT_URL", "").strip() or None
    AWS_ACCESS_KEY_ID = env.get("AWS_ACCESS_KEY_ID", "").strip() or None
    AWS_SECRET_ACCESS_KEY = env.get("AWS_SECRET_ACCESS_KEY", "").strip() or None
    AWS_S3_REGION_NAME = env.get("AWS_S3_REGION_NAME", "").strip() or None
    AWS_LOCATION = env.get("AWS_LOCATION", "").strip()
    AWS_S3_CUSTOM_DOMAIN = env.get("AWS_S3_CUSTOM_DOMAIN", "").strip() or None
    AWS_QUERYSTRING_AUTH = _wrap(env_bool, env, "AWS_QUERYSTRING_AUTH", True)
    AWS_QUERYSTRING_EXPIRE = _wrap(env_int, env, "AWS_QUERYSTRING_EXPIRE", 3600, minimum=1)
    AWS_S3_ADDRESSING_STYLE = env.get("AWS_S3_ADDRESSING_STYLE", "").strip() or None
    # Names are the server's own and unique: overwrite (a retried job rewrites its own images).
    AWS_S3_FILE_OVERWRITE = True
    AWS_DEFAULT_ACL = None
    STORAGES["default"] = {"BACKEND": "storages.backends.s3.S3Storage"}

# --- REST framework -------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": [
        "api.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_AUTHENTICATION_CLASSES": ["api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["api.auth.KeyRequiredIfConfigured"],
    "DEFAULT_THROTTLE_CLASSES": ["api.auth.ReadRateThrottle"],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "api.exceptions.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "api.pagination.ResultsPagination",
    # How many proxies sit in front: the client address for rate limits is read that many hops
    # back in X-Forwarded-For. 0 (the default) ignores the header, which a client can forge.
    "NUM_PROXIES": _wrap(env_int, env, "NUM_PROXIES", 0, minimum=0, maximum=10),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Stable Diffusion API",
    "DESCRIPTION": "txt2img, img2img and inpainting over REST, on local diffusers pipelines or the Hugging Face Inference API.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # /api/schema/ and /api/docs/ need a key like every endpoint but health (AUTH_REQUIRED).
    "SERVE_PERMISSIONS": ["api.auth.KeyRequiredIfConfigured"],
    # The native API under /api/ and the three foreign protocols (/v1/, /sdapi/v1/, /models/),
    # each under its own tag; docs/compat.md has them field by field.
    "PREPROCESSING_HOOKS": ["api.schema.described_endpoints"],
    # Native operation ids and tags as before (results_list, tag "results"), though the schema
    # spans several top-level paths now.
    "SCHEMA_PATH_PREFIX": r"/(?:api/)?",
    # One name for the webhook events, which the request, the resource and its deliveries share.
    "ENUM_NAME_OVERRIDES": {"WebhookEventEnum": ["completed", "failed", "cancelled"]},
}
# Errors raised before any view runs (an oversized body, an unknown path) under /v1/,
# /sdapi/ and /models/ answer in that protocol's shape.
ERROR_SHAPE_FOR_PATH = "protocols.common.problem_response_for_path"

# --- Access -----------------------------------------------------------------------------------
# true: every endpoint but /api/health/ needs "Authorization: Bearer <key>" (manage.py create_api_key).
AUTH_REQUIRED = _wrap(env_bool, env, "AUTH_REQUIRED", ENVIRONMENT == "production")
# Per key (or per client address without a key); DRF rate syntax: N/second|minute|hour|day. Empty: no limit.
RATE_LIMITS = {
    "generate": env.get("RATE_LIMIT_GENERATE", "60/minute").strip(),
    "read": env.get("RATE_LIMIT_READ", "600/minute").strip(),
}
# Queued + running jobs one key may have at once; counted in the database, so it holds across processes.
MAX_ACTIVE_JOBS_PER_KEY = _wrap(env_int, env, "MAX_ACTIVE_JOBS_PER_KEY", 8, minimum=1)
# Queued jobs of all keys together (0: no limit); past it a create answers 503 queue_full with
# Retry-After. 256 is already minutes of work at a second a job, about SYNC_TIMEOUT: a longer
# queue would only make synchronous requests time out instead of telling clients to come back.
MAX_QUEUED_JOBS = _wrap(env_int, env, "MAX_QUEUED_JOBS", 256, minimum=0)

# Rate-limit counters live in the cache: set CACHE_URL (redis://...) when several processes serve.
CACHE_URL = env.get("CACHE_URL", "").strip()
if CACHE_URL.startswith(("redis://", "rediss://")):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}}
elif CACHE_URL:
    raise ImproperlyConfigured(f"CACHE_URL must be a redis:// URL, got a {CACHE_URL.split(':', 1)[0]!r} URL")
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Generation ---------------------------------------------------------------------------
DEFAULT_MODEL = env.get("DEFAULT_MODEL", "tiny-sd")
QUEUE = _wrap(env_choice, env, "QUEUE", "thread", ("thread", "celery"))
SYNC_TIMEOUT = _wrap(env_float, env, "SYNC_TIMEOUT", 300.0, minimum=0.0)
# Synchronous requests one process holds open while their jobs run (each holds a server thread).
# Past it the native API answers 202 (the job runs; poll its Location) and the foreign protocols,
# which can't, answer 503 with Retry-After before creating anything. The default leaves a quarter
# of gunicorn.conf.py's GUNICORN_THREADS for reads and async requests.
_GUNICORN_THREADS = _wrap(env_int, env, "GUNICORN_THREADS", 16, minimum=1)
MAX_SYNC_WAITERS = _wrap(
    env_int, env, "MAX_SYNC_WAITERS", max(1, _GUNICORN_THREADS - max(1, _GUNICORN_THREADS // 4)), minimum=1
)
MAX_ATTEMPTS = _wrap(env_int, env, "MAX_ATTEMPTS", 2, minimum=1, maximum=10)
PRELOAD_MODELS = list(_wrap(env_list, env, "PRELOAD_MODELS"))
PROGRESS_MIN_INTERVAL = _wrap(env_float, env, "PROGRESS_MIN_INTERVAL", 0.25, minimum=0.0)
# Micro-batching: queued jobs that share model, kind, size, steps, scheduler, guidance, strength
# and LoRAs run as one pipeline call of up to BATCH_MAX_IMAGES images (1: off). The worker waits
# up to BATCH_WINDOW_MS for companions (0: it takes only what is already queued).
BATCH_MAX_IMAGES = _wrap(env_int, env, "BATCH_MAX_IMAGES", 8, minimum=1, maximum=64)
BATCH_WINDOW_MS = _wrap(env_float, env, "BATCH_WINDOW_MS", 0.0, minimum=0.0)
# Saving (PNG encoding, files, the final rows) runs on these threads, off the device's path;
# at most FINISH_MAX_PENDING finished jobs wait to be saved before the device waits for them.
FINISH_THREADS = _wrap(env_int, env, "FINISH_THREADS", 2, minimum=1, maximum=32)
FINISH_MAX_PENDING = _wrap(env_int, env, "FINISH_MAX_PENDING", 8, minimum=1, maximum=256)
# Server-sent events (GET /api/results/<id>/events/): at most SSE_MAX_STREAMS open per process
# (each holds one server thread; gunicorn.conf.py adds that many threads), a ": ping" comment
# every SSE_PING_INTERVAL seconds, rows re-read at least every SSE_POLL_INTERVAL seconds (a
# change wakes them at once), and a stream ends after SSE_MAX_DURATION (the client resumes).
SSE_MAX_STREAMS = _wrap(env_int, env, "SSE_MAX_STREAMS", 256, minimum=1, maximum=10_000)
SSE_PING_INTERVAL = _wrap(env_float, env, "SSE_PING_INTERVAL", 15.0, minimum=0.05)
SSE_POLL_INTERVAL = _wrap(env_float, env, "SSE_POLL_INTERVAL", 0.5, minimum=0.01)
SSE_MAX_DURATION = _wrap(env_float, env, "SSE_MAX_DURATION", 3600.0, minimum=1.0)
SSE_RETRY_MS = _wrap(env_int, env, "SSE_RETRY_MS", 2000, minimum=0)
# Webhooks (a request's webhook_url): targets on private, loopback or link-local addresses are
# refused unless WEBHOOK_ALLOW_PRIVATE; WEBHOOK_SECRET ("whsec_" + base64) signs the deliveries of
# requests made without an API key (with a key, the key's own secret signs). Each delivery is
# tried up to WEBHOOK_MAX_ATTEMPTS times, waiting WEBHOOK_RETRY_DELAYS seconds between tries.
WEBHOOK_ALLOW_PRIVATE = _wrap(env_bool, env, "WEBHOOK_ALLOW_PRIVATE", False)
WEBHOOK_SECRET = env.get("WEBHOOK_SECRET", "").strip()
WEBHOOK_TIMEOUT = _wrap(env_float, env, "WEBHOOK_TIMEOUT", 10.0, minimum=0.1)
WEBHOOK_MAX_ATTEMPTS = _wrap(env_int, env, "WEBHOOK_MAX_ATTEMPTS", 8, minimum=1, maximum=100)
WEBHOOK_RETRY_DELAYS = [
    float(x) for x in (env.get("WEBHOOK_RETRY_DELAYS", "").strip() or "5,30,120,600,1800,3600,7200").split(",")
]
WEBHOOK_POLL_INTERVAL = _wrap(env_float, env, "WEBHOOK_POLL_INTERVAL", 2.0, minimum=0.01)
if WEBHOOK_SECRET and not WEBHOOK_SECRET.startswith("whsec_"):
    raise ImproperlyConfigured(
        'WEBHOOK_SECRET must look like "whsec_" + base64 (manage.py rotate_webhook_secret prints one)'
    )

GENERATION_LIMITS = {
    "MIN_SIZE": _wrap(env_int, env, "MIN_IMAGE_SIZE", 64, minimum=8),
    "MAX_SIZE": _wrap(env_int, env, "MAX_IMAGE_SIZE", 2048, minimum=64),
    "MAX_STEPS": _wrap(env_int, env, "MAX_STEPS", 150, minimum=1),
    "MAX_NUM_IMAGES": _wrap(env_int, env, "MAX_NUM_IMAGES", 8, minimum=1),
    "MIN_GUIDANCE": _wrap(env_float, env, "MIN_GUIDANCE_SCALE", 0.0),
    "MAX_GUIDANCE": _wrap(env_float, env, "MAX_GUIDANCE_SCALE", 30.0),
    "MAX_PROMPT_CHARS": _wrap(env_int, env, "MAX_PROMPT_CHARS", 2000, minimum=1),
    "MAX_LORAS": _wrap(env_int, env, "MAX_LORAS", 5, minimum=0, maximum=32),
    "MIN_LORA_WEIGHT": _wrap(env_float, env, "MIN_LORA_WEIGHT", -2.0),
    "MAX_LORA_WEIGHT": _wrap(env_float, env, "MAX_LORA_WEIGHT", 2.0),
    "MAX_UPLOAD_BYTES": _wrap(env_int, env, "MAX_UPLOAD_BYTES", 10 * 1024 * 1024, minimum=1024),
    "MAX_UPLOAD_PIXELS": _wrap(env_int, env, "MAX_UPLOAD_PIXELS", 4096 * 4096, minimum=64 * 64),
    # pixels x images x steps: one request can't hold the GPU for hours.
    "MAX_TOTAL_WORK": _wrap(env_int, env, "MAX_TOTAL_WORK", 1024 * 1024 * 4 * 50, minimum=1),
}
# A request body a little over the upload cap (base64 inflates by 4/3) is refused unparsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = _wrap(
    env_int, env, "MAX_REQUEST_BYTES", GENERATION_LIMITS["MAX_UPLOAD_BYTES"] * 4 // 3 + 64 * 1024
)
FILE_UPLOAD_MAX_MEMORY_SIZE = DATA_UPLOAD_MAX_MEMORY_SIZE
RESULTS_PAGE_SIZE = 20
RESULTS_MAX_PAGE_SIZE = 100

try:
    ENGINE = EngineConfig.from_env(env, base_dir=BASE_DIR)
except ConfigError as exc:
    raise ImproperlyConfigured(str(exc)) from None

# A broken catalogue file or an unknown default model stops the server now, not at the first request.
from backend.catalog import CatalogError, load_catalog  # noqa: E402

try:
    _CATALOG = load_catalog(ENGINE.model_catalog_file or None, ENGINE.checkpoint_dir)
except CatalogError as exc:
    raise ImproperlyConfigured(str(exc)) from None


# --- Foreign protocols ------------------------------------------------------------------------
# OpenAI model names that clients hard-code, mapped onto catalogue ids. "name=id" entries,
# comma-separated; an entry without "=id" means DEFAULT_MODEL.
def _model_aliases(raw: str) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for part in raw.split(","):
        name, sep, target = (piece.strip() for piece in part.partition("="))
        if not name:
            continue
        target = target if sep and target else DEFAULT_MODEL
        if target not in _CATALOG:
            raise ImproperlyConfigured(
                f"OPENAI_MODEL_ALIASES maps {name!r} to {target!r}, which is not in the catalogue; "
                f"valid ids: {', '.join(sorted(_CATALOG))}"
            )
        aliases[name] = target
    return aliases


OPENAI_MODEL_ALIASES = _model_aliases(
    env.get("OPENAI_MODEL_ALIASES", "dall-e-2,dall-e-3,gpt-image-1,gpt-image-1-mini,gpt-image-1.5")
)
# Previews of running jobs (A1111 progress, OpenAI partial images) are engine settings:
# PREVIEWS and PREVIEW_INTERVAL (see ENGINE).

_unknown_models = [m for m in (DEFAULT_MODEL, *PRELOAD_MODELS) if m not in _CATALOG]
if _unknown_models:
    raise ImproperlyConfigured(
        f"DEFAULT_MODEL / PRELOAD_MODELS name models that are not in the catalogue: {', '.join(_unknown_models)}; "
        f"valid ids: {', '.join(sorted(_CATALOG))}"
    )

# --- Celery (QUEUE=celery) and worker liveness ---------------------------------------------
# The job row is the truth; the broker only carries "run generation <id>" messages.
CELERY_BROKER_URL = env.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0").strip()
if not CELERY_BROKER_URL.startswith(("redis://", "rediss://", "amqp://", "amqps://", "memory://")):
    raise ImproperlyConfigured(
        f"CELERY_BROKER_URL must be a redis:// (or amqp://) URL, got a {CELERY_BROKER_URL.split(':', 1)[0]!r} URL"
    )
# Queue for models that no CELERY_MODEL_QUEUES entry names; workers subscribe with -Q.
CELERY_DEFAULT_QUEUE = env.get("CELERY_DEFAULT_QUEUE", "generations").strip() or "generations"
# model_id=queue,...: jobs for a model go to the queue whose workers hold it.
CELERY_MODEL_QUEUES: dict[str, str] = {}
for _entry in _wrap(env_list, env, "CELERY_MODEL_QUEUES"):
    _model, _sep, _queue = (part.strip() for part in _entry.partition("="))
    if not _sep or not _model or not _queue:
        raise ImproperlyConfigured(f"CELERY_MODEL_QUEUES entries must look like model_id=queue, got {_entry!r}")
    CELERY_MODEL_QUEUES[_model] = _queue
# Hard limit (the worker process is killed) and soft limit (the job fails) for one job, in seconds.
CELERY_TASK_TIME_LIMIT = _wrap(env_int, env, "CELERY_TASK_TIME_LIMIT", 3600, minimum=10)
CELERY_TASK_SOFT_TIME_LIMIT = _wrap(
    env_int,
    env,
    "CELERY_TASK_SOFT_TIME_LIMIT",
    CELERY_TASK_TIME_LIMIT - 60 if CELERY_TASK_TIME_LIMIT > 120 else CELERY_TASK_TIME_LIMIT // 2,
    minimum=5,
)
if CELERY_TASK_SOFT_TIME_LIMIT >= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured(
        f"CELERY_TASK_SOFT_TIME_LIMIT must be below CELERY_TASK_TIME_LIMIT ({CELERY_TASK_TIME_LIMIT}), got {CELERY_TASK_SOFT_TIME_LIMIT}"
    )
# Redis redelivers an unacknowledged message after this many seconds. It must outlast the
# longest job, or a job still running would be handed to a second worker.
CELERY_VISIBILITY_TIMEOUT = _wrap(env_int, env, "CELERY_VISIBILITY_TIMEOUT", CELERY_TASK_TIME_LIMIT * 2, minimum=60)
if CELERY_VISIBILITY_TIMEOUT <= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured(
        f"CELERY_VISIBILITY_TIMEOUT must be longer than CELERY_TASK_TIME_LIMIT ({CELERY_TASK_TIME_LIMIT}), got {CELERY_VISIBILITY_TIMEOUT}"
    )
# Seconds between database checks while a synchronous request waits on a Celery job; the
# finish itself arrives at once over Redis pub/sub, this is only the fallback.
SYNC_POLL_INTERVAL = _wrap(env_float, env, "SYNC_POLL_INTERVAL", 2.0, minimum=0.05)
# A running job's worker stamps heartbeat_at this often; a job whose stamp is older than
# JOB_STALE_AFTER is taken as orphaned (its worker died) and is retried or failed worker_lost.
JOB_HEARTBEAT_INTERVAL = _wrap(env_float, env, "JOB_HEARTBEAT_INTERVAL", 10.0, minimum=0.05)
JOB_STALE_AFTER = _wrap(env_float, env, "JOB_STALE_AFTER", 120.0, minimum=0.2)
if JOB_STALE_AFTER < 3 * JOB_HEARTBEAT_INTERVAL:
    raise ImproperlyConfigured(
        f"JOB_STALE_AFTER must be at least 3 x JOB_HEARTBEAT_INTERVAL ({3 * JOB_HEARTBEAT_INTERVAL:g}), got {JOB_STALE_AFTER:g}"
    )
# How often each Celery worker looks for orphaned jobs (it also does at start-up).
JOB_RECOVERY_INTERVAL = _wrap(env_float, env, "JOB_RECOVERY_INTERVAL", 60.0, minimum=0.1)

# --- Retention and storage quotas -----------------------------------------------------------
# Finished generations (succeeded, failed, cancelled) older than RESULTS_TTL_DAYS are deleted with
# their files (0: kept for ever). The embedded worker and every Celery worker prune every
# PRUNE_INTERVAL seconds, checked on their recovery pass (so at most every JOB_RECOVERY_INTERVAL);
# `manage.py prune_results` does the same on demand.
RESULTS_TTL_DAYS = _wrap(env_float, env, "RESULTS_TTL_DAYS", 0.0, minimum=0.0)
PRUNE_INTERVAL = _wrap(env_float, env, "PRUNE_INTERVAL", 3600.0, minimum=0.05)
# Bytes of images and inputs an API key may keep stored (0: unlimited); a key's own
# storage_quota_bytes (manage.py create_api_key --quota-bytes N) overrides it.
STORAGE_QUOTA_BYTES = _wrap(env_int, env, "STORAGE_QUOTA_BYTES", 0, minimum=0)

# --- Security (production) -----------------------------------------------------------------
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
if ENVIRONMENT == "production":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = _wrap(env_bool, env, "SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = _wrap(env_int, env, "SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = _wrap(env_bool, env, "SECURE_HSTS_PRELOAD", False)
    # Liveness probes call the container over plain HTTP, without a proxy in between.
    SECURE_REDIRECT_EXEMPT = [r"^api/health/$"]
# Warnings of `manage.py check --deploy` left silenced, each with its reason. Nothing else is:
# with DJANGO_ENV=production the deploy checks pass at fail level WARNING.
SILENCED_SYSTEM_CHECKS = [
    # security.W021, SECURE_HSTS_PRELOAD off: preloading is a commitment browsers take months
    # to undo, so it is opt-in (SECURE_HSTS_PRELOAD=true), not a default.
    "security.W021",
]

# --- Metrics (Prometheus, GET /metrics) ------------------------------------------------------
# A bearer token that opens /metrics by itself, for a Prometheus scraper. Set, /metrics needs it
# (or an API key); empty, /metrics is open or closed like the API (AUTH_REQUIRED).
# PROMETHEUS_MULTIPROC_DIR (read by prometheus_client itself) is the folder the processes share.
METRICS_TOKEN = env.get("METRICS_TOKEN", "").strip()
if METRICS_TOKEN and len(METRICS_TOKEN) < 16:
    raise ImproperlyConfigured(f"METRICS_TOKEN must be at least 16 characters, got {len(METRICS_TOKEN)}")
# A Celery worker serves its own /metrics on this port (0: off), for a worker on a machine of
# its own; workers beside the web server write into its PROMETHEUS_MULTIPROC_DIR instead.
WORKER_METRICS_PORT = _wrap(env_int, env, "WORKER_METRICS_PORT", 0, minimum=0, maximum=65535)
WORKER_METRICS_ADDR = env.get("WORKER_METRICS_ADDR", "0.0.0.0").strip() or "0.0.0.0"
try:
    import ipaddress

    ipaddress.ip_address(WORKER_METRICS_ADDR)
except ValueError:
    raise ImproperlyConfigured(f"WORKER_METRICS_ADDR must be an IP address, got {WORKER_METRICS_ADDR!r}") from None
if ENVIRONMENT == "production":
    # Prometheus scrapes the container over plain HTTP, like the liveness probe.
    SECURE_REDIRECT_EXEMPT = [*SECURE_REDIRECT_EXEMPT, r"^metrics$"]

# --- Logging: console, verbose -------------------------------------------------------------
LOG_LEVEL = env.get("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "verbose": {
            "format": "{asctime} {levelname} {name} [{process}:{threadName}] {message}",
            "style": "{",
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "verbose"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "api": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "backend": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}
