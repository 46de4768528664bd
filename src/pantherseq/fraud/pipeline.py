"""The `fraud` stage (SPEC §7): features for every labelled transaction of two time periods, the risk model
trained on the first, scored and measured on the second, merchant risk, all written to RUN_DIR/fraud/.

    run_fraud(run_dir, model_name, cfg) -> dict       (the contents of fraud.json)

Protocol (docs/FRAUD.md). Time order everywhere. The generative model trained on the run's training split
(before `split.t1`); the risk model trains on [train_start, train_end), which must not start before t1
(`allow_in_sample = true` overrides, for experiments only), so its Δ are out-of-sample exactly like the
test period's; then a gap of `gap_days` (the label delay: the labels of the last training days are not
known yet when the test starts), then the test period [test_start, test_end). The terminal features use
only labels at least `delay_days` old, the customer features only the transaction itself and earlier ones,
Δ and the user state only strictly earlier events (features.py, behaviour.py).

Writes RUN_DIR/fraud/: fraud.json (metrics per feature set, merchant-risk AUC, periods, timings),
risk_model_<set>.json + .txt / .pt (the risk model of each feature set: fraud/risk.py), scores.parquet
(every test-period transaction with a score per feature set), merchant_risk.parquet, importances.parquet and, with
`save_features`, features.parquet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from pantherseq.data.dataset import RunData
from pantherseq.data.schema import EVENT_ID, LABEL, SCENARIO, TIME, USER
from pantherseq.errors import ConfigError, DataError
from pantherseq.fraud.behaviour import BehaviourFeatures, behaviour_features
from pantherseq.fraud.config import MERCHANT_FIELDS, FraudConfig, load_fraud_config, resolve_periods
from pantherseq.fraud.features import auto_categorical, baseline_features, robust_features
from pantherseq.fraud.hybrid import GROUPS
from pantherseq.fraud.merchant import flagged_precision, merchant_auc, merchant_risk
from pantherseq.fraud.metrics import TABLE_COLUMNS, fraud_metrics, scenario_ids
from pantherseq.fraud.risk import risk_model_kind
from pantherseq.model.base import NeuralModel
from pantherseq.run import RunDir
from pantherseq.train.checkpoint import load_model

log = logging.getLogger(__name__)
EMBEDDINGS = ("pool", "rec")  # column prefixes: the pooled history state and the recent (causal) state
# the scenario whose frauds happen AT the compromised merchant, per source (merchant-risk ground truth):
# the handbook's compromised terminals, the simulator's rogue merchants
COMPROMISED_SCENARIO = {"handbook": 2, "simulated": 6}


def _fit_pca(X: np.ndarray, k: int, max_rows: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(X).all(1)
    rows = np.flatnonzero(ok)
    if len(rows) > max_rows:
        rows = np.random.default_rng(seed).choice(rows, max_rows, replace=False)
    mean = X[rows].mean(0)
    _, _, vt = np.linalg.svd(X[rows] - mean, full_matrices=False)
    return mean, vt[:k]


def _embedding_columns(bf: BehaviourFeatures, rows: np.ndarray, train_rows: np.ndarray, k: int
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The pooled and the recent state of the events `rows` (NaN without history), projected on their first k
    principal components (fit on train_rows; k = 0: dropped, k < 0: all D kept), and the projections {`<name>_mean`, `<name>_comps`} (the service applies the same ones)."""
    pos = np.searchsorted(bf.index, rows).clip(0, max(len(bf.index) - 1, 0))
    has = (bf.index[pos] == rows) if len(bf.index) else np.zeros(len(rows), bool)
    out: dict[str, np.ndarray] = {}
    pca: dict[str, np.ndarray] = {}
    for name, mat in zip(EMBEDDINGS, (bf.pooled, bf.recent)):
        X = np.full((len(rows), mat.shape[1]), np.nan, dtype=np.float32)
        X[has] = mat[pos[has]]
        if k == 0:  # dropped: no column (the service projects onto no component either)
            mean, comps = np.zeros(mat.shape[1]), np.zeros((0, mat.shape[1]))
        elif 0 < k < mat.shape[1]:
            mean, comps = _fit_pca(X[np.isin(rows, train_rows)], k)
        else:  # identity (k < 0 or k >= D): every dimension kept
            mean, comps = np.zeros(mat.shape[1]), np.eye(mat.shape[1])
        X = project(X, mean, comps)
        pca[f"{name}_mean"], pca[f"{name}_comps"] = mean.astype(np.float32), comps.astype(np.float32)
        out.update({f"{name}_{i}": X[:, i] for i in range(X.shape[1])})
    return out, pca


