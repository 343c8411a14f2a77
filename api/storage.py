"""Where images live: the local media folder, or an S3-compatible bucket (``MEDIA_STORAGE``).

``local`` writes under MEDIA_ROOT through a temporary file and a rename (a reader never sees half
a file); ``s3`` goes through django-storages' S3 backend, configured with its own setting names
(``AWS_STORAGE_BUCKET_NAME``, ``AWS_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …), which covers AWS
and any S3-compatible store (MinIO, R2, Ceph, …). Its URLs are presigned or public as
``AWS_QUERYSTRING_AUTH`` chooses. Names are always server-made (``generations/<id>/<n>-<seed>.png``,
``inputs/<id>.png``): a request never names a path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from django.conf import settings


def is_local() -> bool:
    return settings.MEDIA_STORAGE == "local"


def media_root() -> Path:
    return Path(settings.MEDIA_ROOT)


def _s3() -> Any:
    from django.core.files.storage import storages

    return storages["default"]


def save(name: str, data: bytes) -> None:
    """Store ``data`` under ``name``, replacing what was there."""
    if is_local():
        from .images import write_atomic

        write_atomic(media_root(), name, data)
        return
    from django.core.files.base import ContentFile

    storage = _s3()
    saved = storage.save(name, ContentFile(data))
    if saved != name:  # AWS_S3_FILE_OVERWRITE=False renamed it: names are ours to keep
        storage.delete(saved)
        raise OSError(f"the storage renamed {name!r} to {saved!r}; set AWS_S3_FILE_OVERWRITE=true")


def read(name: str) -> bytes:
    if is_local():
        return (media_root() / name).read_bytes()
    with _s3().open(name, "rb") as fh:
        return fh.read()


def exists(name: str) -> bool:
    if is_local():
        return (media_root() / name).is_file()
    return bool(_s3().exists(name))


def size(name: str) -> int:
    if is_local():
        return (media_root() / name).stat().st_size
    return int(_s3().size(name))


def delete(name: str) -> None:
    if not name:
        return
    if is_local():
        (media_root() / name).unlink(missing_ok=True)
        return
    _s3().delete(name)


def delete_prefix(prefix: str) -> None:
    """Remove every file under the folder ``prefix`` (a generation's images)."""
    prefix = prefix.rstrip("/") + "/"
    if is_local():
        shutil.rmtree(media_root() / prefix, ignore_errors=True)
        return
    storage = _s3()
    # The bucket's own listing (django-storages' listdir doesn't recurse); AWS_LOCATION prefixes keys.
    key_prefix = storage._normalize_name(prefix)  # noqa: SLF001 - how the backend maps names to keys
    storage.bucket.objects.filter(Prefix=key_prefix).delete()


def url(name: str, request: Any = None, base_url: str = "") -> str:
    """Where a client fetches the file: absolute for the request (or ``base_url``) when local; the
    bucket's URL (presigned or public) with S3."""
    if not is_local():
        return _s3().url(name)
    path = settings.MEDIA_URL + name
    if request is not None:
        return request.build_absolute_uri(path)
    if base_url:
        from urllib.parse import urljoin

        return urljoin(base_url, path)
    return path
