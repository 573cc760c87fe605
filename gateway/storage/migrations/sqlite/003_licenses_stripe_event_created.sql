-- Stripe does not deliver webhooks in order and retries old deliveries, so a
-- customer.subscription.updated can arrive after a newer one (or after the
-- deleted event). The subscription webhook handler records the `created`
-- time of the Stripe event it applied to a license and applies an event only
-- when it is not older than that. NULL (rows written by the admin route, the
-- CLI or the demo, and every row from before this migration) never blocks an
-- event.

ALTER TABLE licenses ADD COLUMN stripe_event_created INTEGER;
