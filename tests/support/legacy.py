"""Rows as a process of an older release writes them, beside this one's (a rolling upgrade)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

from sqlalchemy import insert

from selfie_lora.adapters.db import tables
from selfie_lora.wiring import Services


def legacy_user(services: Services, name: str, *, created_at: datetime) -> tuple[str, str]:
    """A user as a process of the release before 0013 writes it during a rolling upgrade (no
    name_folded: it may share a name, in another case, with a user of this release, until the
    next start refuses), with an API key. Its id and the key's secret."""
    user_id, secret = str(uuid.uuid4()), f"sl_legacy{uuid.uuid4().hex}"
    with services.engine.begin() as c:
        c.execute(insert(tables.UserRow).values(
            id=user_id, name=name, name_folded=None, api_key_hash=f"unused:{user_id}",
            created_at=created_at))
        c.execute(insert(tables.ApiKeyRow).values(
            id=str(uuid.uuid4()), user_id=user_id, name="default",
            key_hash=hashlib.sha256(secret.encode()).hexdigest(), prefix=secret[:10],
            created_at=created_at))
    return user_id, secret
