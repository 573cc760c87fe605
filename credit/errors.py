"""Failures the credit services raise; gateway/ turns them into HTTP responses.

A `CreditError` says what kind of refusal it is (`Refusal`), never an HTTP
status: `gateway.errors.CREDIT_REFUSAL_STATUS` maps each kind once.
"""

from __future__ import annotations

from enum import Enum


class Refusal(Enum):
    """The kind of a refused credit operation."""

    INVALID = "invalid"  # a value the caller sent is not acceptable
    BAD_REQUEST = "bad_request"  # a webhook that is not a signed Stripe event
    FORBIDDEN = "forbidden"  # not in this mode (a live top-up while blocked)
    CONFLICT = "conflict"  # the practice's state does not allow it now
    NOT_CONFIGURED = "not_configured"  # Stripe or its webhooks are not set up
    UNAVAILABLE = "unavailable"  # Stripe did not answer; try again later
    REFUSED_UPSTREAM = "refused_upstream"  # Stripe answered with a refusal


class CreditError(Exception):
    """A refused credit operation.

    `kind` says what kind of refusal it is, `error_code` the stable code
    clients act on, `message` English for developers, `message_user` German
    for the person in front of the app, `param` the offending field if any.
    """

    def __init__(
        self,
        kind: Refusal,
        error_code: str,
        message: str,
        *,
        message_user: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.error_code = error_code
        self.message = message
        self.message_user = message_user or message
        self.param = param

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.name}, {self.error_code!r}, {self.message!r})"


class WebhookSignatureError(CreditError):
    """A Stripe webhook whose signature is missing, malformed, stale or wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(
            Refusal.BAD_REQUEST,
            "STRIPE_SIGNATURE_INVALID",
            message,
            message_user="Ungültige Stripe-Signatur.",
        )


def invalid(
    param: str, message: str, message_user: str, code: str = "INVALID_VALUE"
) -> CreditError:
    """A refusal of a bad input value (422)."""
    return CreditError(Refusal.INVALID, code, message, message_user=message_user, param=param)
