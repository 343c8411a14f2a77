"""Start-up checks: with keys off, anyone who can reach the server has every result."""

from __future__ import annotations

import ipaddress
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Warning

# Names that only ever mean this machine ("testserver" is Django's test client).
_LOCAL_NAMES = {"localhost", "testserver"}


def is_loopback_host(host: str) -> bool:
    """True for an ALLOWED_HOSTS entry that can only be this machine: localhost, 127.x, ::1."""
    host = host.strip().lower().rstrip(".")
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, a ".example.com" pattern or "*": may be reached from elsewhere


def check_auth_beyond_localhost(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if settings.AUTH_REQUIRED:
        return []
    exposed = [host for host in settings.ALLOWED_HOSTS if not is_loopback_host(host)]
    if not exposed:
        return []
    return [
        Warning(
            f"AUTH_REQUIRED is off while ALLOWED_HOSTS accepts {', '.join(map(repr, exposed))}: anyone who can "
            "reach this server can generate images and read or delete every result.",
            hint="Set AUTH_REQUIRED=true and hand out keys made with `manage.py create_api_key NAME`, "
            "or keep ALLOWED_HOSTS to localhost, 127.0.0.1 and [::1].",
            id="api.W001",
        )
    ]
