"""Metering and limits: prices, usage, estimates, budget periods and snapshots; pure logic."""
