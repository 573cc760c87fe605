"""Failures the credit services raise; gateway/ turns them into HTTP responses."""

from __future__ import annotations


class CreditError(Exception):
    """A refused credit operation.

    `status` is the HTTP status to answer with, `error_code` the stable code
    clients act on, `message` English for developers, `message_user` German
    for the person in front of the app, `param` the offending field if any.
    """

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        message_user: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.message_user = message_user or message
        self.param = param

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.error_code!r}, {self.message!r})"


class WebhookSignatureError(CreditError):
    """A Stripe webhook whose signature is missing, malformed, stale or wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(
            400,
            "STRIPE_SIGNATURE_INVALID",
            message,
            message_user="Ungültige Stripe-Signatur.",
        )


def invalid(
    param: str, message: str, message_user: str, code: str = "INVALID_VALUE"
) -> CreditError:
    """A 422 for a bad input value."""
    return CreditError(422, code, message, message_user=message_user, param=param)
