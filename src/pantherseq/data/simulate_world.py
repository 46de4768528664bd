"""The simulator's world (SPEC §2): users with demographics and a hidden persona, merchants, where each user shops.

The tables here (categories with their amounts, hours and channels; regions; personas' channel tastes) and
`World`, the hidden state built from them, are shared by the genuine routines (`simulate.py`) and the
injected fraud (`simulate_fraud.py`); both import this module and neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pantherseq.data.schema import DAY, SimulateConfig

CATEGORIES = ("grocery", "fuel", "restaurant", "coffee", "transport", "utilities", "online_retail",
              "electronics", "travel", "pharmacy", "entertainment", "cash_withdrawal")
CHANNELS = ("chip", "contactless", "online", "swipe")
RISKS = ("low", "medium", "high")
REGIONS = ("north", "south", "east", "west", "central", "coastal")
PERSONAS = ("commuter", "family", "student", "retiree", "traveller", "online_shopper")
EVENT_KEYS = ("user", "t", "merchant", "category", "amount", "channel", "scenario")

CATEGORY_ID = {name: i for i, name in enumerate(CATEGORIES)}
_REGION_SHARE = np.array([0.2, 0.15, 0.15, 0.15, 0.2, 0.15])
_REGION_INCOME = np.array([0.05, -0.15, 0.0, -0.05, 0.2, 0.1])  # log-income shift per region

# Per category: typical amount (median at income 40k), its log-sd, income elasticity, share of merchants,
# P(high risk), hour-of-day mixture (mean1, sd1, weight1, mean2, sd2), channel probabilities.
CATEGORY_PARAMS = np.array([
    # amt   sd  elast shops high  h1    s1   w1   h2    s2   chip cless online swipe
    [45.0, .45, .5, 1.6, .03, 11.0, 2.0, .4, 18.0, 1.5, .45, .45, .05, .05],  # grocery
    [50.0, .30, .3, 0.8, .05, 8.0, 1.5, .4, 17.5, 2.0, .60, .25, .00, .15],  # fuel
    [35.0, .50, .7, 1.6, .05, 12.5, .8, .35, 19.5, 1.2, .45, .40, .10, .05],  # restaurant
    [4.5, .25, .2, 1.2, .02, 8.0, 1.0, .7, 14.0, 1.5, .20, .75, .03, .02],  # coffee
    [3.0, .30, .1, 0.6, .02, 8.0, 1.0, .5, 18.0, 1.0, .10, .75, .15, .00],  # transport
    [90.0, .08, .4, 0.4, .02, 9.0, 2.0, 1., 9.0, 2.0, .00, .00, 1.0, .00],  # utilities
    [40.0, .80, .7, 1.0, .25, 13.0, 3.0, .4, 21.0, 1.5, .00, .00, 1.0, .00],  # online_retail
    [180., .90, .8, 0.6, .30, 14.0, 2.5, 1., 14.0, 2.5, .40, .20, .35, .05],  # electronics
    [250., .80, .9, 0.5, .20, 12.0, 4.0, 1., 12.0, 4.0, .10, .05, .85, .00],  # travel
    [18.0, .60, .2, 0.8, .03, 11.0, 2.0, .6, 17.0, 1.5, .50, .40, .05, .05],  # pharmacy
    [25.0, .60, .6, 0.9, .20, 20.0, 1.5, .8, 15.0, 2.0, .30, .30, .35, .05],  # entertainment
    [80.0, .50, .4, 0.5, .20, 12.0, 4.0, 1., 12.0, 4.0, .85, .05, .00, .10],  # cash_withdrawal
])
# Per persona: channel taste multipliers (chip, contactless, online, swipe).
_TASTE = np.array([[1, 1.5, 1, .5], [1.2, 1, 1, 1], [.7, 1.8, 1.5, .3], [1.5, .4, .4, 2.5], [1, 1.2, 1.3, .5],
                   [1, 1, 2.5, .5]])
_CHANNEL_P = CATEGORY_PARAMS[None, :, 10:14] * _TASTE[:, None, :]
_CHANNEL_CUM = np.cumsum(_CHANNEL_P / _CHANNEL_P.sum(-1, keepdims=True), -1).reshape(-1, 4)  # (P*C, 4)


@dataclass
class World:
    """The hidden state: users, merchants, where each user shops. Event dicts hold `EVENT_KEYS` arrays."""

    days: int
    age: np.ndarray  # (U,) int
    female: np.ndarray  # (U,) bool
    region: np.ndarray  # (U,) region index
    income: np.ndarray  # (U,) float
    persona: np.ndarray  # (U,) persona index
    typical: np.ndarray  # (U, C) typical amount per category
    merchant_cat: np.ndarray  # (M,)
    merchant_region: np.ndarray  # (M,)
    merchant_risk: np.ndarray  # (M,) index into RISKS
    pool_members: np.ndarray  # merchants of every (region, category) cell, region len(REGIONS) = anywhere
    pool_start: np.ndarray  # (R+1, C)
    pool_count: np.ndarray  # (R+1, C)
    favourites: np.ndarray | None = None  # (U, C, 3) favourite merchants per category

    n_regions = len(REGIONS)

    @property
    def n_users(self) -> int:
        return len(self.persona)

    @property
    def n_merchants(self) -> int:
        return len(self.merchant_cat)

    @staticmethod
    def cat_ids(*names: str) -> np.ndarray:
        return np.array([CATEGORY_ID[n] for n in names])

    @staticmethod
    def channel_id(name: str) -> int:
        return CHANNELS.index(name)

    def merchants_in(self, rng: np.random.Generator, region, cat, skew: float = 1.0) -> np.ndarray:
        """Random merchants of category `cat` in `region` (broadcast); skew > 1 favours popular ones."""
        region, cat = np.broadcast_arrays(region, cat)
        offset = (rng.random(cat.shape) ** skew * self.pool_count[region, cat]).astype(np.int64)
        return self.pool_members[self.pool_start[region, cat] + offset]

    def amounts(self, rng: np.random.Generator, user, cat, sigma: float | None = None) -> np.ndarray:
        s = CATEGORY_PARAMS[cat, 1] if sigma is None else sigma
        return self.typical[user, cat] * np.exp(s * rng.standard_normal(len(user)))

    def channels(self, rng: np.random.Generator, user, cat) -> np.ndarray:
        row = self.persona[user].astype(np.int64) * len(CATEGORIES) + cat
        u = rng.random(len(user))
        return sum((u > _CHANNEL_CUM[row, k]).astype(np.int8) for k in range(3))

    def events(self, user, t, merchant, amount, channel, scenario: int = 0) -> dict[str, np.ndarray]:
        """An event dict; amounts rounded to cents (cash to multiples of 20), times kept in the period."""
        cat = self.merchant_cat[merchant]
        cash = cat == CATEGORY_ID["cash_withdrawal"]
        amount = np.where(cash, np.maximum(20.0, np.round(amount / 20) * 20),
                          np.maximum(0.01, np.round(amount, 2)))
        return {"user": np.asarray(user, np.int32), "t": np.clip(t, 0, self.days * DAY - 1).astype(np.int64),
                "merchant": np.asarray(merchant, np.int32), "category": cat.astype(np.int8), "amount": amount,
                "channel": np.broadcast_to(np.asarray(channel, np.int8), cat.shape).copy(),
                "scenario": np.full(len(cat), scenario, np.int8)}


def bump(x: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.exp(-(((x - center) / width) ** 2))


def _demographics(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    age = (18 + rng.beta(1.6, 2.2, n) * 67.999).astype(np.int64)
    female = rng.random(n) < 0.5
    region = rng.choice(len(REGIONS), size=n, p=_REGION_SHARE)
    log_income = (10.35 + 0.55 * bump(age, 50, 16) - 0.25 * (age >= 67) + _REGION_INCOME[region]
                  + 0.4 * rng.standard_normal(n))
    return age, female, region, np.round(np.exp(log_income), -2)


def _personas(rng: np.random.Generator, age, region, income) -> np.ndarray:
    """Persona = argmax of demographic scores plus Gumbel noise: predictable from demographics only partly."""
    z = (np.log(income) - 10.6) / 0.45
    scores = np.column_stack([
        1.3 * bump(age, 40, 14) + 0.7 * np.isin(region, (0, 4)),  # commuter: working age, urban
        1.6 * bump(age, 41, 9) + 0.4 * z,  # family
        3.5 / (1 + np.exp((age - 25) / 2.0)) - 0.3 * z,  # student
        3.5 / (1 + np.exp((64 - age) / 2.5)),  # retiree
        0.9 * z + 0.8 * (region == 5) + 0.3 * bump(age, 40, 15),  # traveller: well-off, coastal
        1.2 * bump(age, 30, 9) + 0.5 * (region == 3),  # online_shopper
    ])
    return np.argmax(scores + 0.8 * rng.gumbel(size=scores.shape), axis=1)


def _merchants(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Category (each at least once), region and risk level of `n` merchants."""
    shares = CATEGORY_PARAMS[:, 3] / CATEGORY_PARAMS[:, 3].sum()
    cat = np.concatenate([np.arange(len(shares)), rng.choice(len(shares), n - len(shares), p=shares)])
    region = rng.integers(0, len(REGIONS), n)
    u, high = rng.random(n), CATEGORY_PARAMS[cat, 4]
    risk = np.where(u < high, 2, np.where(u < high + 0.3, 1, 0))
    return cat, region, risk


