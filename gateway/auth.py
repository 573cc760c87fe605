"""Who is calling: a practice, identified by its gateway key or by the service token.

The practice always comes from a credential: a gateway key names its
practice; only the service token (`AZA_API_TOKEN`) may name one in
`X-Practice-Id`. A practice header sent with a gateway key is ignored, so no
header can reach another practice's data.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from gateway.errors import GatewayError, forbidden, unauthorized
from gateway.keys import KeyIdentity, KeyRole
from gateway.settings import Secret


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller acting for one practice (or, as service, for any).

    `role` is the gateway key's (None for the service token, which may do
    everything a key may).
    """

    practice_id: str | None
    device_id: str | None
    is_service: bool = False
    role: KeyRole | None = None
    # The key it came with (None for the service token), for its limits.
    key: KeyIdentity | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this caller may use the admin-key routes and the console."""
        return self.is_service or (self.role is not None and self.role.admin_capable)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer …` header (what the OpenAI SDK sends)."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    """Resolves credentials to a `Caller`, with a short in-memory cache of key lookups."""

    def __init__(
        self,
        *,
        lookup: Callable[[str], Awaitable[KeyIdentity | None]],
        service_token: Secret,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 10_000,
    ) -> None:
        self._lookup = lookup
        self._service_token = service_token
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._max_cached = max_cached
        self._cache: dict[str, tuple[float, KeyIdentity | None]] = {}

    def _is_service_token(self, token: str) -> bool:
        expected = self._service_token.reveal()
        return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())

    async def identify(self, token: str) -> KeyIdentity | None:
        """The practice and role of a gateway key (cached), None for an unknown one."""
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            return cached[1]
        identity = await self._lookup(token)
        if len(self._cache) >= self._max_cached:
            self._cache.clear()
        self._cache[token] = (now + self._cache_seconds, identity)
        return identity

    def forget(self) -> None:
        """Drop cached lookups (after a key is revoked in this process)."""
        self._cache.clear()

    async def authenticate(
        self, headers: Mapping[str, str], *, allow_service: bool = True
    ) -> Caller:
        """The caller behind these headers, or GatewayError 401."""
        token = bearer_token(headers) or headers.get("x-api-key")
        if not token:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <gateway key>'.")
        device_id = headers.get("x-device-id") or None
        if self._is_service_token(token):
            if not allow_service:
                raise unauthorized("The service token cannot be used here.")
            practice = headers.get("x-practice-id") or None
            return Caller(practice_id=practice, device_id=device_id, is_service=True)
        identity = await self.identify(token)
        if identity is None:
            raise unauthorized("Invalid API key.")
        return Caller(
            practice_id=identity.practice_id,
            device_id=device_id,
            role=identity.role,
            key=identity,
        )


def admin_key_required() -> GatewayError:
    """The 403 a client key gets where an admin key is needed."""
    return forbidden(
        "This route needs an admin key of the practice; client keys may call the "
        "OpenAI routes and read the budget only.",
        code="admin_key_required",
    )


def require_admin(caller: Caller) -> None:
    """Pass an admin-capable caller (admin or legacy key, service token); 403 otherwise."""
    if not caller.is_admin:
        raise admin_key_required()


def require_practice(caller: Caller) -> str:
    """The practice a caller acts for; a service caller must name one in X-Practice-Id."""
    if caller.practice_id is None:
        raise GatewayError(
            400,
            "The service token must name the practice in the X-Practice-Id header.",
            code="practice_required",
            param="X-Practice-Id",
        )
    return caller.practice_id
