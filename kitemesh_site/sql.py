"""Hand-written SQL for the statements every API request runs: its execution record, credit hold,
settlement and steps. Profiling put the ORM's query compiler at 0.2–0.5 ms a statement on that path,
several times what the database takes (README, Benchmarks); everywhere else the ORM is used. The
statements are plain SQL that SQLite and PostgreSQL both run, with values prepared by the model fields
(defaults, auto_now_add, UUIDs, JSON, datetimes, decimals), so rows are exactly what the ORM writes."""

import functools
from collections.abc import Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model


def _db() -> BaseDatabaseWrapper:
    # The thread's connection itself: `django.db.connection` is a proxy that looks it up again on every
    # attribute, and field preparation reads a dozen attributes a row.
    return connections[DEFAULT_DB_ALIAS]


def sql_rows(statement: str, params: Sequence[Any]) -> list[tuple]:
    """Run one statement; its rows (none for a write without RETURNING)."""
    with _db().cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def sql_count(statement: str, params: Sequence[Any]) -> int:
    """Run one write; how many rows it changed."""
    with _db().cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


def for_update() -> str:
    """The row-lock clause, where the database has one (SQLite locks the whole file for a write
    transaction instead: see DATABASES' transaction_mode)."""
    return " FOR UPDATE" if _db().features.has_select_for_update else ""


def db_value(model: type[Model], field: str, value: Any) -> Any:
    """`value` as `model.field` stores it in this database."""
    return model._meta.get_field(field).get_db_prep_save(value, _db())


def sql_insert(objs: Sequence[Model]) -> None:
    """Insert new instances of one model in one statement, as bulk_create would: field defaults and
    auto_now_add applied, an auto-increment primary key read back into each instance."""
    db = _db()
    model = type(objs[0])
    statement, fields = _insert_statement(model, len(objs), db.vendor)
    params = [f.get_db_prep_save(f.pre_save(obj, True), db) for obj in objs for f in fields]
    if model._meta.auto_field is None:
        sql_count(statement, params)
    else:
        for obj, (pk,) in zip(objs, sql_rows(statement, params), strict=True):
            obj.pk = pk
    for obj in objs:
        obj._state.adding, obj._state.db = False, db.alias


@functools.cache
def _insert_statement(model: type[Model], rows: int, vendor: str) -> tuple[str, list[Field]]:
    meta, quote = model._meta, _db().ops.quote_name
    fields = [f for f in meta.concrete_fields if f is not meta.auto_field]
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    statement = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)})"
        f" VALUES {', '.join([row] * rows)}"
    )
    if meta.auto_field is not None:
        statement += f" RETURNING {quote(meta.auto_field.column)}"
    return statement, fields


def sql_update(obj: Model, fields: Sequence[str]) -> int:
    """save(update_fields=fields) of a saved instance, in one statement; how many rows it changed."""
    meta, db = obj._meta, _db()
    quote = db.ops.quote_name
    columns = [meta.get_field(name) for name in fields]
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in columns)
    params = [f.get_db_prep_save(f.pre_save(obj, False), db) for f in columns]
    params.append(meta.pk.get_db_prep_value(obj.pk, db))
    return sql_count(f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s", params)
