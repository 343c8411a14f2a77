"""Production settings: `check --deploy` passes, and there is no start without a real SECRET_KEY.

Each case runs manage.py in a fresh process, as an operator would, with no .env.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the test process itself sets (config/settings_test.py) or a developer may have exported.
_STRIPPED = {
    "DJANGO_SETTINGS_MODULE",
    "DJANGO_ENV",
    "DEBUG",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "AUTH_REQUIRED",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_PRELOAD",
}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _STRIPPED}
    base.update(ENV_FILE="none", DJANGO_SETTINGS_MODULE="config.settings", DJANGO_ENV="production")
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def real_key() -> str:
    return secrets.token_urlsafe(50)


def test_check_deploy_passes_with_production_settings() -> None:
    result = manage(
        "check", "--deploy", "--fail-level", "WARNING", SECRET_KEY=real_key(), ALLOWED_HOSTS="api.example.com"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_fails_on_a_weakened_setting() -> None:
    # The checks are really running: turning HTTPS redirects off is reported.
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        SECRET_KEY=real_key(),
        ALLOWED_HOSTS="api.example.com",
        SECURE_SSL_REDIRECT="false",
    )
    assert result.returncode != 0
    assert "security.W008" in result.stderr


def test_check_deploy_fails_with_auth_off_on_a_public_host() -> None:
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        SECRET_KEY=real_key(),
        ALLOWED_HOSTS="api.example.com",
        AUTH_REQUIRED="false",
    )
    assert result.returncode != 0
    assert "api.W001" in result.stderr


def test_production_refuses_to_start_without_a_secret_key() -> None:
    result = manage("check", ALLOWED_HOSTS="api.example.com")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY must be set in production" in result.stderr


@pytest.mark.parametrize(
    "key",
    [
        "django-insecure-development-only-key-change-me",  # the development default
        "x" * 31,  # just below the minimum length
    ],
)
def test_production_refuses_a_weak_secret_key(key: str) -> None:
    result = manage("check", SECRET_KEY=key, ALLOWED_HOSTS="api.example.com")
    assert result.returncode != 0
    assert "SECRET_KEY must be a random string of at least 32 characters" in result.stderr


def test_a_key_of_the_minimum_length_is_accepted() -> None:
    result = manage("check", SECRET_KEY=secrets.token_hex(16), ALLOWED_HOSTS="api.example.com")
    assert result.returncode == 0, result.stderr


def test_every_silenced_check_has_its_reason_beside_it() -> None:
    from django.conf import settings

    source = (ROOT / "config" / "settings.py").read_text()
    block = source[source.index("SILENCED_SYSTEM_CHECKS = [") :]
    block = block[: block.index("]") + 1]
    for check_id in settings.SILENCED_SYSTEM_CHECKS:
        # A comment naming the check and saying why, right above its entry.
        assert re.search(
            rf"#[^\n]*{re.escape(check_id)}[^\n]*\S[^\n]*\n(\s*#.*\n)*\s*\"{re.escape(check_id)}\"", block
        ), check_id
