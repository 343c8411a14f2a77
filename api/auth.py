"""API keys: ``Authorization: Bearer <key>``, stored as SHA-256, revocable; per-key access."""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from .models import ApiKey

KEY_PREFIX = "sdk_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is enough: no dictionary to attack.
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_create(*, name: str, is_staff: bool = False) -> tuple[ApiKey, str]:
    """Make a key; returns the row and the key itself, which is never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey.objects.create(name=name, prefix=key[:12], key_hash=hash_key(key), is_staff=is_staff)
    return row, key


def api_key_revoke(*, api_key: ApiKey) -> None:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])


class KeyUser:
    """What ``request.user`` is for a request made with a key."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, api_key: ApiKey) -> None:
        self.api_key = api_key
        self.is_staff = api_key.is_staff
        self.pk = api_key.pk

    def __str__(self) -> str:
        return f"key:{self.api_key.prefix}"


def _presented_key(request: Request, schemes: tuple[bytes, ...]) -> str | None:
    """The key in ``Authorization: Bearer <key>``, or (where ``schemes`` allows it) the
    password of ``Basic`` (user ignored): A1111 clients can only send Basic credentials."""
    parts = get_authorization_header(request).split()
    if not parts or parts[0].lower() not in schemes:
        return None
    scheme = parts[0].decode("ascii").capitalize()
    if len(parts) != 2:
        raise exceptions.AuthenticationFailed(f"the Authorization header must be '{scheme} <credentials>'")
    try:
        token = parts[1].decode("ascii")
        if scheme == "Basic":
            _user, sep, token = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
            if not sep:
                raise ValueError("no password")
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise exceptions.AuthenticationFailed("the API key is not valid") from None
    return token


class ApiKeyAuthentication(BaseAuthentication):
    # The native API reads Bearer only: a proxy's own Basic login in front of it passes by.
    schemes: tuple[bytes, ...] = (b"bearer",)

    def authenticate(self, request: Request) -> tuple[KeyUser, ApiKey] | None:
        key = _presented_key(request, self.schemes)
        if key is None:
            return None
        api_key = ApiKey.objects.filter(key_hash=hash_key(key)).first()
        if api_key is None:
            raise exceptions.AuthenticationFailed("the API key is not valid")
        if api_key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("the API key has been revoked")
        now = timezone.now()
        if api_key.last_used_at is None or now - api_key.last_used_at > timedelta(minutes=1):
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        return KeyUser(api_key), api_key

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) when a key is missing or wrong.
        return 'Bearer realm="api"'


class ClientCompatibleAuthentication(ApiKeyAuthentication):
    """For the foreign protocols: with AUTH_REQUIRED off, a key this server doesn't know is
    the anonymous caller rather than a 401. The OpenAI SDK always sends a bearer, and Open
    WebUI sends whatever Basic credentials its user typed; neither can send none."""

    schemes = (b"bearer", b"basic")

    def authenticate(self, request: Request) -> tuple[KeyUser, ApiKey] | None:
        try:
            return super().authenticate(request)
        except exceptions.AuthenticationFailed:
            if settings.AUTH_REQUIRED:
                raise
            return None


def request_key(request: Request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


class KeyRequiredIfConfigured(BasePermission):
    """With AUTH_REQUIRED=true every endpoint but health needs a valid key."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not settings.AUTH_REQUIRED:
            return True
        if request_key(request) is None:
            raise exceptions.NotAuthenticated("an API key is required: send 'Authorization: Bearer <key>'")
        return True


class _KeyRateThrottle(SimpleRateThrottle):
    """Per key (or per client address without one); rates are settings, e.g. '30/min'."""

    setting_name = ""

    def get_rate(self) -> str | None:
        return settings.RATE_LIMITS.get(self.scope) or None

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        key = request_key(request)
        ident = f"key{key.pk}" if key is not None else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class GenerateRateThrottle(_KeyRateThrottle):
    scope = "generate"


class ReadRateThrottle(_KeyRateThrottle):
    scope = "read"
