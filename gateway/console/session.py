"""The console's session and its protection against cross-site requests.

Signing in with an admin key sets one cookie, `aza_console`: the key's
SHA-256 hash and a random CSRF token, signed with the console secret
(itsdangerous, with a time stamp: a session lasts `SESSION_SECONDS`). The
key itself is never stored, in the cookie or anywhere else; each request
looks the hash up again, so a revoked or narrowed key ends its sessions.
The cookie is `HttpOnly`, `SameSite=Strict` and `Secure` when the console is
served over https.

Every form carries the session's CSRF token (synchronizer token: a page on
another site cannot read it), and every POST is refused when its `Origin`
names another origin. The sign-in form, before there is a session, carries
the token of a short-lived `aza_console_pre` cookie (double submit).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "aza_console"
PRE_COOKIE = "aza_console_pre"
LANG_COOKIE = "aza_console_lang"
SESSION_SECONDS = 12 * 3600
PRE_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Session:
    key_hash: str
    csrf: str


class SessionSigner:
    """Signs and reads the console's cookies with one secret."""

    def __init__(self, secret: str) -> None:
        # No configured secret: one for this process only (sessions end at a restart).
        self._serializer = URLSafeTimedSerializer(
            secret or secrets.token_urlsafe(32), salt="aza-console"
        )

    def session_cookie(self, key_hash: str) -> tuple[str, Session]:
        session = Session(key_hash=key_hash, csrf=secrets.token_urlsafe(24))
        value = self._serializer.dumps({"k": session.key_hash, "c": session.csrf})
        return value, session

    def read_session(self, value: str | None) -> Session | None:
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=SESSION_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        key_hash, csrf = data.get("k"), data.get("c")
        if not isinstance(key_hash, str) or not isinstance(csrf, str):
            return None
        return Session(key_hash=key_hash, csrf=csrf)

    def pre_cookie(self) -> tuple[str, str]:
        """A signed pre-session cookie and the token the sign-in form carries."""
        token = secrets.token_urlsafe(24)
        return self._serializer.dumps({"p": token}), token

    def read_pre(self, value: str | None) -> str | None:
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=PRE_SECONDS)
        except BadSignature:
            return None
        token = data.get("p") if isinstance(data, dict) else None
        return token if isinstance(token, str) else None


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token; False when either is missing."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
