-- Issue 14: the money SQL written once. The alert trigger of the period
-- totals reads the extra credit left from aza_money (the gate's and the
-- settle's read) instead of its own sums (migration 012 wrote them again).
-- Only the function's body changes; trigger ai_alert_usage calls it by name.

\ir ../../functions/aza_alert_usage.sql
