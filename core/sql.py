"""Hand-written SQL for the statements every API request runs: its execution record, credit hold,
settlement and steps; and `sql_instances`, for the configuration those requests read (chat.selectors).
Profiling put the ORM's query compiler at 0.2–0.5 ms a statement on that path, several times what the
database takes, and at 5 ms for a group's configuration (README, Benchmarks); everywhere else the ORM is
used. The statements are plain SQL that SQLite and PostgreSQL both run, with values prepared by the model
fields (defaults, auto_now_add, UUIDs, JSON, datetimes, decimals), so rows are exactly what the ORM
writes. On PostgreSQL the request path's two transactions are each one statement (see the section at the
end)."""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)


def _db() -> BaseDatabaseWrapper:
    # The thread's connection itself: `django.db.connection` is a proxy that looks it up again on every
    # attribute, and field preparation reads a dozen attributes a row.
    return connections[DEFAULT_DB_ALIAS]


def _cursor() -> CursorWrapper:
    """A cursor of the thread's connection, made once per connection and kept for these statements:
    making one costs as much as running a short statement (README, Benchmarks). With Django's query
    logging on (DEBUG, a test capturing queries), a new one each time, so the statement is logged."""
    db = _db()
    kept = getattr(db, "_kitemesh_cursor", None)
    if kept is not None and kept[0] is db.connection and not db.queries_logged:
        return kept[1]
    cursor = db.cursor()  # (connecting when the connection is closed)
    db._kitemesh_cursor = (db.connection, cursor)
    return cursor


def sql_rows(statement: str, params: Sequence[Any]) -> list[tuple]:
    """Run one statement that returns rows (a SELECT, or a write with RETURNING); its rows."""
    cursor = _cursor()
    cursor.execute(statement, params)
    return cursor.fetchall()


def sql_count(statement: str, params: Sequence[Any]) -> int:
    """Run one write; how many rows it changed."""
    cursor = _cursor()
    cursor.execute(statement, params)
    return cursor.rowcount


def sql_instances(model: type[M], statement: str, params: Sequence[Any]) -> list[M]:
    """The rows of a written-out SELECT as `model` instances: columns matched to fields by name and
    converted as the ORM converts them, any other column set as an attribute (Django's raw(), which
    compiles no query)."""
    return list(model._default_manager.raw(statement, params))


def table(model: type[Model]) -> str:
    """The model's table name, quoted for this database."""
    return _db().ops.quote_name(model._meta.db_table)


@dataclass(frozen=True)
class Guard:
    """A condition a write must still find true when it runs: the row `pk` of `model` still has `value`
    in `field` (an optimistic check: the row was read earlier, out of any transaction)."""

    model: type[Model]
    pk: Any
    field: str
    value: Any

    def sql(self) -> tuple[str, list[Any]]:
        """A query that returns a row only while the guard holds."""
        meta, quote = self.model._meta, _db().ops.quote_name
        column = quote(meta.get_field(self.field).column)
        statement = f"SELECT 1 FROM {table(self.model)} WHERE {quote(meta.pk.column)} = %s AND {column} = %s"
        return statement, [db_value(self.model, meta.pk.name, self.pk), db_value(self.model, self.field, self.value)]


def guard_holds(guard: Guard) -> bool:
    return bool(sql_rows(*guard.sql()))


def for_update(of: str = "") -> str:
    """The row-lock clause (of the rows of the table or alias `of` alone, in a join), where the database
    has one (SQLite locks the whole file for a write transaction instead: see DATABASES'
    transaction_mode)."""
    if not _db().features.has_select_for_update:
        return ""
    return f" FOR UPDATE OF {of}" if of else " FOR UPDATE"


def db_value(model: type[Model], field: str, value: Any) -> Any:
    """`value` as `model.field` stores it in this database."""
    return model._meta.get_field(field).get_db_prep_save(value, _db())


def sql_insert(objs: Sequence[Model]) -> None:
    """Insert new instances of one model in one statement, as bulk_create would: field defaults and
    auto_now_add applied, an auto-increment primary key read back into each instance."""
    db = _db()
    model = type(objs[0])
    statement, fields = _insert_statement(model, len(objs), db.vendor)
    params = _insert_params(objs, fields)
    if model._meta.auto_field is None:
        sql_count(statement, params)
    else:
        for obj, (pk,) in zip(objs, sql_rows(statement, params), strict=True):
            obj.pk = pk
    saved(objs)


def saved(objs: Sequence[Model]) -> None:
    """Mark instances written by hand-written SQL as saved, as the ORM would."""
    alias = _db().alias
    for obj in objs:
        obj._state.adding, obj._state.db = False, alias


def _insert_params(objs: Sequence[Model], fields: list[Field]) -> list[Any]:
    db = _db()
    return [f.get_db_prep_save(f.pre_save(obj, True), db) for obj in objs for f in fields]


