"""The scoring service: offline/online parity, background refresh, cold start, bad requests, the HTTP
surface. Durability under kill -9 is in test_durability.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pantherseq.serve.app import create_app
from pantherseq.serve.auth import SCOPES, ApiKeys, hash_token
from pantherseq.serve.scorer import Scorer
from pantherseq.serve.service import Service
from pantherseq.serve.state import UserState
from pantherseq.store import open_store
from stolen_routine import PERIODS

FIELDS = ("merchant_id", "amount", "category", "channel")


def _service(served, tmp_path, refresh: bool = True, fraud_dir=None, feature_set: str = "hybrid",
             meta: dict | None = None) -> Service:
    """A service over a private copy of the embedded store (tests must not see each other's events); `meta`
    replaces keys of the copied `embed` meta record."""
    src = served["url"].removeprefix("sqlite:///")
    tmp_path.mkdir(parents=True, exist_ok=True)
    dst = tmp_path / "states.db"
    with open_store(served["url"]) as s, open_store(f"sqlite:///{dst}") as d:
        users = [u for u in pl.read_parquet(served["run"] / "users.parquet")["user_id"].to_list()]
        d.put_many({u: b for u, b in zip(users, s.get_many(users)) if b is not None})
        d.put_meta("embed", json.dumps({**json.loads(s.get_meta("embed")), **(meta or {})}).encode())
    assert src != str(dst)
    om = Scorer(served["run"], "panther", fraud_dir or served["fraud_dir"], feature_set=feature_set)
    service = Service(om, open_store(f"sqlite:///{dst}"), refresh=refresh)
    service.start()
    return service


def _tx(row: dict) -> dict:
    return {"user_id": str(row["user_id"]), "timestamp": row["timestamp"].isoformat(),
            **{f: row[f] for f in FIELDS}}


@pytest.fixture
def service(served, tmp_path):
    s = _service(served, tmp_path)
    yield s
    s.stop()
    s.store.close()


def test_online_scores_equal_offline_scores(served, tmp_path):
    """Replay the first two test days in time order; after each event refresh the user's state (as the
    worker does), and compare every score with `pantherseq fraud`'s offline score of the same event."""
    service = _service(served, tmp_path, refresh=False)
    events = pl.read_parquet(served["run"] / "events.parquet")
    start = datetime.fromisoformat(PERIODS["test_start"])
    day2 = events.filter((pl.col("timestamp") >= start) & (pl.col("timestamp") < start + timedelta(days=2)))
    offline = pl.read_parquet(served["fraud_dir"] / "scores.parquet").select("event_id", "score_hybrid")
    got, deviation = [], {}
    for row in day2.iter_rows(named=True):
        out = service.score(_tx(row))
        service.refresh_users([str(row["user_id"])])
        got.append((row["event_id"], out["score"], out["cold_start"], out["stale"]))
        deviation[row["event_id"]] = out["deviation"]
    online = pl.DataFrame(got, schema=["event_id", "online", "cold", "stale"], orient="row")
    both = online.join(offline, on="event_id")
    assert both.height == day2.height > 500
    assert not both["cold"].any() and not both["stale"].any()
    diff = (both["online"] - both["score_hybrid"]).abs().to_numpy()
    # Every score within 1e-6, on any CPU. The offline pass (64 windows padded to one length) and the service
    # (one user) run the same functions on differently shaped tensors, whose kernels sum in other orders;
    # the hand-made features are integer sums (exact) and the model's states and Δ are computed in float64
    # and rounded to float32 once, so the risk model's inputs agree bit for bit unless a float64 value falls
    # within ~1e-16 of a float32 rounding boundary (~1e-9 per value). 1e-6 only absorbs LightGBM's own
    # float64 sum of the trees' outputs.
    assert (diff < 1e-6).all(), np.sort(diff)[-10:]
    # and every deviation feature is the same float32 (None = NaN): the field heads', the copy head's, the
    # seen counts and the short-window means over the events scored before (kept in the state)
    feats = pl.read_parquet(served["fraud_dir"] / "features.parquet").filter(pl.col("event_id").is_in(list(deviation)))
    names = [c for c in feats.columns if c.startswith("d_")]
    assert {"d_mean20_surprisal", "d_copy_mass", "d_seen_merchant_id", "d_head_rank_amount"} <= set(names)
    for row in feats.select("event_id", *names).iter_rows(named=True):
        online = deviation[row["event_id"]]
        for n in names:
            want, have = row[n], online[n.removeprefix("d_")]
            assert (want is None or np.isnan(want)) == (have is None) and (have is None or have == want), n
    service.stop()


