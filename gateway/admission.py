"""The gate of one request, a batch or a Realtime response: admitted, or 403/429.

`gate(services, practice_id, reserve)` runs `reserve()` (which places the
hold when the budget admits it, `gateway.storage`); a license problem is a
403, and a budget too low gets one automatic top-up (`credit.autotopup`) and
one more try before the 429 in OpenAI's shape (`insufficient_quota`, the
seed's error code and `message_user`, `x-should-retry: false`). An admitted
hold's period has its alert marks written here, so no settle waits for them.
Used by the metering middleware, the batches and Realtime alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from budget.snapshot import BudgetSnapshot
from gateway.errors import GatewayError
from gateway.messages import (
    ACTIONABLE_TOPUP_CODES,
    BUDGET_EXHAUSTED,
    Language,
    developer_message,
    user_message,
)
from gateway.services import Services
from gateway.storage.budget_state import BudgetState
from gateway.storage.holds import Hold, Reservation

if TYPE_CHECKING:
    from credit.autotopup import AutoTopupOutcome

log = logging.getLogger("aza.gateway.metering")


def budget_exhausted(language: Language, error_code: str, snapshot: BudgetSnapshot) -> GatewayError:
    """The gate's 429: OpenAI's insufficient_quota, the seed's error code and message."""
    return GatewayError(
        429,
        developer_message(error_code),
        type="insufficient_quota",
        code="insufficient_quota",
        error_code=error_code,
        message_user=user_message(error_code, language),
        extra={"budget": snapshot.to_dict()},
        # The official SDKs retry a 429 unless told not to; waiting will
        # not bring money back.
        headers={"x-should-retry": "false"},
    )


async def gate(
    services: Services, practice_id: str, reserve: Callable[[], Awaitable[Reservation]]
) -> Hold:
    """The gate of a request (or a batch, or a realtime response): `reserve()` places its
    hold when the budget admits it; when blocked, one auto top-up and one more try, else
    403/429 in the OpenAI shape (`insufficient_quota`, `message_user`,
    `x-should-retry: false`). An admitted hold's period has its alert marks."""
    hold = await _gate_hold(services, practice_id, reserve)
    if not services.alerts.marked(hold.practice_id, hold.period.start, hold.budget_micros):
        # Once per practice and period here, at the gate: the settle is never delayed.
        try:
            await _ensure_alert_marks(services, hold)
        except BaseException:
            released = services.spawn(services.metering.release(hold), name="release hold")
            await asyncio.shield(released)
            raise
    return hold


async def _gate_hold(
    services: Services, practice_id: str, reserve: Callable[[], Awaitable[Reservation]]
) -> Hold:
    metrics = services.metrics
    reservation = await reserve()
    if reservation.hold is not None:
        metrics.gate_decisions.labels("admitted").inc()
        return reservation.hold
    state = reservation.state
    language = services.settings.user_language
    if state.problem is not None:
        metrics.gate_decisions.labels("license_problem").inc()
        code = str(state.problem)
        raise GatewayError(
            403,
            developer_message(code),
            type="permission_error",
            code=code.lower(),
            error_code=code,
            message_user=user_message(code, language),
        )
    outcome = await _auto_topup(services, practice_id, state)
    if outcome is not None and outcome.charged:
        reservation = await reserve()
        if reservation.hold is not None:
            metrics.gate_decisions.labels("admitted_after_topup").inc()
            return reservation.hold
        state = reservation.state
    metrics.gate_decisions.labels("blocked").inc()
    error_code = BUDGET_EXHAUSTED
    if outcome is not None and outcome.error_code in ACTIONABLE_TOPUP_CODES:
        error_code = outcome.error_code
    raise budget_exhausted(language, error_code, state.snapshot)


async def _auto_topup(
    services: Services, practice_id: str, state: BudgetState
) -> AutoTopupOutcome | None:
    try:
        return await services.credit.maybe_auto_topup(
            practice_id,
            available_percent=state.snapshot.available_percent,
            subscription_id=state.license.subscription_id if state.license else None,
            trigger="gate",
        )
    except Exception:
        log.exception("auto top-up at the gate failed for practice %s", practice_id)
        return None


async def _ensure_alert_marks(services: Services, hold: Hold) -> None:
    """The period's budget alert marks, before the settle that may cross one (once here;
    written at the gate, so that no settle waits for them)."""
    alerts = services.alerts
    if alerts.marked(hold.practice_id, hold.period.start, hold.budget_micros):
        return
    try:
        await alerts.ensure_marks(hold.practice_id, hold.period.start, hold.budget_micros)
    except Exception:
        log.exception("writing the alert marks of practice %s failed", hold.practice_id)