def project(X: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, k) float32: the PCA projection offline and online share (NaN rows stay NaN). Computed
    in float64 and rounded once, so one row alone and the same row among many give the same float32."""
    X64 = np.asarray(X, dtype=np.float32).astype(np.float64)
    mean64 = np.asarray(mean, dtype=np.float32).astype(np.float64)
    comps64 = np.asarray(comps, dtype=np.float32).astype(np.float64)
    return ((X64 - mean64) @ comps64.T).astype(np.float32)


def _delta_columns(bf: BehaviourFeatures, rows: np.ndarray) -> dict[str, np.ndarray]:
    pos = np.searchsorted(bf.index, rows).clip(0, max(len(bf.index) - 1, 0))
    has = (bf.index[pos] == rows) if len(bf.index) else np.zeros(len(rows), bool)
    out = {}
    for name, v in bf.delta.items():
        col = np.full(len(rows), np.nan, dtype=np.float32)
        col[has] = v[pos[has]]
        out[f"d_{name}"] = col
    return out


def _merge(a: BehaviourFeatures, b: BehaviourFeatures) -> BehaviourFeatures:
    """One table sorted by event index (the periods interleave: events are user-major)."""
    index = np.concatenate([a.index, b.index])
    order = np.argsort(index, kind="stable")

    def col(f: BehaviourFeatures, k: str) -> np.ndarray:  # a period without events has no columns
        return f.delta.get(k, np.full(len(f.index), np.nan, dtype=np.float32))

    delta = {k: np.concatenate([col(a, k), col(b, k)])[order] for k in dict.fromkeys([*a.delta, *b.delta])}
    return BehaviourFeatures(index[order], delta, np.concatenate([a.pooled, b.pooled])[order],
                             np.concatenate([a.recent, b.recent])[order])


def _check_inputs(run: RunDir, events: pl.DataFrame, cfg: FraudConfig) -> str | None:
    if LABEL not in events.columns or not (events[LABEL] == 1).any():
        raise DataError(f"{run.events} has no fraud labels (column {LABEL!r} with some 1): "
                        "the fraud stage needs labelled transactions")
    if cfg.amount_field not in events.columns:
        raise ConfigError(f"no amount field {cfg.amount_field!r} in the run; columns: {', '.join(events.columns)}")
    if cfg.merchant_field is not None:
        if cfg.merchant_field not in events.columns:
            raise ConfigError(f"no merchant field {cfg.merchant_field!r}; columns: {', '.join(events.columns)}")
        return cfg.merchant_field
    return next((f for f in MERCHANT_FIELDS if f in events.columns), None)


def _open(run: RunDir, model_name: str, cfg: FraudConfig):
    events = run.require().read_events()
    merchant = _check_inputs(run, events, cfg)
    model, ckpt = load_model(run, model_name)
    if not isinstance(model, NeuralModel):
        raise ConfigError(f"model {model_name!r} ({ckpt['model_name']}) is a count model: the fraud stage "
                          "needs a neural generative model (panther, transformer, sasrec, hstu)")
    data = RunData(run)
    if data.seq.n_events != events.height:
        raise DataError(f"{run}: sequences and events.parquet disagree ({data.seq.n_events} vs {events.height})")
    return events, merchant, model, data


def _categorical(data: RunData, cfg: FraudConfig, merchant: str | None) -> dict[str, np.ndarray]:
    """Context fields -> their tokenizer codes (fitted on the training split; 0 = unseen there)."""
    kinds = {f.name: f.kind for f in data.cfg.fields}
    names = data.tokenizer.field_names
    if cfg.categorical is not None:
        bad = [c for c in cfg.categorical if kinds.get(c) != "categorical"]
        if bad:
            raise ConfigError(f"categorical: {bad} are not categorical fields of the run "
                              f"({', '.join(n for n, k in kinds.items() if k == 'categorical')})")
        chosen = list(cfg.categorical)
    else:
        cands = [n for n in names if kinds.get(n) == "categorical" and n != merchant]
        sizes = [data.tokenizer.field_sizes[names.index(n)] for n in cands]
        chosen = auto_categorical(cands, sizes)
    codes = np.asarray(data.seq.codes)
    return {n: codes[:, names.index(n)].astype(np.int32) for n in chosen}


def build_features(run: RunDir, model_name: str, cfg: FraudConfig) -> tuple[pl.DataFrame, dict, dict]:
    """One row per transaction of the two periods: keys, `period`, every feature; the feature groups."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    events, merchant, model, data = _open(run, model_name, cfg)
    periods = resolve_periods(cfg, data.cfg.split, events[TIME].min(), events[TIME].max())
    categorical = _categorical(data, cfg, merchant)
    base = baseline_features(events, cfg.amount_field, merchant, categorical, tuple(cfg.windows), cfg.delay_days)
    robust = robust_features(events, cfg.amount_field, cfg.robust_days)
    timings["baseline_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ts = events[TIME]
    masks = {name: ((ts >= a) & (ts < b)).to_numpy() for name, (a, b) in
             (("train", periods.train), ("test", periods.test))}
    if any(g in ("embedding", "deviation") for s in cfg.feature_sets for g in GROUPS[s]):
        bf = _merge(*[behaviour_features(model, data, m, cfg.context, cfg.batch_windows, cfg.pos_chunk)
                      for m in masks.values()])
    else:  # only the baseline was asked for: no model pass
        bf = BehaviourFeatures(np.zeros(0, np.int64), {}, np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32))
    timings["behaviour_s"] = time.perf_counter() - t0

    rows = np.flatnonzero(masks["train"] | masks["test"])
    train_rows = np.flatnonzero(masks["train"])
    delta = _delta_columns(bf, rows)
    emb, pca = _embedding_columns(bf, rows, train_rows, cfg.embedding_dims)
    keys = [c for c in (EVENT_ID, USER, TIME, LABEL, SCENARIO, merchant) if c and c in events.columns]
    frame = pl.concat([
        events.select(keys)[rows].with_columns(
            pl.Series("period", np.where(masks["train"][rows], "train", "test"))),
        base[rows], robust[rows], pl.DataFrame(delta), pl.DataFrame(emb),
    ], how="horizontal", strict=True)
    groups = {"baseline": base.columns, "robust": robust.columns, "deviation": list(delta), "embedding": list(emb)}
    meta = {"periods": periods, "merchant": merchant, "categorical": [f"ctx_{c}" for c in categorical],
            "timings": timings, "pca": pca}
    return frame, groups, meta


