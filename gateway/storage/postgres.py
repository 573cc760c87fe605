"""PostgreSQL engine (asyncpg, pooled): several gateway instances on one ledger.

Per-practice exclusion uses `pg_advisory_xact_lock`, a lock the database
holds until the transaction ends, so two gateway processes serialise their
budget checks for the same practice while other practices run in parallel.
SQL arrives with `?` placeholders (the portable form the stores write) and is
rewritten to `$1, $2, …` once per distinct statement.

Group commit (`transaction(lock=key, shared=True)`, used by the metering
store's reserve, settle and release): a proxied request's transactions are a
handful of short statements, and most of the gateway's CPU went into the
round trips around them — BEGIN with the lock, COMMIT, a pool checkout each.
Requests of one practice wait for each other on the advisory lock anyway. So
shared transactions on the same key that arrive while one is running join
it: one pooled connection, one BEGIN with the advisory lock, the members'
blocks one after another (an asyncio.Lock per group, in the order they
came), and one COMMIT ends them all. A group takes at most `GROUP_LIMIT`
members and none joins one begun longer ago than `GROUP_SECONDS` (the
engine's `group_seconds`); whoever
comes later begins the next group, whose BEGIN waits in PostgreSQL for this
one's COMMIT on the advisory lock, as a transaction of its own would. When
a member's block ends and nobody waits for a turn, the group commits at once:
a lone transaction costs exactly what an unshared one does.

This is safe because the members run one at a time on the same connection,
in arrival order, inside the same advisory lock: each sees the earlier
members' writes exactly as if it had waited for their COMMIT on the lock
(READ COMMITTED reads other sessions' committed rows statement by
statement, the same inside the group as outside), and other connections see
none of them before the COMMIT. Groups never mix keys, so each PostgreSQL
transaction still holds exactly one advisory lock and no new deadlock
between gateway instances is possible. No caller's `async with` returns
before the COMMIT that holds its work; a member cancelled while it waits
for that COMMIT gets CancelledError, but its work stays in the group and may
still be committed (the group goes on: it is shielded).

There are no savepoints (each would cost a round trip, eating the gain). So
when a member's block raises, the whole transaction is rolled back: that
member gets its own exception, the members that already finished get
DatabaseUnavailable (the metering store retries a settle or release on it;
a reserve becomes a 503), and the members still waiting for their turn begin
a new group. When the COMMIT fails, every member gets DatabaseUnavailable.
Hence a shared block must let database errors propagate (a swallowed one
leaves PostgreSQL's transaction aborted for the members after it; the
COMMIT then reports a rollback, which every member gets as
DatabaseUnavailable), and, as the members of a group wait for each other,
a block must never wait for something another caller does only after its
own transaction returned. Everything else (the credit code, which may rely
on a UniqueViolation inside its own transaction) runs unshared, one
PostgreSQL transaction per block, as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg

from credit.ports import Connection, DatabaseUnavailable, Row, UniqueViolation
from gateway.storage.engine import lock_number

log = logging.getLogger("aza.storage.postgres")

_PLACEHOLDER = re.compile(r"\?")

# Group commit: at most this many shared transactions on one key share a
# PostgreSQL transaction, and none joins a group begun longer ago than this.
GROUP_LIMIT = 16
GROUP_SECONDS = 0.020

# Errors that mean "the database is not there right now", as opposed to a bug
# in a statement: they become DatabaseUnavailable (HTTP 503, retry later).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)


def _set_failed(done: asyncio.Future[None], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)
        # Its members raise it; none left (all cancelled) is no error to log.
        done.exception()


# The advisory lock key of a lock name (the same in every gateway process).
advisory_key = lock_number


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release: our sessions keep no state, so skip asyncpg's reset query.

    The gateway never SETs, LISTENs or takes session-level locks (its advisory
    locks end with their transaction), so the default `RESET ALL; UNLISTEN
    *; …` round trip on every release is pure cost. A connection released
    inside a transaction (a bug, a cancelled request, or a group of shared
    transactions one of which raised) is rolled back.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@functools.lru_cache(maxsize=512)
def to_numbered(sql: str) -> str:
    """`?` placeholders to PostgreSQL's `$n` (our SQL never has `?` in literals)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


