"""Reading rows: one by its id, and a listing a page at a time (newest first, continued by a cursor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.service.db.tables import ID_PATTERN, is_id

T = TypeVar("T")

MAX_PAGE = 200


def by_id(session: Session, table: type[T], id: str, *, lock: bool = False, fresh: bool = False) -> T | None:
    """The row of ``table`` with primary key ``id``, or ``None`` (a string that is not an id never reaches SQL).
    ``lock`` takes a row lock (PostgreSQL); ``lock`` and ``fresh`` reload the row from the database."""
    if not is_id(id):
        return None
    return session.get(table, id, with_for_update=True if lock else None, populate_existing=lock or fresh)


@dataclass
class Page(Generic[T]):
    items: list[T]
    count: int
    next_cursor: str | None


#: a cursor is the last id of the previous page (ids are time-ordered), so its pattern is exactly an id's: every
#: string the API's schema lets through is a cursor the listing takes
CURSOR_PATTERN = ID_PATTERN


def encode_cursor(last_id: str) -> str:
    return last_id


def decode_cursor(cursor: str) -> str:
    if not is_id(cursor):
        raise InvalidInput(
            "Malformed pagination cursor",
            errors=[{"loc": ["query", "cursor"], "msg": "not a cursor returned by this API", "type": "cursor"}],
        )
    return cursor


def page(session: Session, stmt: Select[Any], table: Any, *, limit: int, cursor: str | None) -> Page[Any]:
    """Newest first (ids are time-ordered); the cursor is the last id of the previous page."""
    limit = max(1, min(int(limit), MAX_PAGE))
    count = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    if cursor:
        stmt = stmt.where(table.id < decode_cursor(cursor))
    rows = list(session.scalars(stmt.order_by(table.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=rows, count=count, next_cursor=encode_cursor(rows[-1].id) if more and rows else None)