def _compromised(frame: pl.DataFrame, merchant: str, scenario: int | None) -> set | None:
    if scenario is None or SCENARIO not in frame.columns:
        return None
    return set(frame.filter(pl.col(SCENARIO) == scenario)[merchant].unique().to_list())


def _merchant_section(test: pl.DataFrame, merchant: str | None, cfg: FraudConfig, dataset_source: str
                      ) -> tuple[pl.DataFrame | None, dict]:
    if merchant is None:
        return None, {"note": "no merchant field"}
    name = cfg.merchant_delta
    if name == "auto":  # −log P_u(m): the token's marginal if the merchant is a token field, else its head's
        name = next((n for n in (f"surprisal_{merchant}", f"head_surprisal_{merchant}") if f"d_{n}" in test.columns),
                    "surprisal")
    column = name if name in test.columns else f"d_{name}"
    if column not in test.columns:
        if not any(c.startswith("d_") for c in test.columns):
            return None, {"note": "no deviation features (baseline only)"}
        raise ConfigError(f"merchant_delta {cfg.merchant_delta!r} is not a feature or score column")
    table = merchant_risk(test, merchant, column, cfg.merchant_quantile, cfg.merchant_min_users)
    scenario = cfg.compromised_scenario
    if scenario is None:
        scenario = COMPROMISED_SCENARIO.get(dataset_source)
    truth = _compromised(test, merchant, scenario)
    info: dict[str, Any] = {"delta": column, "quantile": cfg.merchant_quantile,
                            "merchants_rated": int(table["risk"].drop_nulls().len())}
    if truth is not None:
        table = table.with_columns(pl.col(merchant).is_in(list(truth)).alias("compromised"))
        info.update(roc_auc=merchant_auc(table, merchant, truth), compromised=len(truth),
                    ground_truth=f"any scenario-{scenario} fraud in the test period",
                    **flagged_precision(table, merchant, truth))
    return table, info


