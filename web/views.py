"""Serves the playground: the page itself, and its script and stylesheet from ``assets/``.

Served by these views rather than by Django's static files, which don't serve under gunicorn
without a collectstatic step and another dependency. The assets are cached for a year under a
content-hash version (``?v=``) that the page names, so a changed file is fetched at once.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.template import Context, Engine
from django.views.decorators.http import require_safe

ASSETS = Path(__file__).resolve().parent / "assets"
CONTENT_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
ONE_YEAR = 365 * 24 * 3600


@lru_cache(maxsize=8)
def _read(name: str, mtime_ns: int) -> bytes:
    return (ASSETS / name).read_bytes()


def asset_bytes(name: str) -> bytes:
    """The file's bytes, read again only when it changes on disk."""
    return _read(name, (ASSETS / name).stat().st_mtime_ns)


def asset_version() -> str:
    digest = hashlib.sha256()
    for name in sorted(CONTENT_TYPES):
        digest.update(asset_bytes(name))
    return digest.hexdigest()[:16]


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    return None


def image_sources() -> list[str]:
    """Where the page may load images from: itself, previews (data:), the mask editor's uploads
    (blob:), and the media host when images are served from elsewhere (an S3 bucket or a CDN)."""
    sources = ["'self'", "data:", "blob:"]
    if origin := _origin(settings.MEDIA_URL):
        sources.append(origin)
    if settings.MEDIA_STORAGE == "s3":
        domain = getattr(settings, "AWS_S3_CUSTOM_DOMAIN", None)
        endpoint = getattr(settings, "AWS_S3_ENDPOINT_URL", None)
        if domain:
            protocol = getattr(settings, "AWS_S3_URL_PROTOCOL", "https:")
            sources.append(f"{protocol}//{domain}")
        elif endpoint and (origin := _origin(endpoint)):
            # Path-style (endpoint/bucket/key) or virtual-hosted (bucket.endpoint/key) URLs.
            parts = urlsplit(endpoint)
            sources += [origin, f"{parts.scheme}://*.{parts.netloc}"]
        else:
            sources.append("https://*.amazonaws.com")
    return sources


def content_security_policy() -> str:
    directives = {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": image_sources(),
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


@lru_cache(maxsize=1)
def _engine() -> Engine:
    # An engine of its own: the page needs no app registry entry, only its folder.
    return Engine(dirs=[str(ASSETS)], autoescape=True)


@require_safe
def index(request: HttpRequest) -> HttpResponse:
    from backend.schedulers import SCHEDULER_NAMES

    html = (
        _engine()
        .get_template("index.html")
        .render(
            Context(
                {
                    "version": asset_version(),
                    "auth_required": "true" if settings.AUTH_REQUIRED else "false",
                    "schedulers": " ".join(SCHEDULER_NAMES),
                }
            )
        )
    )
    response = HttpResponse(html, content_type="text/html; charset=utf-8")
    response["Content-Security-Policy"] = content_security_policy()
    response["Cache-Control"] = "no-cache"
    return response


@require_safe
def asset(request: HttpRequest, name: str) -> HttpResponse:
    content_type = CONTENT_TYPES.get(name)
    if content_type is None:
        raise Http404(f"no playground file {name!r}")
    version = asset_version()
    etag = f'"{version}"'
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=304)
    else:
        response = HttpResponse(asset_bytes(name), content_type=content_type)
    response["ETag"] = etag
    if request.GET.get("v") == version:
        response["Cache-Control"] = f"public, max-age={ONE_YEAR}, immutable"
    else:
        response["Cache-Control"] = "no-cache"
    return response
