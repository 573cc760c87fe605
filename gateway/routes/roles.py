"""Who may change a practice's settings: its admin (a practice key, or the service token).

Issue 17 brings key roles (`admin` | `client`); until its check is on main,
every key of a practice acts as its admin, as keys made before roles will.
"""

from __future__ import annotations

from starlette.requests import Request

from gateway.routes.common import practice_of


async def admin_practice_of(request: Request) -> str:
    """The practice the caller administers (its key's, or X-Practice-Id for the service)."""
    _, practice_id = await practice_of(request)
    return practice_id