class _PgConnection:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            status: str = await self._conn.execute(to_numbered(sql), *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc
        # "INSERT 0 1", "UPDATE 3", "DELETE 0": the count is the last word.
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        try:
            row: Row | None = await self._conn.fetchrow(to_numbered(sql), *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc
        return row

    async def fetchall(self, sql: str, *args: Any) -> Sequence[Row]:
        rows: Sequence[Row] = await self._conn.fetch(to_numbered(sql), *args)
        return rows

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(to_numbered(sql), *args)


class _Group:
    """Shared transactions on one lock key: one connection, one BEGIN, one COMMIT."""

    __slots__ = ("conn", "done", "key", "members", "open", "pool", "queued", "started", "turn")

    def __init__(self, key: str, started: float) -> None:
        self.key = key
        self.started = started  # loop time when the group began
        # Held by the member whose block runs (by the first one from its BEGIN on).
        self.turn = asyncio.Lock()
        self.members = 1  # joined so far, cancelled ones included
        self.queued = 0  # members waiting for their turn
        # False once the group's end is decided: nobody joins or runs any more.
        self.open = True
        self.pool: asyncpg.Pool | None = None
        self.conn: asyncpg.Connection | None = None  # in the transaction, after BEGIN
        # Made when a second member joins (a lone transaction needs none);
        # done when the COMMIT succeeded or the group failed.
        self.done: asyncio.Future[None] | None = None


class PostgresDatabase:
    """A pool of asyncpg connections; transactions lock per practice in the database."""

    dialect = "postgresql"
    has_gate_functions = True  # migration 004's aza_reserve and aza_settle

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        schema: str | None = None,
        group_seconds: float = GROUP_SECONDS,
    ) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.schema = schema
        self.group_seconds = group_seconds  # nobody joins a group begun longer ago
        self._pool: asyncpg.Pool | None = None
        self._groups: dict[str, _Group] = {}  # the group new shared transactions on a key join
        self._ending: set[asyncio.Task[None]] = set()  # COMMITs of groups under way

    async def connect(self) -> None:
        settings = {"search_path": self.schema} if self.schema else None
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=30,
                server_settings=settings,
                reset=_keep_session,
            )
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"cannot reach PostgreSQL: {exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        # Nobody joins the open groups any more; their members (already
        # joined) finish on the groups' connections, and asyncpg's close
        # waits for those to come back.
        self._groups.clear()
        if pool is not None:
            await pool.close()
        if self._ending:
            # Connections are back before a group's members are told.
            await asyncio.wait(list(self._ending))

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise DatabaseUnavailable("database is not connected")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"PostgreSQL is unreachable: {exc}") from exc

    def transaction(
        self, *, lock: str | None = None, shared: bool = False
    ) -> AbstractAsyncContextManager[_PgConnection]:
        """A write transaction locked on `lock`; with `shared`, one that may share its COMMIT.

        Shared transactions on the same key join a group (see the module
        docstring); without a key there is nothing to group on, and the
        transaction runs on its own.
        """
        if shared and lock is not None:
            return self._shared_transaction(lock)
        return self._transaction(lock)

    @asynccontextmanager
    async def _transaction(self, lock: str | None) -> AsyncIterator[_PgConnection]:
        async with self._acquire() as conn:
            # BEGIN and the lock travel in one round trip (simple protocol,
            # two statements); the key is a number, so nothing is interpolated
            # but digits.
            begin = "BEGIN"
            if lock is not None:
                begin += f"; SELECT pg_advisory_xact_lock({advisory_key(lock)})"
            await conn.execute(begin)
            try:
                yield _PgConnection(conn)
            except BaseException:
                if not conn.is_closed():
                    await conn.execute("ROLLBACK")
                raise
            if await conn.execute("COMMIT") != "COMMIT":
                # A statement failed and the block swallowed its error: the
                # transaction was aborted and PostgreSQL ended it with a
                # ROLLBACK. Nothing was written; the caller must not think so.
                raise DatabaseUnavailable("PostgreSQL rolled the transaction back")

    # -- group commit -----------------------------------------------------------

    @asynccontextmanager
    async def _shared_transaction(self, key: str) -> AsyncIterator[_PgConnection]:
        group = await self._take_turn(key)
        assert group.conn is not None
        try:
            yield _PgConnection(group.conn)
        except BaseException as exc:
            await self._fail(group)
            if isinstance(exc, _UNAVAILABLE):
                raise DatabaseUnavailable(f"PostgreSQL is unreachable: {exc}") from exc
            raise
        if group.queued:
            # The next member runs in this transaction; the COMMIT after the
            # last one holds this block's work too.
            done = group.done
            assert done is not None
            group.turn.release()
            # Shared by the group: one caller's cancellation must not cancel it.
            await asyncio.shield(done)
            return
        self._close(group)
        if group.done is None:
            # Nobody joined: COMMIT here, as an unshared transaction does.
            error = await self._commit(group)
            if error is not None:
                raise error
            return
        self._end_in_background(group)
        await asyncio.shield(group.done)

    async def _take_turn(self, key: str) -> _Group:
        """Join the key's open group and wait for this member's turn, or begin a group."""
        loop = asyncio.get_running_loop()
        while True:
            group = self._groups.get(key)
            if (
                group is not None
                and group.members < GROUP_LIMIT
                and loop.time() - group.started < self.group_seconds
            ):
                group.members += 1
                if group.done is None:
                    group.done = loop.create_future()
                group.queued += 1
                try:
                    await group.turn.acquire()
                except BaseException:
                    group.queued -= 1
                    self._after_leaving(group)
                    raise
                group.queued -= 1
                if group.open:
                    return group
                # Rolled back before this member's turn: pass the turn on
                # (the others leave too) and begin or join a new group.
                group.turn.release()
                continue
            group = _Group(key, loop.time())
            await group.turn.acquire()  # free: nobody else knows the group yet
            self._groups[key] = group
            try:
                group.pool, group.conn = await self._begin(key)
            except BaseException:
                await self._fail(group)
                raise
            return group

    async def _begin(self, key: str) -> tuple[asyncpg.Pool, asyncpg.Connection]:
        """A pooled connection in a transaction holding `key`'s advisory lock."""
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("database is not connected")
        try:
            conn = await pool.acquire()
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"PostgreSQL is unreachable: {exc}") from exc
        try:
            # One round trip, as in `_transaction`.
            await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({advisory_key(key)})")
        except BaseException as exc:
            await self._give_back(pool, conn)
            if isinstance(exc, _UNAVAILABLE):
                raise DatabaseUnavailable(f"PostgreSQL is unreachable: {exc}") from exc
            raise
        return pool, conn

    def _after_leaving(self, group: _Group) -> None:
        """A member left before its turn (cancelled): COMMIT now if nobody is left to run.

        The turn the last finished member passed on may have gone to waiters
        that have all been cancelled since; the group is idle then.
        """
        if group.open and not group.queued and not group.turn.locked():
            self._close(group)
            self._end_in_background(group)

    def _close(self, group: _Group) -> None:
        """Nobody joins the group any more (its COMMIT or ROLLBACK is next)."""
        group.open = False
        if self._groups.get(group.key) is group:
            del self._groups[group.key]

    def _end_in_background(self, group: _Group) -> None:
        task = asyncio.get_running_loop().create_task(
            self._end(group), name=f"COMMIT of a group on {group.key}"
        )
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end(self, group: _Group) -> None:
        """COMMIT a group whose members are all done, and tell them how it went."""
        done = group.done
        assert done is not None
        error: BaseException | None = DatabaseUnavailable("the group's COMMIT was interrupted")
        try:
            error = await self._commit(group)
        finally:
            if error is None:
                done.set_result(None)
            else:
                _set_failed(done, error)

    async def _commit(self, group: _Group) -> BaseException | None:
        """COMMIT the group's transaction and give its connection back; the error if it failed."""
        pool, conn = group.pool, group.conn
        assert pool is not None and conn is not None
        error: BaseException | None = None
        try:
            status = await conn.execute("COMMIT")
            if status != "COMMIT":
                # A statement failed and its error was swallowed: PostgreSQL
                # ends the aborted transaction with a ROLLBACK.
                error = DatabaseUnavailable("PostgreSQL rolled the transaction back")
        except Exception as exc:
            error = DatabaseUnavailable(f"COMMIT failed: {exc}")
            error.__cause__ = exc
        finally:
            await self._give_back(pool, conn)
        return error

    async def _fail(self, group: _Group) -> None:
        """Roll the group back: the running member (or the BEGIN) raised.

        The finished members get DatabaseUnavailable, the queued ones wake,
        find the group closed and begin a new one.
        """
        self._close(group)
        if group.done is not None:
            _set_failed(
                group.done,
                DatabaseUnavailable("rolled back: another transaction of its group failed"),
            )
        group.turn.release()
        if group.conn is not None:
            assert group.pool is not None
            # The pool's reset (`_keep_session`) rolls the transaction back,
            # after waiting for a statement being cancelled, if any.
            await self._give_back(group.pool, group.conn)

    @staticmethod
    async def _give_back(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
        try:
            await pool.release(conn)
        except Exception:
            # asyncpg has closed the connection; its work is committed or lost
            # with it, as the caller was told.
            log.warning("returning a PostgreSQL connection to the pool failed", exc_info=True)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_PgConnection]:
        async with self._acquire() as conn:
            yield _PgConnection(conn)

    # -- what the metering store asks of an engine (gateway.storage.engine) --------

    def lock_number(self, name: str) -> int:
        return advisory_key(name)

    async def lock_also(self, conn: Connection, name: str) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(?)", advisory_key(name))

    async def vacuum(self, table: str) -> bool:
        async with self.read() as conn:  # VACUUM cannot run inside a transaction
            await conn.execute(f"VACUUM {table}")
        return True

    async def executescript(self, script: str) -> None:
        async with self._acquire() as conn:
            await conn.execute(script)

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.fetchval("SELECT 1")
