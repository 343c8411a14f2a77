"""Settings for the test suite: no .env, a throwaway media folder, small limits."""

import os
import tempfile

os.environ.setdefault("ENV_FILE", "none")
os.environ.setdefault("DJANGO_ENV", "test")
os.environ.setdefault("MEDIA_ROOT", tempfile.mkdtemp(prefix="sdapi-test-media-"))
os.environ.setdefault("SQLITE_TEST_PATH", os.path.join(tempfile.mkdtemp(prefix="sdapi-test-db-"), "test.sqlite3"))
os.environ.setdefault("DEFAULT_MODEL", "tiny-sd")
os.environ.setdefault("PROGRESS_MIN_INTERVAL", "0")
os.environ.setdefault("MAX_LOADED_MODELS", "4")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Rate limits are off for the suite; tests of them turn them on.
os.environ.setdefault("RATE_LIMIT_GENERATE", "")
os.environ.setdefault("RATE_LIMIT_READ", "")

from .settings import *  # noqa: E402,F403
