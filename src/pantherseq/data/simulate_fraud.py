"""Fraud injected into the simulator's genuine events (SPEC §2): six scenarios with labels and scenario ids
(docs/FRAUD.md names each one's real-world counterpart).

`inject_fraud` hits about `fraud_user_rate` of the users, each with one scenario (shares `SHARES`):

1 card_testing: 1–3 bursts of 3–10 online payments under 5, seconds to a minute or two apart, at 1–3
  (mostly high-risk) online merchants; half of the bursts are followed within hours by one large online
  purchase (electronics, online retail, travel).
2 amount_spike: 1–5 payments at 5–20× the user's typical amount for a category they use, at one of their
  merchants or another of the same category, hours to two days after one of their own payments.
3 compromised_merchant: `compromised_rate` of the merchants (busy, physical ones) are compromised for
  2–4 weeks. Of the users who paid there meanwhile, some get fraudulent payments from 2–10 days later on,
  for 3–14 days: other merchants anywhere, risky categories, about 3× their usual amounts, mostly at night.
  Only those later payments are fraud (scenario 3); the payment at the compromised merchant stays genuine.
4 account_takeover: from some day on, for 3–10 days, the user's routine is replaced: their genuine events
  in the window are dropped and an attacker pays at a few merchants of another region, in risky
  categories (electronics, online retail, cash, travel), mostly at night, at about 2.5× the usual amounts.

Two behaviour-only scenarios: every amount is drawn from the victim's own amounts (their level for the
category, or one of their earlier payments) and the counts are the victim's own, so nothing about amounts or
counts gives them away; only *what*, *when* and *where* do, and only against the victim's own past.
5 stealth_takeover: as 4, the victim's events of a 3–10 day window are replaced, but one for one on the
  same day, by the payments of someone who lives differently: each copies the merchant, channel and time of
  day of a random payment of one donor (a user of another region and persona), at the amount the victim
  would pay in that category (their own lognormal level). Every value is an ordinary one for the population
  (the donor's routine is genuine), so only its novelty for *this* victim gives it away.
6 rogue_merchant: card-not-present merchants (online retail, entertainment; one per about four victims) turn
  rogue for 4–8 days and charge stolen cards of customers who never paid there (and do shop in the
  merchant's category): 1–3 charges each, each a copy of a random earlier payment of the victim in that
  category (amount, time of day, channel) on a day of the window. The merchant, new to every victim, is
  the only sign.

Scenario-3 victims are chosen first (they depend on who paid where); the other scenarios draw from the
remaining users with at least 5 genuine events (5 and 6 from those their typology fits). With the default
config, about 0.4% of events are fraud.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from pantherseq.data.schema import DAY
from pantherseq.data.simulate_world import World

logger = logging.getLogger(__name__)

SHARES = {1: 0.15, 2: 0.1, 3: 0.2, 4: 0.15, 5: 0.2, 6: 0.2}  # share of the fraud users per scenario
_RISKY = ("electronics", "online_retail", "cash_withdrawal", "travel")
_RISKY_P = (0.35, 0.3, 0.25, 0.1)
_TESTED = ("online_retail", "electronics", "entertainment", "travel")  # where card testers try a card
_PHYSICAL = ("grocery", "fuel", "restaurant", "coffee", "pharmacy")  # where a card can be skimmed
_ROGUE = ("online_retail", "entertainment")  # card-not-present merchants most customers use the kind of


@dataclass
class Compromise:
    merchant: np.ndarray  # merchant index
    start: np.ndarray  # window start, seconds since the simulation start
    end: np.ndarray  # window end (exclusive)

    def columns(self, n_merchants: int, start_us: int) -> dict[str, pl.Series]:
        """`compromised`, `compromised_from`, `compromised_to` (null if never) for every merchant."""
        hit = np.zeros(n_merchants, bool)
        hit[self.merchant] = True
        out: dict[str, pl.Series] = {"compromised": pl.Series(hit)}
        for name, seconds in (("compromised_from", self.start), ("compromised_to", self.end)):
            us = np.zeros(n_merchants, np.int64)
            us[self.merchant] = seconds * 1_000_000 + start_us
            out[name] = pl.Series(us).cast(pl.Datetime("us")).scatter(np.flatnonzero(~hit), None)
        return out


@dataclass
class Fraud:
    keep: np.ndarray  # bool over the genuine events: False = replaced by an account takeover
    parts: list[dict[str, np.ndarray]]  # fraudulent event dicts
    compromise: Compromise


def _quotas(n_fraud: int) -> dict[int, int]:
    quota = {s: round(n_fraud * share) for s, share in SHARES.items()}
    return {s: max(q, 1) for s, q in quota.items()} if n_fraud >= len(SHARES) else quota


def _cumsum_within(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums of `x` restarted at every group of `counts` consecutive items."""
    total = np.cumsum(x)
    first = np.cumsum(counts) - counts
    return total - np.repeat(total[first] - x[first], counts)


