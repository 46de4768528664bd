"""The request bodies of the scoring service (pydantic): one transaction, a batch, a feedback label, and the
checks every user id and categorical value passes.

A transaction is `user_id`, `timestamp` and the dataset's raw fields, made from the run's config: numeric
fields take finite numbers at or above the field's minimum, categorical ones text or an integer (unknown
values become UNK). Unknown keys are refused; every refusal is a 422 naming the field.

Text limits (issue 14): a user id is 1..`MAX_ID_CHARS` characters, a categorical value at most
`MAX_VALUE_CHARS`, a timestamp text at most `MAX_TIME_CHARS`; none may hold a control character (C0, DEL
or C1: `\\x00`-`\\x1f`, `\\x7f`-`\\x9f`), so no id can reach the store's internal names or break a log line,
nor a lone surrogate (`\\ud800`-`\\udfff`: valid in a JSON escape, not Unicode; no store can write it).
Integers are 64-bit; booleans are neither times nor numbers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from pantherseq.data.schema import DatasetConfig
from pantherseq.serve.scorer import parse_time

MAX_BATCH = 256
MAX_ID_CHARS = 128
MAX_VALUE_CHARS = 200
MAX_TIME_CHARS = 40
INT64 = 2**63
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_text(value: str, limit: int) -> str:
    """`value` if it is at most `limit` characters without control characters; ValueError otherwise."""
    if len(value) > limit:
        raise ValueError(f"longer than {limit} characters")
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    if _SURROGATE.search(value):  # JSON's "\ud800" parses to one; UTF-8 (a store's key, SQLite text) cannot hold it
        raise ValueError("lone surrogates (not Unicode text) are not allowed")
    return value


def valid_user_id(user: str) -> bool:
    """True for an id a request could carry (e.g. to skip a store's foreign log at start-up)."""
    try:
        return bool(user) and check_text(user, MAX_ID_CHARS) == user
    except ValueError:
        return False


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not accepted here")  # noqa: TRY004 (pydantic turns ValueError into a 422)
    return value


def _user_id(value: Any) -> Any:
    return check_text(value, MAX_ID_CHARS) if isinstance(value, str) else value


def _category(value: Any) -> Any:
    return check_text(value, MAX_VALUE_CHARS) if isinstance(value, str) else _no_bool(value)


def _time(value: Any) -> Any:
    if isinstance(value, str):
        check_text(value, MAX_TIME_CHARS)
    parse_time(_no_bool(value))  # ValueError: unparsable or outside 1970..2100
    return value


UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, description="the user / card id"),
                   BeforeValidator(_user_id)]
Category = Annotated[str | Annotated[int, Field(gt=-INT64, lt=INT64)], Field(union_mode="left_to_right"),
                     BeforeValidator(_category)]
Number = Annotated[float, BeforeValidator(_no_bool)]


def transaction_model(cfg: DatasetConfig) -> type[BaseModel]:
    """The pydantic model of one transaction: user_id, timestamp and the dataset's raw fields (numeric:
    finite numbers at or above the field's minimum; categorical: text or integer, unknown values -> UNK).
    Unknown keys are refused."""
    specs: dict[str, Any] = {
        "user_id": (UserId, ...),
        "timestamp": (Annotated[str | float, BeforeValidator(_time)],
                      Field(..., description="ISO 8601 (naive = UTC) or unix seconds",
                            examples=["2018-08-08 10:15:00"])),
    }
    for f in cfg.fields:
        if getattr(f, "derive", None) is not None:
            continue
        typ = Annotated[Number, Field(allow_inf_nan=False, ge=f.min_value)] if f.kind == "numeric" else Category
        specs[f.name] = (typ if f.required else typ | None, ... if f.required else None)
    return create_model("Transaction", __config__=ConfigDict(extra="forbid"), **specs)


def batch_model(tx: type[BaseModel], max_batch: int = MAX_BATCH) -> type[BaseModel]:
    """{"transactions": [tx, ...]}, 1..max_batch of them."""
    return create_model("TransactionBatch", __config__=ConfigDict(extra="forbid"),
                        transactions=(list[tx], Field(..., min_length=1, max_length=max_batch)))


class Feedback(BaseModel):
    """A fraud label that became known for an answered event (`event_seq` from its /score answer)."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId
    event_seq: int = Field(ge=1, lt=INT64)
    label: int = Field(ge=0, le=1)


__all__ = ["MAX_BATCH", "MAX_ID_CHARS", "MAX_VALUE_CHARS", "Feedback", "batch_model", "check_text",
           "transaction_model", "valid_user_id"]