def test_a_state_stored_without_its_prediction_scores_the_same(served, service):
    """A state written before schema 3 carries no compact prediction (`pred`): the scorer makes it from h on
    the request path (one V × D product, then cached) and every Δ equals the one read from a stored `pred`."""
    row = next(pl.read_parquet(served["run"] / "events.parquet")
               .filter(pl.col("timestamp") >= datetime.fromisoformat(PERIODS["test_start"])).iter_rows(named=True))
    user, scorer = str(row["user_id"]), service.scorer
    state = service.current_state(user)[0]
    assert state.pred.size == scorer.vocab.widths.total  # `embed` stored it
    ev = scorer.parse(user, row["timestamp"].isoformat(), {f: row[f] for f in FIELDS}, state.last_time)
    stored = scorer.deviation(ev, state)
    old = UserState(**{**state.__dict__, "pred": np.zeros(0)})
    assert scorer.cache.get(user, (old.refreshed_at, old.n_events, old.log_seq)) is None
    again = scorer.deviation(ev, old)
    assert scorer.cache.bytes > 0  # the fallback's prediction is cached
    assert all(again[k] == v or (math.isnan(again[k]) and math.isnan(v)) for k, v in stored.items())
    assert not math.isnan(stored["d_rank"]) and stored["d_rank"] <= 1025


def test_start_up_reads_states_to_warm_only_for_an_embed_without_stored_predictions(served, tmp_path, monkeypatch):
    """A schema-3 embed stores each state's prediction: start-up reads no state to warm the fallback cache
    (for 38M users it would read them all). A store embedded before (meta without `state_schema`) is warmed."""
    warmed = []
    real = Scorer.warm
    monkeypatch.setattr(Scorer, "warm", lambda self, states, *a, **k: warmed.append(len(states)) or real(self, states))
    new = _service(served, tmp_path / "new", refresh=False)
    assert json.loads(new.store.get_meta("embed"))["state_schema"] == 3 and warmed == []
    new.stop()
    old = _service(served, tmp_path / "old", refresh=False, meta={"state_schema": 2})
    assert sum(warmed) > 0  # every user's state read (they all hold `pred`, so nothing needed caching)
    old.stop()


def test_online_robust_z_scores_equal_offline_scores(served, tmp_path):
    """The `baseline+robust_z` risk model served: the robust amount deviation from the state's last 30 days
    of amounts gives the offline scores (its features are exact, so the scores agree to LightGBM's own sum)."""
    service = _service(served, tmp_path, refresh=False, feature_set="baseline+robust_z")
    assert {"rz_z", "rz_ratio", "rz_median", "rz_n"} <= set(service.scorer.risk.features)
    events = pl.read_parquet(served["run"] / "events.parquet")
    start = datetime.fromisoformat(PERIODS["test_start"])
    day = events.filter((pl.col("timestamp") >= start) & (pl.col("timestamp") < start + timedelta(days=1)))
    offline = pl.read_parquet(served["fraud_dir"] / "scores.parquet").select("event_id", "score_baseline+robust_z")
    got = []
    for row in day.iter_rows(named=True):
        got.append((row["event_id"], service.score(_tx(row))["score"]))
        service.refresh_users([str(row["user_id"])])
    both = pl.DataFrame(got, schema=["event_id", "online"], orient="row").join(offline, on="event_id")
    assert both.height == day.height > 200
    assert ((both["online"] - both["score_baseline+robust_z"]).abs() < 1e-6).all()
    service.stop()


