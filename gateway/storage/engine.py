"""What the metering store asks of a storage engine, beyond `credit.ports.Database`.

The store is written once for both engines; where they differ (numbered
locks, the gate and settle as database functions, vacuuming) it asks the
engine through this interface instead of asking for its name.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from credit.ports import Connection, Database


def lock_number(name: str) -> int:
    """A stable signed 64-bit number for lock `name` (the same in every gateway process)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class MeteringEngine(Database, Protocol):
    """A `Database` with the engine-specific parts of metering."""

    has_gate_functions: bool
    """True when the schema has the gate and the settle as functions, one
    statement each (`aza_reserve`, `aza_settle` and their `_many` batches:
    PostgreSQL, migration 004); the one-call gate needs them."""

    def lock_number(self, name: str) -> int:
        """The number lock `name` has in the database (what the gate functions take)."""
        ...

    async def lock_also(self, conn: Connection, name: str) -> None:
        """Inside a transaction, take lock `name` too; it is held until the transaction ends."""
        ...

    async def vacuum(self, table: str) -> bool:
        """Reclaim the dead rows of `table` where the engine leaves them; False where not."""
        ...