def _risky_categories(rng: np.random.Generator, world: World, size) -> np.ndarray:
    return world.cat_ids(*_RISKY)[rng.choice(len(_RISKY), size=size, p=_RISKY_P)]


def _fraud_channels(rng: np.random.Generator, world: World, cat: np.ndarray, in_store: str) -> np.ndarray:
    """Online for online retail and travel, `in_store` for cash, either for electronics."""
    online, store = world.channel_id("online"), world.channel_id(in_store)
    online_cat = np.isin(cat, world.cat_ids("online_retail", "travel"))
    either = (cat == world.cat_ids("electronics")[0]) & (rng.random(len(cat)) < 0.5)
    return np.where(online_cat | either, online, store).astype(np.int8)


def _night_hours(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.where(rng.random(n) < 0.6, rng.uniform(0, 5, n), rng.uniform(0, 24, n))


def _compromise(rng: np.random.Generator, world: World, genuine: dict, rate: float) -> Compromise:
    """Busy physical merchants (chosen by traffic) compromised for 2–4 weeks each."""
    traffic = np.bincount(genuine["merchant"], minlength=world.n_merchants).astype(float)
    traffic *= np.isin(world.merchant_cat, world.cat_ids(*_PHYSICAL))
    k = min(max(1, round(rate * world.n_merchants)) if rate > 0 else 0, int((traffic > 0).sum()))
    merchant = rng.choice(world.n_merchants, size=k, replace=False, p=traffic / traffic.sum()) if k else \
        np.zeros(0, np.int64)
    length = rng.integers(14, 29, k) * DAY
    latest = np.maximum(world.days * DAY - length - 8 * DAY, DAY)
    start = (rng.integers(0, latest) // DAY) * DAY
    return Compromise(merchant, start, np.minimum(start + length, world.days * DAY))


def _compromised_victims(rng, world: World, genuine: dict, comp: Compromise, quota: int):
    """Users who paid at a compromised merchant in its window; fraud starts 2–10 days after that payment."""
    if quota == 0 or len(comp.merchant) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    slot = np.full(world.n_merchants, -1)
    slot[comp.merchant] = np.arange(len(comp.merchant))
    s = slot[genuine["merchant"]]
    hit = (s >= 0) & (genuine["t"] >= comp.start[s]) & (genuine["t"] < comp.end[s])
    users, first = np.unique(genuine["user"][hit], return_index=True)  # events sorted: first = earliest
    fraud_start = genuine["t"][hit][first] + (rng.uniform(2, 10, len(users)) * DAY).astype(np.int64)
    ok = fraud_start < (world.days - 1) * DAY
    chosen = np.sort(rng.choice(np.flatnonzero(ok), size=min(quota, int(ok.sum())), replace=False))
    logger.debug("compromised merchants: %d users exposed, %d victims", len(users), len(chosen))
    return users[chosen], fraud_start[chosen]


def _compromised_fraud(rng, world: World, users: np.ndarray, fraud_start: np.ndarray) -> dict:
    first_day = fraud_start // DAY + 1
    duration = np.minimum(rng.integers(3, 15, len(users)), world.days - first_day)
    v = np.repeat(np.arange(len(users)), 1 + rng.poisson(5.0 * duration))
    day = first_day[v] + (rng.random(len(v)) * duration[v]).astype(np.int64)
    t = day * DAY + (_night_hours(rng, len(v)) * 3600).astype(np.int64)
    cat = _risky_categories(rng, world, len(v))
    merchant = world.merchants_in(rng, world.n_regions, cat)
    amount = world.typical[users[v], cat] * rng.lognormal(np.log(3.0), 0.4, len(v))
    return world.events(users[v], t, merchant, amount, _fraud_channels(rng, world, cat, "swipe"), 3)


def _testing_merchants(rng, world: World, shape: tuple[int, ...]) -> np.ndarray:
    """Mostly high-risk online merchants, else any merchant of a category card testers use."""
    tested = np.flatnonzero(np.isin(world.merchant_cat, world.cat_ids(*_TESTED)))
    risky = tested[world.merchant_risk[tested] == 2]
    risky = risky if risky.size else tested
    pick_risky = rng.random(shape) < 0.7
    return np.where(pick_risky, risky[rng.integers(0, len(risky), shape)],
                    tested[rng.integers(0, len(tested), shape)])


def _card_testing(rng, world: World, users: np.ndarray) -> list[dict]:
    burst_user = np.repeat(users, rng.choice(3, size=len(users), p=(0.4, 0.35, 0.25)) + 1)
    n = len(burst_user)
    t0 = rng.integers(0, max(world.days * DAY - 8 * 3600, 1), n)
    size = rng.integers(3, 11, n)
    shops, n_shops = _testing_merchants(rng, world, (n, 3)), rng.integers(1, 4, n)
    b = np.repeat(np.arange(n), size)
    t = t0[b] + _cumsum_within(rng.exponential(40.0, len(b)) + 5, size).astype(np.int64)
    merchant = shops[b, (rng.random(len(b)) * n_shops[b]).astype(np.int64)]
    online = world.channel_id("online")
    small = world.events(burst_user[b], t, merchant, rng.uniform(0.5, 4.99, len(b)), online, 1)
    big = rng.random(n) < 0.5
    t_big = t[np.cumsum(size) - 1][big] + rng.integers(600, 6 * 3600, int(big.sum()))
    cat = world.cat_ids("electronics", "online_retail", "travel")[rng.integers(0, 3, int(big.sum()))]
    large = world.events(burst_user[big], t_big, world.merchants_in(rng, world.n_regions, cat),
                         rng.lognormal(np.log(600.0), 0.5, len(cat)), online, 1)
    return [small, large]


def _amount_spike(rng, world: World, genuine: dict, users: np.ndarray) -> dict:
    """Copies of random own payments, hours to days later, at 5–20× the user's typical amount."""
    u = np.repeat(users, rng.choice(5, size=len(users), p=(0.25, 0.25, 0.2, 0.15, 0.15)) + 1)
    first = np.searchsorted(genuine["user"], u)
    count = np.searchsorted(genuine["user"], u, side="right") - first
    template = first + (rng.random(len(u)) * count).astype(np.int64)
    cat = genuine["category"][template].astype(np.int64)
    merchant = np.where(rng.random(len(u)) < 0.5, genuine["merchant"][template],
                        world.merchants_in(rng, world.region[u], cat))
    t = genuine["t"][template] + rng.integers(3600, 2 * DAY, len(u))
    amount = world.typical[u, cat] * rng.uniform(5, 20, len(u))
    return world.events(u, t, merchant, amount, genuine["channel"][template], 2)


def _takeover(rng, world: World, genuine: dict, users: np.ndarray) -> tuple[np.ndarray, dict]:
    """The genuine events kept (those in a takeover window are not) and the attacker's events."""
    n, days = len(users), world.days
    first = min(max(1, days // 4), days - 1)
    start_day = rng.integers(first, max(first + 1, days - 2), n)
    end_day = np.minimum(start_day + rng.integers(3, 11, n), days)
    window_start, window_end = np.full(world.n_users, -1), np.full(world.n_users, -1)
    window_start[users], window_end[users] = start_day * DAY, end_day * DAY
    owner = genuine["user"]
    keep = ~((genuine["t"] >= window_start[owner]) & (genuine["t"] < window_end[owner]))
    region = (world.region[users] + rng.integers(1, world.n_regions, n)) % world.n_regions
    shops = world.merchants_in(rng, region[:, None], _risky_categories(rng, world, (n, 4)))
    v = np.repeat(np.arange(n), 3 + rng.poisson(15.0 * (end_day - start_day)))
    merchant = shops[v, rng.integers(0, 4, len(v))]
    day = start_day[v] + (rng.random(len(v)) * (end_day - start_day)[v]).astype(np.int64)
    hour = (rng.uniform(0, 4, n)[v] + rng.normal(0, 1.5, len(v))) % 24
    t = day * DAY + (hour * 3600).astype(np.int64)
    cat = world.merchant_cat[merchant]
    amount = world.typical[users[v], cat] * rng.lognormal(np.log(2.5), 0.5, len(v))
    return keep, world.events(users[v], t, merchant, amount, _fraud_channels(rng, world, cat, "chip"), 4)


def _per_user_counts(genuine: dict, slot: np.ndarray, before: np.ndarray, key: np.ndarray, width: int
                     ) -> np.ndarray:
    """(len(before), width) counts of `key` over each slotted user's genuine events before `before[slot]`."""
    s = slot[genuine["user"]]
    hit = (s >= 0) & (genuine["t"] < before[np.maximum(s, 0)])
    out = np.zeros((len(before), width), np.int64)
    np.add.at(out, (s[hit], key[hit].astype(np.int64)), 1)
    return out


def _earlier_events(rng, genuine: dict, users: np.ndarray, before: np.ndarray, category: np.ndarray | None = None
                    ) -> np.ndarray:
    """For each row (user, time[, category]) the index of a random genuine event of that user before that
    time (of that category). The fraud users are a few dozen: a loop over them."""
    cat = np.full(len(users), -1) if category is None else np.asarray(category, np.int64)
    out = np.empty(len(users), np.int64)
    for u, c in sorted({(int(u), int(c)) for u, c in zip(users, cat)}):
        own = np.flatnonzero((genuine["user"] == u) & ((genuine["category"] == c) | (c < 0)))
        rows = np.flatnonzero((users == u) & (cat == c))
        limit = np.searchsorted(genuine["t"][own], before[rows])  # genuine is sorted by (user, time)
        out[rows] = own[(rng.random(len(rows)) * np.maximum(limit, 1)).astype(np.int64)]
    return out


def _donors(rng, world: World, genuine: dict, victims: np.ndarray) -> np.ndarray:
    """Per victim, a random user of another region and another persona (any other user where none is)
    with at least 10 genuine events: whose routine the attacker's payments copy."""
    counts = np.bincount(genuine["user"], minlength=world.n_users)
    out = np.empty(len(victims), np.int64)
    for i, v in enumerate(victims):
        other = (counts >= 10) & (np.arange(world.n_users) != v)
        pool = np.flatnonzero(other & (world.region != world.region[v]) & (world.persona != world.persona[v]))
        pool = pool if pool.size else np.flatnonzero(other)
        out[i] = pool[rng.integers(0, len(pool))]
    return out


def _stealth_takeover(rng, world: World, genuine: dict, candidates: np.ndarray, quota: int
                      ) -> tuple[np.ndarray, dict]:
    """Scenario 5 (module doc): the genuine events kept and the attacker's events."""
    days, n = world.days, len(candidates)
    if quota == 0 or n == 0:
        none = np.zeros(0, np.int64)
        return np.ones(len(genuine["t"]), bool), world.events(none, none, none, np.zeros(0), 0, 5)
    first = min(max(1, days // 3), days - 1)
    start = rng.integers(first, max(first + 1, days - 2), n) * DAY
    end = np.minimum(start + rng.integers(3, 11, n) * DAY, days * DAY)
    slot = np.full(world.n_users, -1)
    slot[candidates] = np.arange(n)
    s = slot[genuine["user"]]
    w0, w1 = start[np.maximum(s, 0)], end[np.maximum(s, 0)]  # each event's user's window, if a candidate
    before = np.bincount(s[(s >= 0) & (genuine["t"] < w0)], minlength=n)  # each candidate's events so far
    inside = (s >= 0) & (genuine["t"] >= w0) & (genuine["t"] < w1)
    fits = (before >= 10) & (np.bincount(s[inside], minlength=n) > 0)
    chosen = np.flatnonzero(fits)[:quota]
    picked = np.zeros(n, bool)
    picked[chosen] = True
    replaced = np.flatnonzero(inside & picked[np.maximum(s, 0)])
    keep = np.ones(len(genuine["t"]), bool)
    keep[replaced] = False
    donor = np.full(n, -1)
    donor[chosen] = _donors(rng, world, genuine, candidates[chosen])
    v = s[replaced]  # candidate slot of each attacker event
    users = candidates[v]
    first_of = np.searchsorted(genuine["user"], donor[v])  # genuine is sorted by (user, time)
    count = np.searchsorted(genuine["user"], donor[v], side="right") - first_of
    copied = first_of + (rng.random(len(v)) * count).astype(np.int64)  # a random payment of the donor each
    merchant = genuine["merchant"][copied]
    t = genuine["t"][replaced] // DAY * DAY + genuine["t"][copied] % DAY
    amount = world.amounts(rng, users, world.merchant_cat[merchant].astype(np.int64))
    logger.debug("stealth takeover: %d of %d candidates fit, %d victims", int(fits.sum()), n, len(chosen))
    return keep, world.events(users, t, merchant, amount, genuine["channel"][copied], 5)


def _rogue_merchants(rng, world: World, genuine: dict, candidates: np.ndarray, quota: int) -> dict:
    """Scenario 6 (module doc): charges at a few rogue merchants to customers who never paid there."""
    pool = np.flatnonzero(np.isin(world.merchant_cat, world.cat_ids(*_ROGUE)))
    k = min(max(1, round(quota / 4)), len(pool)) if quota > 0 else 0  # about 4 victims each
    merchants = rng.choice(pool, size=k, replace=False)
    first = min(max(1, world.days // 3), world.days - 1)
    taken = np.zeros(world.n_users, bool)
    users, start, length = [], [], []
    for i, m in enumerate(merchants):
        s0 = int(rng.integers(first, max(first + 1, world.days - 5))) * DAY
        in_cat = (genuine["category"] == world.merchant_cat[m]) & (genuine["t"] < s0)
        regular = np.bincount(genuine["user"][in_cat], minlength=world.n_users) >= 3
        regular[genuine["user"][genuine["merchant"] == m]] = False  # never paid there, before or after
        ok = candidates[regular[candidates] & ~taken[candidates]]
        victims = ok[:(quota - int(taken.sum())) // (k - i)]  # the quota spread over the merchants left
        taken[victims] = True
        users.append(np.repeat(victims, rng.integers(1, 4, len(victims))))
        start.append(np.full(len(users[-1]), s0))
        length.append(np.full(len(users[-1]), min(int(rng.integers(4, 9)), world.days - s0 // DAY)))
    u = np.concatenate([np.zeros(0, np.int64), *users]).astype(np.int64)
    s0 = np.concatenate([np.zeros(0, np.int64), *start]).astype(np.int64)
    span = np.concatenate([np.zeros(0, np.int64), *length]).astype(np.int64)
    m = np.repeat(merchants, [len(x) for x in users]).astype(np.int64)
    template = _earlier_events(rng, genuine, u, s0, world.merchant_cat[m])
    t = s0 + (rng.random(len(u)) * span).astype(np.int64) * DAY + genuine["t"][template] % DAY
    logger.debug("rogue merchants: %d merchants, %d victims", len(merchants), int(taken.sum()))
    return world.events(u, t, m, genuine["amount"][template], genuine["channel"][template], 6)


def inject_fraud(seed: np.random.SeedSequence, world: World, genuine: dict[str, np.ndarray],
                 fraud_user_rate: float, compromised_rate: float) -> Fraud:
    """Fraud for the genuine events `genuine` (sorted by user, then time)."""
    rngs = [np.random.default_rng(s) for s in seed.spawn(8)]
    quota = _quotas(round(fraud_user_rate * world.n_users))
    comp = _compromise(rngs[0], world, genuine, compromised_rate)
    victims3, fraud_start = _compromised_victims(rngs[1], world, genuine, comp, quota[3])
    active = np.flatnonzero(np.bincount(genuine["user"], minlength=world.n_users) >= 5)
    free = rngs[2].permutation(np.setdiff1d(active, victims3))
    cut = np.cumsum([quota[1], quota[2], quota[4]])
    victims1, victims2, victims4 = free[:cut[0]], free[cut[0]:cut[1]], free[cut[1]:cut[2]]
    keep, takeover = _takeover(rngs[3], world, genuine, victims4)
    rest = free[cut[2]:]  # scenarios 5 and 6 take the users their typology fits, in this random order
    keep5, stealth = _stealth_takeover(rngs[6], world, genuine, rest, quota[5])
    rogue = _rogue_merchants(rngs[7], world, genuine, rest[~np.isin(rest, stealth["user"])], quota[6])
    parts = [*_card_testing(rngs[4], world, victims1), _amount_spike(rngs[5], world, genuine, victims2),
             _compromised_fraud(rngs[1], world, victims3, fraud_start), takeover, stealth, rogue]
    logger.debug("fraud users per scenario: %s", [len(victims1), len(victims2), len(victims3), len(victims4),
                                                  len(np.unique(stealth["user"])), len(np.unique(rogue["user"]))])
    return Fraud(keep & keep5, parts, comp)


# -- how behaviour-only a scenario is (tests/data/test_simulate.py, benchmarks/scenario_leak.py) ---------------
def victims_history(genuine: pl.DataFrame, fraud: pl.DataFrame) -> pl.DataFrame:
    """Each fraud victim's genuine events (event frames) before their first fraud."""
    first = fraud.group_by("user_id").agg(t0=pl.col("timestamp").min())
    return genuine.join(first, on="user_id").filter(pl.col("timestamp") < pl.col("t0"))


def population_share(rows: pl.DataFrame, genuine: pl.DataFrame, col: str) -> float:
    """The mean share of all genuine events that have each row's value of `col`: how common the rows' values
    are in the population (a behaviour-only scenario's are as common as genuine payments')."""
    share = genuine[col].value_counts(normalize=True)
    return float(rows.join(share, on=col, how="left")["proportion"].fill_null(0.0).mean())


def own_share(rows: pl.DataFrame, history: pl.DataFrame, col: str) -> float:
    """The mean share of the row's user's `history` that has the row's value of `col` (0 if never): how
    usual the rows' values are for their own user."""
    own = history.group_by("user_id", col).len().with_columns(p=pl.col("len") / pl.col("len").sum().over("user_id"))
    return float(rows.join(own, on=["user_id", col], how="left")["p"].fill_null(0.0).mean())
