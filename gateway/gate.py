"""The budget gate: place a request's hold, topping up once when blocked.

Shared by the HTTP metering middleware and Realtime sessions (gateway/realtime.py),
so a blocked request and a blocked Realtime response get the same answer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.errors import GatewayError
from gateway.messages import (
    ACTIONABLE_TOPUP_CODES,
    BUDGET_EXHAUSTED,
    developer_message,
    user_message,
)
from gateway.services import Services
from gateway.storage.budget_state import BudgetState
from gateway.storage.holds import Hold

if TYPE_CHECKING:
    from credit.autotopup import AutoTopupOutcome

log = logging.getLogger("aza.gateway.metering")


async def gate(services: Services, practice_id: str, request_id: str, estimate_micros: int) -> Hold:
    """Place the request's hold, topping up once when blocked; else raise 403/429.

    `estimate_micros`: the hold's amount in integer micro-USD.
    """
    metering, metrics = services.metering, services.metrics
    reservation = await metering.reserve(
        practice_id, request_id=request_id, estimate_micros=estimate_micros
    )
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
        reservation = await metering.reserve(
            practice_id, request_id=request_id, estimate_micros=estimate_micros
        )
        if reservation.hold is not None:
            metrics.gate_decisions.labels("admitted_after_topup").inc()
            return reservation.hold
        state = reservation.state
    metrics.gate_decisions.labels("blocked").inc()
    error_code = BUDGET_EXHAUSTED
    if outcome is not None and outcome.error_code in ACTIONABLE_TOPUP_CODES:
        error_code = outcome.error_code
    raise GatewayError(
        429,
        developer_message(error_code),
        type="insufficient_quota",
        code="insufficient_quota",
        error_code=error_code,
        message_user=user_message(error_code, language),
        extra={"budget": state.snapshot.to_dict()},
        # The official SDKs retry a 429 unless told not to; waiting will
        # not bring money back.
        headers={"x-should-retry": "false"},
    )


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