@pytest.mark.slow
def test_a_dcn_risk_model_from_the_cli_is_served(served, tmp_path):
    """`pantherseq fraud --set risk_model=dcn` then the service (the code `pantherseq serve` runs) scores with
    that DCN: the first test events replayed in time order get the offline DCN scores. The tolerance is
    1e-5, not bit-equality: the DCN's float32 forward over 65,536 rows and over one row may sum in other
    orders (its inputs are the same float32 features, checked bit for bit by the LightGBM test above)."""
    out = tmp_path / "fraud-dcn"
    sets = {**PERIODS, "test_end": "2024-02-27", "context": 47, "embedding_dims": 4, "feature_sets": '["hybrid"]',
            "risk_model": "dcn", "out_dir": str(out), "dcn.max_epochs": 3, "dcn.hidden": "[32, 16]"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v!r}" if isinstance(v, str) and "[" not in v
                                                         else f"{k}={v}")]
    done = subprocess.run([sys.executable, "-m", "pantherseq.cli", "fraud", "--run", str(served["run"]), "--model",
                           "panther", *args], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "risk_model_hybrid.pt").is_file()
    service = _service(served, tmp_path / "svc", refresh=False, fraud_dir=out)
    assert service.scorer.risk.kind == "dcn"
    events = pl.read_parquet(served["run"] / "events.parquet")
    start = datetime.fromisoformat(PERIODS["test_start"])
    first = events.filter(pl.col("timestamp") >= start).sort("timestamp", maintain_order=True).head(60)
    offline = dict(pl.read_parquet(out / "scores.parquet").select("event_id", "score_hybrid").iter_rows())
    for row in first.iter_rows(named=True):
        got = service.score(_tx(row))["score"]
        service.refresh_users([str(row["user_id"])])
        assert got == pytest.approx(offline[row["event_id"]], abs=1e-5), row["event_id"]
    service.stop()


def test_without_refresh_the_state_is_stale_and_the_scores_differ(served, tmp_path):
    """The parity above depends on the refresh: the same events scored against a never-refreshed
    prediction are flagged stale and get other deviation features (so the parity check can fail)."""
    events = pl.read_parquet(served["run"] / "events.parquet")
    start = datetime.fromisoformat(PERIODS["test_start"])
    user = events.filter(pl.col("timestamp") >= start)["user_id"][0]
    rows = list(events.filter((pl.col("user_id") == user) & (pl.col("timestamp") >= start)).head(4)
                .iter_rows(named=True))
    stale_svc = _service(served, tmp_path / "a", refresh=False)
    fresh_svc = _service(served, tmp_path / "b", refresh=False)
    stale, fresh = [], []
    for r in rows:
        stale.append(stale_svc.score(_tx(r)))
        fresh.append(fresh_svc.score(_tx(r)))
        fresh_svc.refresh_users([str(user)])
    assert [o["stale"] for o in stale] == [False, True, True, True]
    assert [o["stale"] for o in fresh] == [False] * 4 and [o["event_seq"] for o in stale] == [1, 2, 3, 4]
    assert stale[0]["deviation"] == fresh[0]["deviation"]
    assert any(s["deviation"]["surprisal"] != f["deviation"]["surprisal"] for s, f in zip(stale[1:], fresh[1:]))
    stale_svc.stop()
    fresh_svc.stop()


def test_background_refresh_folds_the_event_in(service):
    user = next(iter(service.scorer.user_index))
    before, cold, _ = service.current_state(user)
    assert not cold and before.has_prediction
    t = datetime.fromtimestamp(before.last_time) + timedelta(hours=1)
    out = service.score({"user_id": user, "timestamp": t.isoformat(), "merchant_id": "m1", "amount": 12.5,
                         "category": "grocery", "channel": "pos"})
    assert out["event_seq"] == 1 and not out["cold_start"]
    assert service.refresher.wait_idle(30)
    after = UserState.decode(service.store.get_many([user])[0])
    assert after.log_seq == 1 and after.n_events == before.n_events + 1
    assert after.last_time == int(t.timestamp())
    assert not np.allclose(after.h, before.h)
    assert service.stats()["refreshed"] >= 1


def test_the_state_keeps_each_scored_events_window_deltas(service):
    """The event log carries each event's short-window Δ as scored; folding it puts them in recent_delta,
    which the next event's window means read."""
    user = next(iter(service.scorer.user_index))
    before, _, _ = service.current_state(user)
    assert before.recent_delta.shape == (19, len(service.scorer.vocab.window_base))  # embed filled them
    t = datetime.fromtimestamp(before.last_time) + timedelta(hours=1)
    out = service.score({"user_id": user, "timestamp": t.isoformat(), "merchant_id": "m1", "amount": 12.5,
                         "category": "grocery", "channel": "pos"})
    assert service.refresher.wait_idle(30)
    after = UserState.decode(service.store.get_many([user])[0])
    base = service.scorer.vocab.window_base
    want = [out["deviation"][n] for n in base]
    assert [None if np.isnan(x) else float(x) for x in after.recent_delta[-1]] == want
    assert np.array_equal(after.recent_delta[:-1], before.recent_delta[1:], equal_nan=True)


