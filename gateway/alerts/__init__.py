"""Alerts to a practice: by email and by signed webhook, once each, before anyone is blocked.

The database decides that an alert is due (triggers of migration 012 write a
row into `ai_alert_outbox` in the transaction of the charge or ledger entry
that crossed a threshold); `delivery.AlertDispatcher` delivers the rows with
retries and backoff. `events` builds what is sent, `messages` the texts in
the practice's language, `signing` the webhook signature, `targets` the
check of webhook URLs, `store` the settings and the outbox.
"""
