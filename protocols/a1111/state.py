"""Per-caller A1111 state: the checkpoint a caller chose with ``POST /sdapi/v1/options``.

A1111 has one global checkpoint; here each API key has its own, and the anonymous callers
share one, so one caller switching models never changes what another one gets.
"""

from __future__ import annotations

from django.conf import settings

from api.images import model_hash, model_sha256
from api.models import ApiKey, ClientState
from api.selectors import model_catalog


def scope_of(owner: ApiKey | None) -> str:
    return f"a1111:key:{owner.pk}" if owner is not None else "a1111:anon"


def checkpoint_get(owner: ApiKey | None) -> str:
    """The caller's model id: the one they chose while it is still in the catalogue, else the default."""
    row = ClientState.objects.filter(scope=scope_of(owner)).first()
    chosen = (row.data or {}).get("sd_model_checkpoint") if row is not None else None
    return chosen if isinstance(chosen, str) and chosen in model_catalog() else settings.DEFAULT_MODEL


def checkpoint_set(owner: ApiKey | None, model_id: str) -> None:
    row, _ = ClientState.objects.get_or_create(scope=scope_of(owner), defaults={"data": {}})
    data = dict(row.data or {})
    data["sd_model_checkpoint"] = model_id
    ClientState.objects.filter(pk=row.pk).update(data=data)


def title_of(model_id: str) -> str:
    """A1111 titles a checkpoint ``<name> [<short hash>]``; clients echo the title back."""
    return f"{model_id} [{model_hash(model_id)}]"


def checkpoint_lookup(value: str) -> str | None:
    """A catalogue id from what A1111 clients send: a title, a model name (the id), a short
    hash or the full sha256; exact first, then ignoring case. Never a path."""
    catalog = model_catalog()
    wanted = value.strip()
    for exact in (True, False):
        for model_id in catalog:
            names = {
                model_id,
                title_of(model_id),
                model_hash(model_id),
                model_sha256(model_id),
            }
            if exact and wanted in names:
                return model_id
            if not exact and wanted.lower() in {n.lower() for n in names}:
                return model_id
    return None
