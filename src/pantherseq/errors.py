"""The project's exceptions: every error a user can cause says where (file, row, column, field) and why.

The CLI turns any `PantherseqError` into one line on stderr and exit code 2 — never a traceback. A message
never echoes more than `MAX_ECHO` characters of one input value.
"""

from __future__ import annotations

MAX_ECHO = 80
TABLE = "table "  # how a location that is a catalog table, not a file, starts


def echo(value: object, limit: int = MAX_ECHO) -> str:
    """repr(value), cut to `limit` characters ("..." marks the cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class PantherseqError(Exception):
    """Base class of the errors a user can fix (bad input, bad config)."""


class ConfigError(PantherseqError):
    """A config file or override is invalid: unknown key, wrong type, bad value."""


class DataError(PantherseqError):
    """Input data is invalid. Carries the location so the message can name it."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        value: object = None,
    ):
        self.file, self.row, self.column, self.value = file, row, column, value
        where = []
        if file is not None:  # a Spark catalog table's partition names itself ("table db.events ...")
            where.append(file if file.startswith(TABLE) else f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        detail = f" (value {echo(value)})" if value is not None else ""
        super().__init__(f"{prefix}: {message}{detail}" if prefix else f"{message}{detail}")
