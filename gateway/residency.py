"""Data residency: the regions each practice's requests may go to, and its `store` rule.

`Residency` is the in-memory view the request path reads (a dict lookup, no
database round trip): each practice's own setting from the
`practice_residency` table, else the gateway's defaults (`AZA_DEFAULT_REGIONS`,
`AZA_UPSTREAM_STORE`). The app loads the table at start and again every
`auth_cache_seconds`, so a change made on another instance arrives within
that time; a change made through this instance's route applies at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

StoreRule = Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class PracticeResidency:
    """A practice's own setting; None in a field: the gateway's default."""

    regions: frozenset[str] | None = None
    store: StoreRule | None = None


class Residency:
    """Each practice's effective regions and store rule."""

    def __init__(
        self,
        *,
        default_regions: frozenset[str] | None,
        store_allowed: bool,
        practices: Mapping[str, PracticeResidency] | None = None,
    ) -> None:
        self.default_regions = default_regions
        self.store_allowed_default = store_allowed
        self._practices: dict[str, PracticeResidency] = dict(practices or {})

    def regions_for(self, practice_id: str) -> frozenset[str] | None:
        """The regions the practice's requests may go to; None: any region."""
        own = self._practices.get(practice_id)
        if own is None or own.regions is None:
            return self.default_regions
        return own.regions

    def store_allowed(self, practice_id: str) -> bool:
        """Whether a client's explicit `store: true` may pass to the upstream."""
        own = self._practices.get(practice_id)
        if own is None or own.store is None:
            return self.store_allowed_default
        return own.store == "allow"

    def own(self, practice_id: str) -> PracticeResidency:
        return self._practices.get(practice_id) or PracticeResidency()

    def set(self, practice_id: str, setting: PracticeResidency) -> None:
        self._practices[practice_id] = setting

    def replace_all(self, practices: Mapping[str, PracticeResidency]) -> None:
        self._practices = dict(practices)
