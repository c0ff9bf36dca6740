"""Budget periods: a tenant's budget renews every UTC day or every UTC calendar month."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

PERIODS = ("daily", "monthly")
END_OF_TIME = datetime.max.replace(tzinfo=UTC)  # the last period a datetime can hold (December 9999) ends here


def bounds(period: str, at: datetime) -> tuple[datetime, datetime]:
    """The start (inclusive) and end (exclusive) of the ``period`` that contains ``at``, in UTC."""
    at = at.astimezone(UTC)
    if period == "daily":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, (start + timedelta(days=1) if start.date() < END_OF_TIME.date() else END_OF_TIME)
    if period == "monthly":
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        if start.month < 12:
            return start, start.replace(month=start.month + 1)
        return start, (start.replace(year=start.year + 1, month=1) if start.year < END_OF_TIME.year else END_OF_TIME)
    raise ValueError(f"unknown budget period {period!r}; known: {list(PERIODS)}")


def projected_micros(spent_micros: int, start: datetime, end: datetime, at: datetime) -> int:
    """End-of-period spend if the burn rate so far goes on: spent × period length / time elapsed, in integer
    micros (microsecond time resolution, rounded down). Before any time has passed it is what was spent."""
    elapsed = _microseconds(at - start)
    if elapsed <= 0:
        return spent_micros
    return spent_micros * _microseconds(end - start) // elapsed


def _microseconds(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def projected_with_burn(spent_micros: int, serving_micros: int, burn_micros_per_hour: int, start: datetime,
                        end: datetime, at: datetime) -> int:
    """End-of-period spend: what was spent, plus the serving fleet's current burn for the time left (idle replicas
    cost the same every hour whether or not they served), plus the other categories (jobs) at their rate so far."""
    left = max(0, _microseconds(end - at))
    others = projected_micros(spent_micros - serving_micros, start, end, at) - (spent_micros - serving_micros)
    return spent_micros + burn_micros_per_hour * left // 3_600_000_000 + others
