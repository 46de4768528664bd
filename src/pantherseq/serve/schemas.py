"""The request bodies of the scoring service (pydantic): one transaction, a batch, a feedback label.

A transaction is `user_id`, `timestamp` and the dataset's raw fields, made from the run's config: numeric
fields take finite numbers at or above the field's minimum, categorical ones text or an integer (unknown
values become UNK). Unknown keys are refused; every refusal is a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from pantherseq.data.schema import DatasetConfig
from pantherseq.serve.scorer import parse_time

MAX_BATCH = 1000


def transaction_model(cfg: DatasetConfig) -> type[BaseModel]:
    """The pydantic model of one transaction: user_id, timestamp and the dataset's raw fields (numeric:
    finite numbers at or above the field's minimum; categorical: text or integer, unknown values -> UNK).
    Unknown keys are refused."""
    specs: dict[str, Any] = {
        "user_id": (Annotated[str, Field(min_length=1, max_length=256, description="the user / card id")], ...),
        "timestamp": (str | float, Field(..., description="ISO 8601 (naive = UTC) or unix seconds",
                                         examples=["2018-08-08 10:15:00"])),
    }
    for f in cfg.fields:
        if getattr(f, "derive", None) is not None:
            continue
        if f.kind == "numeric":
            typ = Annotated[float, Field(allow_inf_nan=False, ge=f.min_value)]
        else:
            typ = Annotated[str | int, Field(union_mode="left_to_right")]
        specs[f.name] = (typ if f.required else typ | None, ... if f.required else None)

    def check_time(cls, v):
        parse_time(v)
        return v

    return create_model("Transaction", __config__=ConfigDict(extra="forbid"),
                        __validators__={"check_time": field_validator("timestamp")(check_time)}, **specs)


def batch_model(tx: type[BaseModel]) -> type[BaseModel]:
    """{"transactions": [tx, ...]}, 1..MAX_BATCH of them."""
    return create_model("TransactionBatch", __config__=ConfigDict(extra="forbid"),
                        transactions=(list[tx], Field(..., min_length=1, max_length=MAX_BATCH)))


class Feedback(BaseModel):
    """A fraud label that became known for an answered event (`event_seq` from its /score answer)."""

    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=256)
    event_seq: int = Field(ge=1)
    label: int = Field(ge=0, le=1)


__all__ = ["MAX_BATCH", "Feedback", "batch_model", "transaction_model"]
