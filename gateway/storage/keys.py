"""Gateway keys: made, resolved to their practice, listed and revoked.

Only a key's hash is stored (and a short prefix, to tell keys apart in a
list); the key itself is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from credit.ports import Database
from gateway.keys import KeyIdentity, KeyRole
from gateway.storage.limits import limits_of

KEY_PREFIX = "aza_"

# A key, its limits and whether its practice limits devices: one query (issue 18).
_IDENTIFY_SQL = (
    "SELECT k.practice_id, k.role, k.key_prefix, l.monthly_cap_micro_usd, "
    "l.requests_per_minute, l.tokens_per_minute, "
    "(SELECT 1 FROM ai_spend_limits AS d WHERE d.practice_id = k.practice_id "
    "AND d.scope = 'device' LIMIT 1) AS device_limits "
    "FROM gateway_keys AS k LEFT JOIN ai_spend_limits AS l ON l.practice_id = k.practice_id "
    "AND l.scope = 'key' AND l.subject = k.key_prefix "
    "WHERE k.key_hash = ? AND k.revoked_at IS NULL"
)


def hash_key(raw_key: str) -> str:
    """SHA-256 hex of a gateway key.

    Keys are 256-bit random tokens, so a fast hash suffices (a slow password
    hash guards guessable secrets; these are not guessable) and keeps auth
    cheap on every request.
    """
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh gateway key: `aza_` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The `gateway_keys` table."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    async def create_key(
        self, practice_id: str, *, label: str | None = None, role: KeyRole = KeyRole.CLIENT
    ) -> str:
        """Make a key for a practice; only its hash is stored. Returns the key (show it once)."""
        raw = new_key()
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO gateway_keys "
                "(key_hash, key_prefix, practice_id, label, created_at, role) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                hash_key(raw),
                raw[: len(KEY_PREFIX) + 6],
                practice_id,
                label,
                int(self._clock()),
                role.value,
            )
        return raw

    async def set_key_role(self, key_prefix_or_hash: str, role: KeyRole) -> int:
        """Give the active key(s) with this prefix (or hash) `role`; the number changed."""
        async with self.db.transaction() as conn:
            return await conn.execute(
                "UPDATE gateway_keys SET role = ? "
                "WHERE (key_hash = ? OR key_prefix = ?) AND revoked_at IS NULL",
                role.value,
                key_prefix_or_hash,
                key_prefix_or_hash,
            )

    async def revoke_key(self, key_prefix_or_hash: str) -> int:
        """Revoke the (not yet revoked) keys with this prefix or hash; returns how many."""
        async with self.db.transaction() as conn:
            return await conn.execute(
                "UPDATE gateway_keys SET revoked_at = ? "
                "WHERE (key_hash = ? OR key_prefix = ?) AND revoked_at IS NULL",
                int(self._clock()),
                key_prefix_or_hash,
                key_prefix_or_hash,
            )

    async def identify_key(self, raw_key: str) -> KeyIdentity | None:
        """The practice and role of a (not revoked) gateway key; None for any other string."""
        return await self.identify_key_hash(hash_key(raw_key))

    async def identify_key_hash(self, key_hash: str) -> KeyIdentity | None:
        """Like `identify_key`, by the key's hash (the console's session holds only that)."""
        async with self.db.read() as conn:
            row = await conn.fetchone(_IDENTIFY_SQL, key_hash)
        if row is None:
            return None
        return KeyIdentity(
            practice_id=str(row["practice_id"]),
            role=KeyRole(row["role"]),
            key_prefix=row["key_prefix"],
            limits=limits_of(row),
            device_limits=row["device_limits"] is not None,
        )

    async def practices_of_prefix(self, key_prefix: str) -> list[str]:
        """The practices of the active keys shown with `key_prefix` (normally one)."""
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                "SELECT DISTINCT practice_id FROM gateway_keys "
                "WHERE key_prefix = ? AND revoked_at IS NULL",
                key_prefix,
            )
        return [str(row["practice_id"]) for row in rows]

    async def practice_for_key(self, raw_key: str) -> str | None:
        """The practice a (not revoked) gateway key belongs to."""
        identity = await self.identify_key(raw_key)
        return None if identity is None else identity.practice_id

    async def list_keys(self, practice_id: str) -> list[dict[str, Any]]:
        """A practice's keys (prefix, label, role, made, revoked), oldest first; never the key."""
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                "SELECT key_prefix, label, role, created_at, revoked_at FROM gateway_keys "
                "WHERE practice_id = ? ORDER BY created_at",
                practice_id,
            )
        return [
            {
                "key_prefix": row["key_prefix"],
                "label": row["label"],
                "role": row["role"],
                "created_at": row["created_at"],
                "revoked_at": row["revoked_at"],
            }
            for row in rows
        ]
