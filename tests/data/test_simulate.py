"""The simulator: the frame contract, determinism, and that each modelled behaviour is really there."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from pantherseq.data.schema import SimulateConfig
from pantherseq.data.simulate import CATEGORIES, SCENARIOS, simulate
from pantherseq.data.simulate_fraud import own_share, population_share, victims_history
from pantherseq.errors import ConfigError

EVENT_SCHEMA = {
    "user_id": pl.Utf8, "timestamp": pl.Datetime("us"), "amount": pl.Float64, "merchant_id": pl.Utf8,
    "category": pl.Utf8, "channel": pl.Utf8, "merchant_risk": pl.Utf8, "label": pl.Int8, "scenario": pl.Int16,
    "event_id": pl.Utf8,
}
PROFILE_SCHEMA = {"user_id": pl.Utf8, "age": pl.Int64, "gender": pl.Utf8, "region": pl.Utf8,
                  "income": pl.Float64, "persona": pl.Utf8}
SMALL = SimulateConfig(n_users=150, days=40, n_merchants=120, fraud_user_rate=0.1, seed=3)
MODEST = SimulateConfig(n_users=600, days=90, n_merchants=200, fraud_user_rate=0.1,
                        compromised_merchant_rate=0.02, seed=7)


@pytest.fixture(scope="module")
def sim():
    return simulate(MODEST)


@pytest.fixture(scope="module")
def events(sim):
    return sim.events.with_columns(hour=pl.col("timestamp").dt.hour())


@pytest.fixture(scope="module")
def genuine(events):
    return events.filter(pl.col("label") == 0)


def _fraud(events: pl.DataFrame, scenario: int) -> pl.DataFrame:
    return events.filter(pl.col("scenario") == scenario)


def test_same_seed_gives_identical_frames():
    a, b = simulate(SMALL), simulate(SMALL)
    assert a.events.equals(b.events) and a.profile.equals(b.profile) and a.merchants.equals(b.merchants)


def test_different_seed_gives_different_data():
    a = simulate(SMALL)
    b = simulate(SimulateConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert not a.events.equals(b.events)
    assert not a.profile.equals(b.profile)


def test_columns_and_dtypes(sim):
    assert dict(sim.events.schema) == EVENT_SCHEMA
    assert dict(sim.profile.schema) == PROFILE_SCHEMA
    merchants = {"merchant_id": pl.Utf8, "category": pl.Utf8, "merchant_risk": pl.Utf8,
                 "compromised": pl.Boolean, "compromised_from": pl.Datetime("us"),
                 "compromised_to": pl.Datetime("us")}
    assert merchants.items() <= dict(sim.merchants.schema).items()
    assert SCENARIOS == {0: "genuine", 1: "card_testing", 2: "amount_spike", 3: "compromised_merchant",
                         4: "account_takeover", 5: "stealth_takeover", 6: "rogue_merchant"}


def test_values_are_well_formed(sim):
    ev, prof = sim.events, sim.profile
    assert ev["user_id"].str.contains(r"^u\d{6}$").all() and ev["merchant_id"].str.contains(r"^m\d{5}$").all()
    assert set(ev["channel"].unique()) == {"chip", "contactless", "online", "swipe"}
    assert set(ev["merchant_risk"].unique()) == {"low", "medium", "high"}
    assert set(ev["category"].unique()) == set(CATEGORIES)
    assert (ev["amount"] > 0).all() and ((ev["amount"] * 100).round() - ev["amount"] * 100).abs().max() < 1e-6
    assert ev["user_id"].n_unique() > 0.95 * MODEST.n_users and prof.height == MODEST.n_users
    assert prof["age"].min() >= 18 and prof["age"].max() <= 85 and set(prof["gender"]) == {"F", "M"}
    assert prof["region"].n_unique() == 6 and prof["persona"].n_unique() == 6 and (prof["income"] > 0).all()
    assert set(ev["merchant_id"]) <= set(sim.merchants["merchant_id"])
    by_merchant = ev.select("merchant_id", "category", "merchant_risk").unique()
    assert by_merchant.height == ev["merchant_id"].n_unique()  # category and risk are static per merchant


def test_sorted_unique_ids_and_time_range(sim):
    ev = sim.events
    keys = ev.select("user_id", "timestamp")
    assert keys.equals(keys.sort("user_id", "timestamp"))
    assert ev["event_id"].n_unique() == ev.height and ev["event_id"].is_sorted()
    start = datetime.fromisoformat(MODEST.start)
    assert ev["timestamp"].min() >= start and ev["timestamp"].max() < start + timedelta(days=MODEST.days)


def test_every_scenario_present_and_labels_consistent(sim):
    ev = sim.events
    assert set(ev["scenario"].unique()) == set(SCENARIOS)
    assert (ev["label"] == (ev["scenario"] > 0).cast(pl.Int8)).all()
    users = ev.filter(pl.col("label") == 1).group_by("user_id").agg(pl.col("scenario").n_unique())
    assert (users["scenario"] == 1).all()  # one scenario per fraud user
    assert 0.05 < users.height / MODEST.n_users < 0.15


def test_default_scale_and_fraud_rate():
    ev = simulate(SimulateConfig()).events
    per_user_day = ev.height / (2_000 * 120)
    assert 2.0 < per_user_day < 3.0
    assert 0.002 < ev["label"].mean() < 0.02
    assert set(ev["scenario"].unique()) == set(SCENARIOS)


def test_card_testing_is_bursts_of_small_online_payments(events):
    gap = pl.col("timestamp").diff().over("user_id").fill_null(timedelta(days=1))
    ct = _fraud(events, 1).with_columns(burst=(gap > timedelta(minutes=30)).cum_sum())
    small = ct.filter(pl.col("amount") < 5)
    span = pl.col("timestamp").max() - pl.col("timestamp").min()
    bursts = small.group_by("burst").agg(n=pl.len(), span=span, online=(pl.col("channel") == "online").all())
    assert bursts.height >= 5 and (bursts["n"] >= 3).all() and bursts["online"].all()
    assert (bursts["span"] < timedelta(minutes=30)).all()
    assert (small["merchant_risk"] == "high").mean() > 0.5
    large = ct.filter(pl.col("amount") >= 5)
    assert large.height > 0 and (large["amount"] > 50).mean() > 0.9
    assert large.group_by("burst").len()["len"].max() == 1  # at most one large payment after a burst


def _ratio_to_user_median(rows: pl.DataFrame, genuine: pl.DataFrame) -> pl.Series:
    med = genuine.group_by("user_id", "category").agg(med=pl.col("amount").median(), n=pl.len())
    joined = rows.join(med.filter(pl.col("n") >= 3), on=["user_id", "category"])
    return joined["amount"] / joined["med"]


def test_amount_spikes_are_far_above_the_users_usual_amount(events, genuine):
    spikes = _fraud(events, 2)
    ratio = _ratio_to_user_median(spikes, genuine)
    assert ratio.len() >= 0.8 * spikes.height and ratio.len() >= 5
    assert (ratio >= 3).mean() > 0.9
    own = genuine.join(spikes.select("user_id").unique(), on="user_id", how="semi")
    assert (_ratio_to_user_median(own, genuine) >= 3).mean() < 0.05


def test_compromised_merchant_fraud_follows_a_payment_in_the_window(sim, events, genuine):
    bad = sim.merchants.filter(pl.col("compromised"))
    assert bad.height >= 1 and (bad["compromised_to"] > bad["compromised_from"]).all()
    windows = bad.select("merchant_id", "compromised_from", "compromised_to")
    exposures = genuine.join(windows, on="merchant_id") \
        .filter(pl.col("timestamp").is_between("compromised_from", "compromised_to", closed="left")) \
        .group_by("user_id").agg(first_exposure=pl.col("timestamp").min())
    cm = _fraud(events, 3)
    first_fraud = cm.group_by("user_id").agg(first_fraud=pl.col("timestamp").min())
    checked = first_fraud.join(exposures, on="user_id", how="left")
    assert checked.height >= 3 and checked["first_exposure"].is_not_null().all()
    assert (checked["first_fraud"] - checked["first_exposure"] >= timedelta(days=1)).all()
    assert set(cm["merchant_id"]).isdisjoint(bad["merchant_id"])  # the skimming payment itself is genuine
    assert (cm["hour"] < 6).mean() > 0.4 and _ratio_to_user_median(cm, genuine).median() > 1.5


def test_account_takeover_changes_the_routine(sim, events, genuine):
    ato = _fraud(events, 4)
    window = ato.group_by("user_id").agg(t0=pl.col("timestamp").min(), t1=pl.col("timestamp").max())
    before = genuine.join(window, on="user_id").filter(pl.col("timestamp") < pl.col("t0"))
    during = genuine.join(window, on="user_id").filter(pl.col("timestamp").is_between("t0", "t1"))
    assert window.height >= 5 and during.height == 0  # the user's own routine is replaced
    known = before.select("user_id", "merchant_id").unique().with_columns(known=pl.lit(True))
    seen = ato.join(known, on=["user_id", "merchant_id"], how="left")["known"].fill_null(False)
    assert seen.mean() < 0.2
    assert set(ato["category"].unique()) <= {"electronics", "online_retail", "cash_withdrawal", "travel"}
    assert (ato["hour"] < 6).mean() > 0.5 and (before["hour"] < 6).mean() < 0.15
    region = ato.join(sim.merchants.select("merchant_id", merchant_region="region"), on="merchant_id") \
        .join(sim.profile.select("user_id", "region"), on="user_id")
    assert (region["merchant_region"] != region["region"]).mean() > 0.7


def _own_percentiles(fraud: pl.DataFrame, history: pl.DataFrame, by: list[str]) -> np.ndarray:
    """Mid-rank percentile of each fraud amount among the victim's own earlier amounts (of the same `by`)."""
    own = history.group_by(by).agg(past=pl.col("amount"))
    rows = fraud.join(own, on=by)
    return np.array([(np.sum(np.array(p) < a) + 0.5 * np.sum(np.array(p) == a)) / len(p)
                     for a, p in zip(rows["amount"], rows["past"])])