def _pools(cat: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merchants per (region, category) cell; the last region row is 'anywhere'; an empty cell falls back."""
    shape = (len(REGIONS) + 1, len(CATEGORIES))
    start, count, members = np.zeros(shape, np.int64), np.zeros(shape, np.int64), []
    for r in range(shape[0]):
        for c in range(shape[1]):
            idx = np.flatnonzero((cat == c) & ((region == r) | (r == len(REGIONS))))
            idx = idx if idx.size else np.flatnonzero(cat == c)
            start[r, c], count[r, c] = sum(len(m) for m in members), len(idx)
            members.append(idx)
    return np.concatenate(members), start, count


def build_world(rng: np.random.Generator, cfg: SimulateConfig) -> World:
    age, female, region, income = _demographics(rng, cfg.n_users)
    persona = _personas(rng, age, region, income)
    typical = (CATEGORY_PARAMS[:, 0] * (income[:, None] / 40_000) ** CATEGORY_PARAMS[:, 2]
               * np.exp(0.25 * rng.standard_normal((cfg.n_users, len(CATEGORIES)))))
    m_cat, m_region, m_risk = _merchants(rng, cfg.n_merchants)
    world = World(cfg.days, age, female, region, income, persona, typical, m_cat, m_region, m_risk,
                  *_pools(m_cat, m_region))
    cells = np.broadcast_to(np.arange(len(CATEGORIES))[None, :, None], (cfg.n_users, len(CATEGORIES), 3))
    world.favourites = world.merchants_in(rng, region[:, None, None], cells, skew=1.5).astype(np.int32)
    return world
