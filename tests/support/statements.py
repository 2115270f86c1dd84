"""The SQL statements a live server runs, counted from the test (the live server's threads have connections of
their own, which CaptureQueriesContext does not see)."""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db.backends.signals import connection_created


@contextmanager
def statements_logged() -> Iterator[list[str]]:
    """Every statement run by connections opened inside the block, whatever their thread (the tests run
    with CONN_MAX_AGE=0, so each request opens its own). Transaction control is left out: SQLite spells
    BEGIN as a statement, PostgreSQL does not."""
    log: list[str] = []
    wrapped = []

    def record(execute, sql, params, many, context):
        if not sql.startswith(("BEGIN", "PRAGMA", "SAVEPOINT", "RELEASE SAVEPOINT")):
            log.append(sql)
        return execute(sql, params, many, context)

    def wrap(sender, connection, **kwargs) -> None:
        if record not in connection.execute_wrappers:
            connection.execute_wrappers.append(record)
            wrapped.append(connection)

    connection_created.connect(wrap)
    try:
        yield log
    finally:
        connection_created.disconnect(wrap)
        for connection in wrapped:
            connection.execute_wrappers.remove(record)