def test_stealth_takeover_looks_ordinary_to_everyone_but_the_victim(events, genuine):
    st = _fraud(events, 5)
    history = victims_history(genuine, st)
    assert st["user_id"].n_unique() >= 5 and st.height >= 30
    # amounts: the victim's own level for the category, spread like their own payments there (not their top)
    pct = _own_percentiles(st, history, ["user_id", "category"])
    assert len(pct) > 0.8 * st.height and 0.35 < pct.mean() < 0.65 and (pct > 0.95).mean() < 0.2
    # counts: the victim's own events of the window are replaced one for one, so a day holds no more than usual
    window = st.group_by("user_id").agg(t0=pl.col("timestamp").min(), t1=pl.col("timestamp").max())
    during = genuine.join(window, on="user_id").filter(pl.col("timestamp").is_between("t0", "t1"))
    assert during.height == 0
    per_day = st.group_by("user_id", pl.col("timestamp").dt.date()).len()["len"]
    usual = genuine.join(window, on="user_id", how="semi").group_by("user_id", pl.col("timestamp").dt.date()).len()
    assert per_day.max() <= usual["len"].max()
    # what, when and how are as common in the population as genuine payments' (no night, no rare category),
    for col in ("hour", "category", "channel"):
        assert population_share(st, genuine, col) == pytest.approx(population_share(genuine, genuine, col),
                                                                    rel=0.2), col
    # but rarer for the victim than their own payments are, and at merchants new to them
    for col, factor in (("category", 0.8), ("hour", 0.85), ("channel", 0.8)):
        assert own_share(st, history, col) < factor * own_share(history, history, col), col
    known_shop = history.select("user_id", "merchant_id").unique().with_columns(known=pl.lit(True))
    assert st.join(known_shop, on=["user_id", "merchant_id"], how="left")["known"].is_null().mean() > 0.9


