"""Train / validation / test assignment of events (SPEC §6).

- `time`: train = timestamp < t1, valid = t1 <= timestamp < t2, test = timestamp >= t2. Every valid or
  test event is later predicted from all of its user's earlier events, train ones included.
- `leave_last_out`: per user, the last event is test, the second-last valid, the rest train. The frame
  must already be in each user's chronological order (ties keep file order: the sort is stable).

`chosen_users` is the seeded user subset of `[users]` (a part of the users, before any split of events).
"""

from __future__ import annotations

import hashlib

import polars as pl

from pantherseq.data.schema import TIME, USER, SplitConfig, UsersConfig

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
SPLIT = "split"


def split_expr(cfg: SplitConfig) -> pl.Expr:
    """An Int8 expression giving each event's split; the frame is sorted by (user_id, timestamp)."""
    if cfg.kind == "time":
        t1, t2 = cfg.bounds()
        return (pl.when(pl.col(TIME) < t1).then(TRAIN).when(pl.col(TIME) < t2).then(VALID)
                .otherwise(TEST).cast(pl.Int8).alias(SPLIT))
    from_end = pl.int_range(pl.len(), 0, -1).over(USER)  # n, n-1, ..., 1 within each user
    return (pl.when(from_end == 1).then(TEST).when(from_end == 2).then(VALID)
            .otherwise(TRAIN).cast(pl.Int8).alias(SPLIT))


def split_counts(frame: pl.DataFrame) -> list[dict]:
    """One row per split present: {split, events, users}."""
    return frame.group_by(SPLIT).agg(pl.len().alias("events"), pl.col(USER).n_unique().alias("users")).to_dicts()


def split_summary(counts: list[dict], cfg: SplitConfig) -> dict:
    """What went where (from `split_counts` rows, of any engine): events and users per split, and the rule."""
    events = {name: 0 for name in SPLIT_NAMES}
    users = {name: 0 for name in SPLIT_NAMES}
    for row in counts:
        events[SPLIT_NAMES[row[SPLIT]]] = int(row["events"])
        users[SPLIT_NAMES[row[SPLIT]]] = int(row["users"])
    rule = {"kind": cfg.kind}
    if cfg.kind == "time":
        rule.update(t1=cfg.t1, t2=cfg.t2)
    return {**rule, "events": events, "users": users}


def user_rank_key(seed: int, user: str) -> tuple[bytes, str]:
    """What `[users]` orders user ids by: a seeded hash of the id, ties by the id."""
    return hashlib.blake2b(f"{seed}:{user}".encode(), digest_size=8).digest(), user


def kept_ranks(n: int, cfg: UsersConfig) -> range:
    """The ranks (in `user_rank_key` order) of the users `cfg` keeps among `n`: the first round(fraction x n),
    or the rest with `complement`."""
    head = round(cfg.fraction * n)
    return range(head, n) if cfg.complement else range(head)


def chosen_users(users: list[str], cfg: UsersConfig) -> set[str]:
    """The users `cfg` keeps (`user_rank_key`, `kept_ranks`). Depends on the set of users only, never on
    their order (the Spark engine ranks them the same way: spark/prepare.py)."""
    ranked = sorted(set(users), key=lambda u: user_rank_key(cfg.seed, u))
    keep = kept_ranks(len(ranked), cfg)
    return set(ranked[keep.start:keep.stop])
