"""Stripe id normalisation and masking (pure)."""

from __future__ import annotations

from credit.stripe_ids import mask_stripe_reference, normalize_stripe_id


def test_normalize_stripe_id_from_dict_and_json() -> None:
    """A bare id, a dict, a JSON string and an object with .id all give the bare id."""

    class _FakePm:
        id = "pm_from_obj"

    assert normalize_stripe_id("pm_abc123", "pm_") == "pm_abc123"
    assert normalize_stripe_id({"id": "pm_from_dict"}, "pm_") == "pm_from_dict"
    assert (
        normalize_stripe_id('{"id": "pm_from_json", "object": "payment_method"}', "pm_")
        == "pm_from_json"
    )
    assert normalize_stripe_id(_FakePm(), "pm_") == "pm_from_obj"
    assert normalize_stripe_id("not_an_id", "pm_") is None
    assert normalize_stripe_id(None, "pm_") is None
    assert normalize_stripe_id("{broken json", "pm_") is None
    assert normalize_stripe_id({"id": "cus_wrong_kind"}, "pm_") is None


def test_history_masks_stripe_ids_pure() -> None:
    """Masking keeps the type prefix and 4 characters and hides the tail."""
    masked = mask_stripe_reference("pi_1234567890abcdef")
    assert masked == "pi_1234…"
    assert "abcdef" not in masked
    assert mask_stripe_reference("cs_test_a1b2c3d4e5f6") == "cs_test_a1b2…"
    assert mask_stripe_reference(None) is None
