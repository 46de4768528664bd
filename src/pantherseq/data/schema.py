"""The one data contract (SPEC §2): what an event, a field, a label, a profile and a split are.

Every source adapter turns its input into the *canonical event frame*, a Polars frame with

    user_id    Utf8          who acted (never empty)
    timestamp  Datetime[us]  when
    <field>    Utf8|Float64  one column per configured non-time field, named after the field
    label      Int8          optional (e.g. fraud = 1), null when unknown
    scenario   Int16         optional fraud scenario id (0 = genuine)
    event_id   Utf8          optional, must be unique when present

and, optionally, a *profile frame* (`user_id` + one column per profile field). Time-derived fields
(hour bucket, weekday, log time-gap) have no column: the tokenizer derives them from `timestamp`
and from `gap_s`, the seconds since the user's previous event, added when sequences are built.

A `DatasetConfig` (TOML) says where the columns come from, each field's kind and bucketing,
which fields form the token (the Cartesian product of paper §3.2), the profile fields, the
contrastive positive-pair rule and the split. Built-in configs live in `pantherseq/configs/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pantherseq.config import apply_overrides, build_config, load_toml, merge
from pantherseq.errors import ConfigError

USER, TIME, LABEL, SCENARIO, EVENT_ID, GAP = "user_id", "timestamp", "label", "scenario", "event_id", "gap_s"
RESERVED = {USER, TIME, LABEL, SCENARIO, EVENT_ID, GAP}
DATASETS = ("simulated", "handbook", "tabformer", "movielens100k", "csv")
TIME_DERIVED = ("hour", "weekday", "log_gap")

# token ids every vocabulary starts with (the tokenizer's SPECIAL_TOKENS, in this order); PAD = 0 everywhere
PAD, UNK, BOS, PROFILE = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[PROFILE]")
N_SPECIAL = len(SPECIAL_TOKENS)
GAP_BUCKETS = 16  # log2-second time-gap buckets: 1 = same second ... 15 = months; 0 = first / padding
DAY = 86_400  # seconds


@dataclass
class FieldConfig:
    """One attribute of an event.

    kind: `categorical` (values kept as strings), `numeric` (bucketed for the token), `time`
    (derived from the timestamp: `derive` = hour | weekday | log_gap).
    column: the source column (defaults to `name`); unused for `time` fields.
    bucketing / bins: for numeric and log_gap fields, `quantile` or `log_quantile` edges fitted on the
    training period; for `hour`, `bins` equal buckets of the day (6 → 4-hour buckets).
    max_values: categorical only, keep the most frequent values (0 = all); the rest are the field's UNK.
    min_value: numeric only, a smaller value is bad input (e.g. 0 for amounts that cannot be negative).
    required: a missing value is bad input when true, the field's UNK when false.
    separator: categorical only, the value is a set of labels joined by this (MovieLens' genres, "Comedy
    Romance"): the tokenizer, the field embeddings and CoLES take the whole set as one value, the
    aggregates the share of events holding each label (eval/representation.py).
    """

    name: str
    kind: Literal["categorical", "numeric", "time"] = "categorical"
    column: str | None = None
    derive: Literal["hour", "weekday", "log_gap"] | None = None
    bucketing: Literal["quantile", "log_quantile"] = "quantile"
    bins: int = 10
    max_values: int = 0
    min_value: float | None = None
    required: bool = True
    separator: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name

    def validate(self, where: str) -> None:
        if self.name in RESERVED:
            raise ConfigError(f"{where}: field name {self.name!r} is reserved ({', '.join(sorted(RESERVED))})")
        if self.kind == "time" and self.derive is None:
            raise ConfigError(f"{where}: time field {self.name!r} needs derive = one of {TIME_DERIVED}")
        if self.kind != "time" and self.derive is not None:
            raise ConfigError(f"{where}: derive is only for kind = \"time\" fields")
        if self.separator is not None and (self.kind != "categorical" or not self.separator):
            raise ConfigError(f"{where}: separator is only for categorical fields and must not be empty")
        if self.bins < 1 or (self.derive == "hour" and 24 % self.bins):
            raise ConfigError(f"{where}: bins = {self.bins} is invalid (hour needs a divisor of 24)")


@dataclass
class ColumnsConfig:
    """Source column names of the canonical columns (used by the `csv` and `handbook` sources)."""

    user_id: str = "user_id"
    timestamp: str = "timestamp"
    time_format: str | None = None  # strftime format, or None for epoch seconds / ISO auto-detection
    label: str | None = None
    scenario: str | None = None
    event_id: str | None = None


@dataclass
class ProfileConfig:
    """Static per-user attributes. `path`/`key` are for the `csv` source (a table joined on `key`)."""

    fields: list[FieldConfig] = field(default_factory=list)
    path: str | None = None
    key: str = "user_id"


@dataclass
class ItemsConfig:
    """An item side table joined to the events by id; its columns become event fields (docs/DATA.md).

    on: the event field holding the item id (a categorical field). key: the table's id column.
    fields: names of `[[fields]]` read from the table (each from its `column`) instead of from the events.
    path: the table (CSV / TSV / Parquet); the movielens100k source defaults to its own item file.
    separator: the CSV separator (default: tab for .tsv, .item and u.item files, else a comma).
    """

    path: str | None = None
    key: str = "item_id"
    on: str | None = None
    fields: list[str] = field(default_factory=list)
    separator: str | None = None


@dataclass
class TokenizerConfig:
    """Paper §3.2: the token is the Cartesian product of `fields`; keep the `top_k` most frequent."""

    fields: list[str] = field(default_factory=list)
    top_k: int = 60_000


@dataclass
class SplitConfig:
    """`time`: train < t1 <= valid < t2 <= test. `leave_last_out`: per user last = test, 2nd last = valid.

    min_events: users with fewer kept events are dropped (reason `user_too_short`).
    """

    kind: Literal["time", "leave_last_out"] = "time"
    t1: str | None = None
    t2: str | None = None
    min_events: int = 1

    def bounds(self) -> tuple[datetime, datetime]:
        if self.t1 is None or self.t2 is None:
            raise ConfigError("split: a time split needs t1 and t2 (ISO dates)")
        return datetime.fromisoformat(self.t1), datetime.fromisoformat(self.t2)

    def validate(self, where: str) -> None:
        if self.kind == "time":
            try:
                t1, t2 = self.bounds()
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if t2 < t1:
                raise ConfigError(f"{where}: t2 ({self.t2}) is before t1 ({self.t1})")


@dataclass
class UsersConfig:
    """Prepare a seeded part of the users (e.g. the 80 / 20 users of a transfer study; docs/DATA.md).

    The users left after the bad-row and `split.min_events` drops are ordered by a seeded hash of their
    user id; the first round(fraction x users) are kept, or with `complement` the others, so `fraction = 0.8`
    and the same with `complement = true` part the users in two, whatever the order of the files.
    """

    fraction: float = 1.0
    seed: int = 0
    complement: bool = False

    @property
    def all(self) -> bool:
        return self.fraction >= 1.0 and not self.complement

    def validate(self, where: str) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"{where}.fraction must be within (0, 1], got {self.fraction}")
        if self.complement and self.fraction >= 1.0:
            raise ConfigError(f"{where}: complement = true with fraction = 1 keeps no user")


@dataclass
class SequenceConfig:
    """Training windows over long histories: `max_len` events, consecutive windows `stride` apart."""

    max_len: int = 128
    stride: int | None = None  # None = max_len (non-overlapping windows)
    shards: int = 1  # prepare writes users dealt into this many shards (data/sequences.py); 1 = one folder


@dataclass
class SparkConfig:
    """`prepare --engine spark` / `embed --engine spark`: the master and any Spark settings (spark.* keys)."""

    master: str = "local[*]"
    conf: dict[str, str] = field(default_factory=dict)  # e.g. {"spark.driver.memory" = "2g"}


@dataclass
class SimulateConfig:
    """Parameters of the built-in simulator (`data/simulate.py`)."""

    n_users: int = 2_000
    days: int = 120
    start: str = "2024-01-01"
    seed: int = 0
    n_merchants: int = 400
    fraud_user_rate: float = 0.04  # share of users hit by some fraud in the period
    compromised_merchant_rate: float = 0.01

    def validate(self, where: str) -> None:
        if self.n_users < 1 or self.days < 1:
            raise ConfigError(f"{where}: n_users ({self.n_users}) and days ({self.days}) must be >= 1")
        if self.n_merchants < 12:
            raise ConfigError(f"{where}.n_merchants must be >= 12 (one per merchant category)")
        for name in ("fraud_user_rate", "compromised_merchant_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{where}.{name} must be within [0, 1], got {getattr(self, name)}")
        try:
            datetime.fromisoformat(self.start)
        except ValueError:
            raise ConfigError(f"{where}.start {self.start!r} is not an ISO date") from None


@dataclass
class DatasetConfig:
    name: str
    source: Literal["simulated", "handbook", "tabformer", "movielens100k", "csv"] = "csv"
    data: str | None = None  # a file, glob or folder; None = the source's default
    table: str | None = None  # instead of `data`: a Spark catalog table ("db.events"; prepare --engine spark)
    format: Literal["csv", "parquet", "auto"] = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    fields: list[FieldConfig] = field(default_factory=list)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    items: ItemsConfig = field(default_factory=ItemsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    contrastive: dict[str, float] = field(default_factory=dict)  # profile field -> tolerance (0 = equal)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    bad_rows: Literal["error", "drop"] = "error"
    max_value_chars: int = 256  # a longer text value (user id, event id, categorical) is bad input
    min_year: int = 1970  # a timestamp before this year ...
    max_year: int = 2100  # ... or after this one is bad input

    def field(self, name: str) -> FieldConfig:
        for f in self.fields:
            if f.name == name:
                return f
        raise ConfigError(f"no field named {name!r}; fields: {', '.join(f.name for f in self.fields)}")

    @property
    def column_fields(self) -> list[FieldConfig]:
        """Fields read from a column (all but the time-derived ones)."""
        return [f for f in self.fields if f.kind != "time"]

    @property
    def event_column_fields(self) -> list[FieldConfig]:
        """Fields read from the event files (the column fields but the item table's)."""
        return [f for f in self.column_fields if f.name not in self.items.fields]

    def _validate_items(self, where: str) -> None:
        items, kinds = self.items, {f.name: f.kind for f in self.fields}
        if not items.fields:
            if items.on or items.path:
                raise ConfigError(f"{where}.items: name the fields read from the item table (items.fields)")
            return
        if items.on is None or kinds.get(items.on) != "categorical" or items.on in items.fields:
            raise ConfigError(f"{where}.items.on = {items.on!r}: it must name the categorical event field holding "
                              f"the item id (one of {[n for n, k in kinds.items() if k == 'categorical']})")
        bad = [n for n in items.fields if kinds.get(n) in (None, "time")]
        if bad:
            raise ConfigError(f"{where}.items.fields: {bad} are not categorical or numeric fields "
                              f"({', '.join(kinds)})")

    def validate(self, where: str) -> None:
        if self.table is not None and (self.data is not None or self.source not in ("csv", "handbook")):
            raise ConfigError(f"{where}.table: a catalog table is the whole input of the csv or handbook source; "
                              f"it cannot be given with data ({self.data!r}) or for the {self.source!r} source")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.fields: duplicate field names in {names}")
        if not self.fields:
            raise ConfigError(f"{where}.fields: at least one field is needed")
        missing = [n for n in self.tokenizer.fields if n not in names]
        if missing:
            raise ConfigError(f"{where}.tokenizer.fields: {missing} are not fields ({', '.join(names)})")
        if not self.tokenizer.fields:
            raise ConfigError(f"{where}.tokenizer.fields: name at least one field to form the token")
        if self.sequences.shards < 1:
            raise ConfigError(f"{where}.sequences.shards must be >= 1, got {self.sequences.shards}")
        if self.tokenizer.top_k < 1:
            raise ConfigError(f"{where}.tokenizer.top_k must be >= 1")
        if self.max_value_chars < 1:
            raise ConfigError(f"{where}.max_value_chars must be >= 1, got {self.max_value_chars}")
        if not 1 <= self.min_year <= self.max_year <= 9999:
            raise ConfigError(f"{where}: min_year ({self.min_year}) and max_year ({self.max_year}) must satisfy "
                              "1 <= min_year <= max_year <= 9999")
        self._validate_items(where)
        profile_names = {f.name for f in self.profile.fields}
        bad = sorted(set(self.contrastive) - profile_names)
        if bad:
            raise ConfigError(f"{where}.contrastive: {bad} are not profile fields ({sorted(profile_names)})")


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("pantherseq") / "configs" / f"{name}.toml"))


def load_dataset_config(
    dataset: str = "simulated",
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
    table: str | None = None,
) -> DatasetConfig:
    """The built-in config of `dataset`, with `file` merged over it, then the overrides.

    The `csv` dataset has no built-in config: its file must say everything.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    raw: dict[str, Any] = {}
    if dataset != "csv":
        raw = load_toml(builtin_config_path(dataset))
    elif file is None:
        raise ConfigError("--dataset csv needs --config FILE describing the columns and fields")
    if file is not None:
        raw = merge(raw, load_toml(file))
    raw.setdefault("name", dataset)
    raw.setdefault("source", dataset)
    raw = apply_overrides(raw, overrides)
    if data is not None:
        raw["data"] = str(data)
    if table is not None:
        raw["table"] = str(table)
    return build_config(DatasetConfig, raw, where=str(file) if file else "config")