@functools.cache
def _insert_fields(model: type[Model]) -> tuple[str, list[Field]]:
    """`table (columns)` of an INSERT, and the fields that give its values."""
    meta, quote = model._meta, _db().ops.quote_name
    fields = [f for f in meta.concrete_fields if f is not meta.auto_field]
    return f"{quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)})", fields


@functools.cache
def _insert_statement(model: type[Model], rows: int, vendor: str) -> tuple[str, list[Field]]:
    into, fields = _insert_fields(model)
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    statement = f"INSERT INTO {into} VALUES {', '.join([row] * rows)}"
    if model._meta.auto_field is not None:
        statement += f" RETURNING {_db().ops.quote_name(model._meta.auto_field.column)}"
    return statement, fields


def sql_update(obj: Model, fields: Sequence[str], *, only_if: dict[str, Any] | None = None) -> int:
    """save(update_fields=fields) of a saved instance, in one statement; how many rows it changed. With
    `only_if` ({field: value}), only while the row still has those values (a compare-and-set)."""
    statement, params = update_statement(obj, fields)
    for name, value in (only_if or {}).items():
        statement += f" AND {_db().ops.quote_name(obj._meta.get_field(name).column)} = %s"
        params.append(db_value(type(obj), name, value))
    return sql_count(statement, params)


def update_statement(obj: Model, fields: Sequence[str], **exprs: str) -> tuple[str, list[Any]]:
    """The UPDATE of save(update_fields=fields); `exprs` gives SQL for some fields' values, in which %s
    stands for the value the field would write."""
    db = _db()
    statement, columns = _update_statement(type(obj), tuple(fields), tuple(exprs.items()))
    params = [f.get_db_prep_save(f.pre_save(obj, False), db) for f in columns]
    params.append(obj._meta.pk.get_db_prep_value(obj.pk, db))
    return statement, params


@functools.cache
def _update_statement(model: type[Model], fields: tuple[str], exprs: tuple[tuple[str, str]]) -> tuple[str, list[Field]]:
    meta, quote, values = model._meta, _db().ops.quote_name, dict(exprs)
    columns = [meta.get_field(name) for name in fields]
    assignments = ", ".join(f"{quote(f.column)} = {values.get(f.name, '%s')}" for f in columns)
    return f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s", columns


# --- Several writes in one statement (PostgreSQL) --------------------------------------------------
# A data-modifying WITH runs several writes as one statement: one round trip, its own transaction, no
# BEGIN and COMMIT of their own (billing.ledger_postgresql's StatementLedger writes the money path so;
# SQLite, which has no such WITH, takes TransactionLedger's statements one by one in a transaction).


def insert_values(objs: Sequence[Model]) -> tuple[str, list[Any]]:
    """The INSERT sql_insert runs for `objs`, as part of a WITH (the ids it returns are not read back)."""
    statement, fields = _insert_statement(type(objs[0]), len(objs), _db().vendor)
    return statement, _insert_params(objs, fields)


def insert_select(obj: Model, source: str, **exprs: str) -> tuple[str, list[Any]]:
    """The INSERT of a new instance as sql_insert writes it, selected FROM `source` (a WITH query: no row
    there, nothing inserted), with the SQL `exprs` in place of some columns' values."""
    db = _db()
    statement, fields = _insert_select_statement(type(obj), source, tuple(exprs.items()))
    return statement, [f.get_db_prep_save(f.pre_save(obj, True), db) for f in fields]


@functools.cache
def _insert_select_statement(model: type[Model], source: str, exprs: tuple[tuple[str, str]]) -> tuple[str, list[Field]]:
    """The statement, and the fields whose values are its parameters."""
    into, fields = _insert_fields(model)
    values = dict(exprs)
    selected = ", ".join(values.get(f.column, "%s") for f in fields)
    return f"INSERT INTO {into} SELECT {selected} FROM {source}", [f for f in fields if f.column not in values]


@functools.cache
def insert_derived(model: type[Model], source: str, exprs: tuple[tuple[str, str], ...]) -> str:
    """The INSERT of a row of `model` for each row of `source` (WITH queries), every column given as SQL
    by `exprs` ((column, expression) pairs): a row made from rows the same statement writes, with no
    instance to build and no parameters. A column without an expression is an error, so a field added
    to the model cannot be left out silently."""
    into, fields = _insert_fields(model)
    values = dict(exprs)
    if missing := [f.column for f in fields if f.column not in values]:
        raise ValueError(f"insert_derived: no value for {model.__name__} column(s) {', '.join(missing)}")
    return f"INSERT INTO {into} SELECT {', '.join(values[f.column] for f in fields)} FROM {source}"