def test_rogue_merchant_charges_its_new_customers_their_usual_amounts(events, genuine):
    rm = _fraud(events, 6)
    assert rm["merchant_id"].n_unique() >= 1 and rm["user_id"].n_unique() >= 5
    assert set(rm["category"]) <= {"online_retail", "entertainment"}
    # the victims never paid at the merchant, before or after
    paid = genuine.select("user_id", "merchant_id").unique().with_columns(paid=pl.lit(True))
    assert rm.join(paid, on=["user_id", "merchant_id"], how="left")["paid"].is_null().all()
    # each charge copies an earlier payment of the victim in the merchant's category: amount, hour, channel
    history = victims_history(genuine, rm)
    own = history.group_by("user_id", "category").agg(amounts=pl.col("amount"), hours=pl.col("hour"),
                                                      channels=pl.col("channel"))
    joined = rm.join(own, on=["user_id", "category"])
    assert joined.height == rm.height
    assert all(a in set(x) for a, x in zip(joined["amount"], joined["amounts"]))
    assert all(h in set(x) for h, x in zip(joined["hour"], joined["hours"]))
    assert all(c in set(x) for c, x in zip(joined["channel"], joined["channels"]))
    pct = _own_percentiles(rm, history, ["user_id", "category"])
    assert 0.25 < pct.mean() < 0.75
    # counts: 1-3 charges a victim, within a few days per merchant
    per_victim = rm.group_by("user_id").len()["len"]
    assert per_victim.min() >= 1 and per_victim.max() <= 3
    spans = rm.group_by("merchant_id").agg(span=pl.col("timestamp").max() - pl.col("timestamp").min())
    assert (spans["span"] < timedelta(days=8)).all()