def test_unknown_user_is_a_cold_start_then_gets_state(service):
    tx = {"user_id": "never-seen", "timestamp": "2024-03-01T10:00:00", "merchant_id": "nope", "amount": 3.0,
          "category": "unheard-of", "channel": "pos"}
    out = service.score(tx)
    assert out["cold_start"] and math.isfinite(out["score"])
    assert out["deviation"]["surprisal"] is None  # no history: no Δ, as a user's first event offline
    known = service.score({**tx, "user_id": next(iter(service.scorer.user_index))})
    assert list(out["deviation"]) == list(known["deviation"])  # the same Δ names, all missing
    assert service.refresher.wait_idle(30)
    out2 = service.score({**tx, "timestamp": "2024-03-01T11:00:00"})
    assert not out2["cold_start"] and out2["deviation"]["is_unk"] == 1.0


TOKEN = "test-token-with-every-scope"
KEYS = ApiKeys.parse({"keys": {"tests": {"sha256": hash_token(TOKEN), "scopes": list(SCOPES)}}}, "tests")


@pytest.fixture
def client(service):
    return TestClient(create_app(service, KEYS), raise_server_exceptions=False,
                      headers={"authorization": f"Bearer {TOKEN}"})


def test_http_endpoints(client, service):
    user = next(iter(service.scorer.user_index))
    body = {"user_id": user, "timestamp": "2024-03-20 09:30:00", "merchant_id": "m1", "amount": 20.0,
            "category": "grocery", "channel": "pos"}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    js = r.json()
    assert {"score", "deviation", "top_expected", "model_version", "latency_ms"} <= set(js)
    assert js["top_expected"] and "merchant_id=" in js["top_expected"][0]["behaviour"]
    r = client.post("/score/batch", json={"transactions": [body, {**body, "amount": 30.0}]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert [x["event_seq"] for x in r.json()["results"]] == [2, 3]
    st_ = client.get(f"/users/{user}/state").json()
    assert st_["user_id"] == user and st_["n_events"] >= 1
    assert client.get("/users/nobody/state").status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert "pantherseq_score_seconds_count" in metrics and "pantherseq_refresh_lag_seconds" in metrics
    assert "/score" in client.get("/openapi.json").json()["paths"]
    # /feedback marks the answered event as fraud at its merchant: the delayed terminal risk of a later
    # event at that merchant (8 days on, past the 7-day label delay) now counts it
    later = int(datetime.fromisoformat(body["timestamp"]).timestamp()) + 8 * 86_400
    before = service.terminal_features("m1", later)
    assert client.post("/feedback", json={"user_id": user, "event_seq": 1, "label": 1}).json() == {"ok": True}
    after = service.terminal_features("m1", later)
    assert after["term_frauds_7d"] == before["term_frauds_7d"] + 1 and after["term_n_7d"] == before["term_n_7d"]
    assert client.post("/feedback", json={"user_id": user, "event_seq": 99, "label": 1}).status_code == 404


@pytest.mark.parametrize("patch, field", [
    ({"amount": None}, "amount"), ({"amount": "lots"}, "amount"), ({"amount": -1.0}, "amount"),
    ({"timestamp": "yesterday"}, "timestamp"), ({"timestamp": "3024-01-01T00:00:00"}, "timestamp"),
    ({"timestamp": -5}, "timestamp"), ({"extra": 1}, "extra"), ({"user_id": ""}, "user_id"),
])
def test_bad_requests_are_422_naming_the_field(client, patch, field):
    body = {"user_id": "u", "timestamp": "2024-03-20 09:30:00", "merchant_id": "m1", "amount": 20.0,
            "category": "grocery", "channel": "pos"}
    r = client.post("/score", json={k: v for k, v in {**body, **patch}.items()})
    assert r.status_code == 422, r.text
    assert any(e["field"] == field for e in r.json()["detail"]), r.json()


def test_missing_field_is_422(client):
    r = client.post("/score", json={"user_id": "u", "timestamp": "2024-03-20 09:30:00"})
    assert r.status_code == 422 and {e["field"] for e in r.json()["detail"]} >= {"amount", "merchant_id"}


VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=30), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                            st.integers(), max_size=2))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional={k: VALUES for k in ("user_id", "timestamp", *FIELDS, "x")}))
def test_fuzzed_requests_never_500(client, body):
    """Arbitrary JSON bodies (every key optional, any JSON type, NaN / Infinity literals included) get a
    score or a 422, never a 500."""
    r = client.post("/score", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 422), (body, r.text)
    if r.status_code == 422:
        assert all(e["field"] for e in r.json()["detail"])
