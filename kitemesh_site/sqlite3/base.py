"""Django's SQLite backend, turning a statement's `%s` placeholders into SQLite's `?` once per statement
text instead of on every run: the request path runs the same dozen statements over and over, and the
regular expression that converts them was a sixth of the instructions of its database work (callgrind;
README, Benchmarks)."""

import functools

from django.db.backends.sqlite3 import base


@functools.lru_cache(maxsize=1024)
def _qmark(query: str) -> str:
    return base.FORMAT_QMARK_REGEX.sub("?", query).replace("%%", "%")


class SQLiteCursorWrapper(base.SQLiteCursorWrapper):
    def convert_query(self, query: str, *, param_names: list | None = None) -> str:
        if param_names is None:
            return _qmark(query)
        return super().convert_query(query, param_names=param_names)


class DatabaseWrapper(base.DatabaseWrapper):
    def create_cursor(self, name: str | None = None) -> SQLiteCursorWrapper:
        return self.connection.cursor(factory=SQLiteCursorWrapper)
