"""Moments as the API writes them."""

import datetime
from typing import Any


def iso(moment: Any) -> str | None:
    """ISO 8601 in UTC with a Z, as the SPEC's expires_at."""
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z") if moment else None