def test_users_shop_at_their_favourite_local_merchants(sim, genuine):
    local = genuine.join(sim.merchants.select("merchant_id", merchant_region="region"), on="merchant_id") \
        .join(sim.profile.select("user_id", "region"), on="user_id")
    assert (local["merchant_region"] == local["region"]).mean() > 0.85
    counts = genuine.group_by("user_id", "category", "merchant_id").len()
    top = counts.sort("len", descending=True).group_by("user_id", "category").agg(pl.col("len").head(3).sum())
    assert top["len"].sum() / genuine.height > 0.85


def _category_histograms(genuine: pl.DataFrame, profile: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    wide = genuine.group_by("user_id", "category").len().pivot(on="category", index="user_id", values="len") \
        .fill_null(0).join(profile.select("user_id", "persona"), on="user_id").sort("user_id")
    hist = wide.select(CATEGORIES).to_numpy().astype(float)
    return hist / np.linalg.norm(hist, axis=1, keepdims=True), wide["persona"].to_numpy()


def test_same_persona_users_have_similar_category_mix(sim, genuine):
    hist, persona = _category_histograms(genuine, sim.profile)
    sim_matrix = hist @ hist.T
    same = persona[:, None] == persona[None, :]
    off_diagonal = ~np.eye(len(persona), dtype=bool)
    within, between = sim_matrix[same & off_diagonal].mean(), sim_matrix[~same].mean()
    assert within > between + 0.05


def test_persona_follows_demographics_only_partly(sim):
    prof = sim.profile.with_columns(
        age_band=pl.col("age").cut([30, 60]), income_band=pl.col("income").qcut(3))
    majority = prof.group_by("age_band", "income_band", "persona").len() \
        .group_by("age_band", "income_band").agg(pl.col("len").max())
    accuracy = majority["len"].sum() / prof.height
    assert 0.3 < accuracy < 0.9
    ages = prof.group_by("persona").agg(pl.col("age").mean()).sort("persona")
    age = dict(zip(ages["persona"], ages["age"]))
    assert age["retiree"] > age["student"] + 20


def _modal_share(rows: pl.DataFrame, key: pl.Expr) -> float:
    per_user = rows.with_columns(key=key).group_by("user_id", "key").len() \
        .group_by("user_id").agg(top=pl.col("len").max(), n=pl.col("len").sum()).filter(pl.col("n") >= 3)
    return float((per_user["top"] / per_user["n"]).mean())


def test_monthly_and_weekly_periodicity(genuine):
    utilities = genuine.filter(pl.col("category") == "utilities")
    assert _modal_share(utilities, pl.col("timestamp").dt.day()) > 0.85
    grocery = genuine.filter(pl.col("category") == "grocery")
    assert _modal_share(grocery, pl.col("timestamp").dt.weekday()) > 0.45
    shopping = genuine.filter(pl.col("category") == "online_retail")
    assert _modal_share(shopping, pl.col("timestamp").dt.weekday()) < 0.4  # no weekly routine there
    commute = genuine.filter((pl.col("category") == "transport") & (pl.col("hour") < 12)) \
        .with_columns(h=pl.col("hour") + pl.col("timestamp").dt.minute() / 60)
    per_user = commute.group_by("user_id").agg(pl.col("h").std())
    assert per_user["h"].median() < 0.7 * commute["h"].std()  # a personal commute hour


def test_no_fraud_when_the_rate_is_zero():
    ev = simulate(SimulateConfig(n_users=50, days=20, fraud_user_rate=0.0, seed=1)).events
    assert ev.height > 0 and (ev["label"] == 0).all()


def test_tiny_world_works():
    sim = simulate(SimulateConfig(n_users=1, days=1, n_merchants=12))
    assert sim.profile.height == 1 and dict(sim.events.schema) == EVENT_SCHEMA


@pytest.mark.parametrize("change", [{"n_merchants": 5}, {"days": 0}, {"start": "not a date"},
                                    {"fraud_user_rate": 1.5}])
def test_bad_config_raises(change):
    with pytest.raises(ConfigError):
        simulate(SimulateConfig(**{**SimulateConfig().__dict__, **change}))
