"""The two kinds of gateway key, and what each may do.

A *client* key is what a desktop or server app carries: it may call the
proxied OpenAI routes and read its practice's budget. An *admin* key is for
the people who pay: it may also open checkouts, change the auto top-up
settings, read history and usage, and sign in to the console. Keys made
before the roles existed are *legacy*: they keep doing everything they did
(admin-capable) until an operator narrows them (docs/operations.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from budget.limits import Limits


class KeyRole(enum.StrEnum):
    ADMIN = "admin"
    CLIENT = "client"
    LEGACY = "legacy"

    @property
    def admin_capable(self) -> bool:
        """Whether a key of this role may use the admin routes and the console."""
        return self is not KeyRole.CLIENT


# The roles a new key may be given (legacy only comes from migration 011).
NEW_KEY_ROLES = (KeyRole.ADMIN, KeyRole.CLIENT)


def parse_new_role(raw: object) -> KeyRole | None:
    """The role named by `raw` for a new key, or None when it names none of them."""
    for role in NEW_KEY_ROLES:
        if raw == role.value:
            return role
    return None


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What a valid gateway key stands for: its practice and its role.

    With it, read in the same query and cached with it: the key's prefix,
    its limits (None: none) and whether its practice has any device limits,
    so that a key without limits costs the gate nothing (issue 18).
    """

    practice_id: str
    role: KeyRole
    key_prefix: str | None = None
    limits: Limits | None = None
    device_limits: bool = False
