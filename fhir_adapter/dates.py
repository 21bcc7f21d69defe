"""FHIR date, dateTime and instant parsing into timezone-aware UTC datetimes.

FHIR allows partial dates (``2012``, ``2012-08``), whole dates, and date-times that must
carry a zone when they carry a time. Real exports break that last rule (one clinosim
Encounter mixes both forms), so a date-time without a zone is read as UTC rather than
dropped; the choice is documented in docs/data.md. Anything else that does not parse
returns None and the caller counts the resource as dropped.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def parse_datetime(value: object) -> datetime | None:
    """A FHIR date/dateTime/instant as aware UTC, or None when absent or unparsable.

    Partial dates map to the first instant of the period they name.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _PARTIAL.match(text)
    if match:
        year, month, day = (int(g) if g else 1 for g in match.groups())
        try:
            return datetime(year, month, day, tzinfo=UTC)
        except ValueError:
            return None
    if "T" not in text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 falls before year 1 in UTC
        return None


def parse_date(value: object) -> date | None:
    """A FHIR date (or the date part of a dateTime), or None when absent or unparsable."""
    parsed = parse_datetime(value)
    return parsed.date() if parsed is not None else None
