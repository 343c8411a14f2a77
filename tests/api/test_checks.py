"""The start-up check: keys off while the server accepts hosts beyond this machine."""

from __future__ import annotations

import pytest
from django.core.checks import Tags, run_checks

from api.checks import check_auth_beyond_localhost, is_loopback_host

LOCAL = ["localhost", "127.0.0.1", "[::1]", "testserver"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("app.localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("[::1]", True),
        ("::1", True),
        ("testserver", True),
        ("*", False),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("api.example.com", False),
        (".example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_no_warning_for_localhost_only_with_auth_off(settings) -> None:
    settings.AUTH_REQUIRED = False
    settings.ALLOWED_HOSTS = LOCAL
    assert check_auth_beyond_localhost() == []


@pytest.mark.parametrize("exposed", ["*", "api.example.com", "0.0.0.0"])
def test_warns_when_auth_is_off_and_a_host_is_beyond_localhost(settings, exposed: str) -> None:
    settings.AUTH_REQUIRED = False
    settings.ALLOWED_HOSTS = [*LOCAL, exposed]
    [warning] = check_auth_beyond_localhost()
    assert warning.id == "api.W001"
    assert repr(exposed) in warning.msg and "AUTH_REQUIRED" in warning.msg
    assert "create_api_key" in warning.hint


def test_no_warning_with_auth_required(settings) -> None:
    settings.AUTH_REQUIRED = True
    settings.ALLOWED_HOSTS = ["*"]
    assert check_auth_beyond_localhost() == []


def test_the_check_runs_with_djangos_checks(settings) -> None:
    settings.AUTH_REQUIRED = False
    settings.ALLOWED_HOSTS = ["*"]
    assert "api.W001" in [m.id for m in run_checks(tags=[Tags.security])]
    settings.ALLOWED_HOSTS = LOCAL
    assert "api.W001" not in [m.id for m in run_checks(tags=[Tags.security])]
