"""The project's exceptions: every error a user can cause says where (file, row, column, field) and why.

The CLI turns any `PantherseqError` into one line on stderr and exit code 2 — never a traceback. A message
never echoes more than `MAX_ECHO` characters of one input value.
"""

from __future__ import annotations

MAX_ECHO = 80


def echo(value: object, limit: int = MAX_ECHO) -> str:
    """repr(value), cut to `limit` characters ("..." marks the cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class PantherseqError(Exception):
    """Base class of the errors a user can fix (bad input, bad config)."""


class ConfigError(PantherseqError):
    """A config file or override is invalid: unknown key, wrong type, bad value."""


class DataError(PantherseqError):
    """Input data is invalid. Carries the location so the message can name it: a file, or a catalog table
    (Spark; its partition in the name), and the row and column in it. `reason` is the message alone."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        table: str | None = None,
        row: int | None = None,
        column: str | None = None,
        value: object = None,
    ):
        self.reason, self.file, self.table, self.row, self.column, self.value = message, file, table, row, column, value
        where = []
        if table is not None:
            where.append(f"table {table}")
        elif file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        detail = f" (value {echo(value)})" if value is not None else ""
        super().__init__(f"{prefix}: {message}{detail}" if prefix else f"{message}{detail}")