def run_fraud(run_dir: str | Path, model_name: str, cfg: FraudConfig | None = None) -> dict[str, Any]:
    """Build the features, train and score every feature set, write RUN_DIR/fraud/ (see the module doc)."""
    started = time.perf_counter()
    cfg = cfg or FraudConfig()
    run = RunDir.of(run_dir)
    frame, groups, meta = build_features(run, model_name, cfg)
    labelled = frame.filter(pl.col(LABEL).is_in([0, 1]))
    train = labelled.filter(pl.col("period") == "train")
    test = labelled.filter(pl.col("period") == "test")
    if train.height == 0 or test.height == 0:
        raise DataError(f"no labelled transactions in the {'training' if train.height == 0 else 'test'} "
                        f"period {meta['periods'].as_dict()}")
    fdir = run.fraud_dir(cfg.out_dir)
    out = fdir.path
    out.mkdir(parents=True, exist_ok=True)
    results, models_info, importances, scores = {}, {}, [], {}
    t0 = time.perf_counter()
    day = test[TIME].dt.date().to_numpy()
    for name in cfg.feature_sets:
        cols = [c for g in GROUPS[name] for c in groups[g]]
        kind = risk_model_kind(cfg.risk_model)
        fit, knobs = kind.fit, getattr(cfg, kind.config_key)
        model = fit(train.select(cols), train[LABEL].to_numpy(), train[TIME].to_numpy(), knobs, meta["categorical"],
                    train[USER].to_numpy())
        s = model.predict(test.select(cols))
        scores[f"score_{name}"] = s
        results[name] = fraud_metrics(s, test[LABEL].to_numpy(), test[USER].to_numpy(), day,
                                      test[SCENARIO].to_numpy() if SCENARIO in test.columns else None, cfg.card_k)
        model.save(fdir.risk_model(name))
        models_info[name] = {**model.info, "features": len(cols)}
        importances.append(model.importances().with_columns(pl.lit(name).alias("feature_set")))
        log.info("%s: AP %.4f, recall@1%% %.4f", name, results[name]["average_precision"],
                 results[name]["recall@1%"])
    meta["timings"]["risk_models_s"] = time.perf_counter() - t0

    test = test.with_columns(*(pl.Series(k, v) for k, v in scores.items()))
    table, merchant_info = _merchant_section(test, meta["merchant"], cfg, _dataset_source(run))
    keys = [c for c in (EVENT_ID, USER, TIME, LABEL, SCENARIO, meta["merchant"]) if c and c in test.columns]
    test.select(*keys, *scores).write_parquet(fdir.scores)
    if table is not None:
        table.write_parquet(fdir.merchant_risk)
    pl.concat(importances).write_parquet(fdir.importances)
    np.savez(fdir.embedding_pca, **meta["pca"])
    if cfg.save_features:
        frame.write_parquet(fdir.features)
    report = {
        "run": str(run), "model": model_name, "out": str(out), "periods": meta["periods"].as_dict(),
        "rows": {"train": train.height, "test": test.height, "train_frauds": int(train[LABEL].sum()),
                 "test_frauds": int(test[LABEL].sum())},
        "feature_sets": results, "risk_models": models_info,
        "features": {g: len(c) for g, c in groups.items()}, "feature_groups": groups,
        "embedding": embedding_summary(cfg.embedding_dims, meta["pca"]),
        "categorical": meta["categorical"], "merchant_risk": merchant_info,
        "config": _plain(cfg), "timings_s": {k: round(v, 1) for k, v in meta["timings"].items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report = _finite(report)
    fdir.report.write_text(json.dumps(report, indent=1, default=_json_default))
    return report


def embedding_summary(k: int, pca: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the user-state embeddings were reduced to (the embedding ablation): the configured
    `embedding_dims`, the state size D, the columns kept per state and in all, and how."""
    comps = [pca[f"{n}_comps"] for n in EMBEDDINGS if f"{n}_comps" in pca]
    d = int(comps[0].shape[1]) if comps else 0
    kept = int(comps[0].shape[0]) if comps else 0
    how = "dropped" if kept == 0 else ("all dimensions" if k < 0 or kept == d else "PCA")
    return {"embedding_dims": int(k), "state_dims": d, "dims_per_state": kept,
            "columns": kept * len(comps), "reduction": how}


def _dataset_source(run: RunDir) -> str:
    return str(run.raw_config().get("source", ""))


def _plain(cfg: FraudConfig) -> dict:
    return dataclasses.asdict(cfg)


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (fraud.json stays strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)




def format_fraud_table(report: dict[str, Any]) -> str:
    """The terminal table of fraud.json: one row per feature set, recall@1% per scenario at the end."""
    sets = report["feature_sets"]
    card = next((k for k in next(iter(sets.values())) if k.startswith("card_precision@")), "card_precision@100")
    scen = scenario_ids(sets)
    cols = (*TABLE_COLUMNS, card)
    names = [c.replace("average_precision", "AP") for c in cols]
    widths = [max(13, len(n) + 2) for n in names]
    nw = max([20, *(len(n) + 2 for n in sets)])
    head = f"{'feature set':<{nw}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)) + \
        "".join(f"{'sc' + s + '@1%':>9}" for s in scen)
    lines = [head, "-" * len(head)]
    for name, r in sets.items():
        by = r.get("recall@1%_by_scenario", {})
        lines.append(f"{name:<{nw}}" + "".join(_cell(r.get(c), w) for c, w in zip(cols, widths))
                     + "".join(_cell(by.get(s), 9) for s in scen))
    e = report.get("embedding")
    if e:
        kept = "dropped" if e["reduction"] == "dropped" else f"{e['dims_per_state']} of {e['state_dims']} dims each " \
            f"({e['reduction']})"
        lines.append(f"user-state embeddings (pooled, recent): {kept}, {e['columns']} columns in "
                     f"baseline+embedding and hybrid (embedding_dims = {e['embedding_dims']})")
    m = report.get("merchant_risk", {})
    if m.get("roc_auc") is not None:
        lines.append(f"merchant risk ROC-AUC (compromised merchants): {m['roc_auc']:.4f} "
                     f"({m['compromised']} compromised, {m['merchants_rated']} merchants rated); "
                     f"{m.get('flagged', 0)} flagged, {_share(m.get('flagged_precision'))} of them compromised "
                     f"(base rate {_share(m.get('base_rate'))})")
    return "\n".join(lines)


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, float) and np.isfinite(value) else "-"


def _cell(value: Any, width: int) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, float) else f"{'-':>{width}}"


__all__ = ["EMBEDDINGS", "FraudConfig", "build_features", "embedding_summary", "format_fraud_table",
           "load_fraud_config", "project", "run_fraud"]
