"""The run report's sections (report.py renders them): one builder per section, each reading one stage's
outputs from the run directory and returning its figure (PNG bytes), a caption and tables, or raising
`NotRun` when that stage's outputs are absent.

    1. pretraining         models/*/train_log.jsonl: training loss per logged step and validation NDCG@10 per
                           epoch (the trainer logs no validation loss); models/*/metrics.json as a table
    2. next behaviour      eval.json: HR@K and NDCG@K bars per model (the test split, else the first one)
    3. SPRM prototypes     prototypes.json (the paper's Fig. 3, written by eval/prototypes.py when a model with
                           SPRM is pretrained): the last SPRM layer's weights over the M prototypes at the last
                           event of the training split's most frequent token 3-grams
    4. fraud recall        the paper's Fig. 4: Recall@Top-K% of fraud/scores.parquet, one line per feature set
    5. tokenizer coverage  prepare.json coverage_curve (training events kept by the top K tokens), K marked
    6. merchant risk       fraud/merchant_risk.parquet: the R_m distribution and top rows; fraud.json's metrics
    7. serving latency     serve_demo.json: client-side latencies, p50 and p99 marked

Sections only read artefacts: nothing here loads a model or runs one.
Figures are drawn on `matplotlib.figure.Figure` (the Agg canvas), never through pyplot's global state;
matplotlib (the `report` extra) is imported only when a figure is drawn.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pantherseq.errors import ConfigError
from pantherseq.run import RunDir, read_json

TOP_MERCHANTS = 15
DPI = 110


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    text: str  # what the figure shows
    png: bytes | None = None
    tables: list[Table] = field(default_factory=list)


class NotRun(Exception):
    """The stage a section shows has not run: the message names the missing input."""


# -- small helpers ------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the report needs matplotlib: pip install 'pantherseq[report]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _rel(run: RunDir, path: Path) -> str:
    """`path` relative to the run directory, e.g. fraud/scores.parquet."""
    return path.relative_to(run.path).as_posix()


# -- 1. pretraining ------------------------------------------------------------------------------------
def training_section(run: RunDir) -> Section:
    names = sorted(p.name for p in run.models.glob("*") if p.is_dir())
    logs = {n: _jsonl(run.train_log(n)) for n in names if run.train_log(n).is_file()}
    metrics = {n: read_json(run.model_metrics(n)) for n in names if run.model_metrics(n).is_file()}
    if not logs and not metrics:
        raise NotRun(f"no {run.models.name}/*/{run.train_log('*').name} (pantherseq pretrain)")
    fig = _figure(11, 3.6)
    loss_ax, valid_ax = fig.subplots(1, 2)
    for i, (name, records) in enumerate(logs.items()):
        steps = [r for r in records if r.get("kind") == "step"]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        if steps:
            loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=f"C{i}", label=name)
        if epochs:
            valid_ax.plot([r["epoch"] for r in epochs], [r["valid"]["ndcg@10"] for r in epochs], "o-",
                          color=f"C{i}", label=name)
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss (logged steps)")
    valid_ax.set(xlabel="epoch", ylabel="NDCG@10", title="validation NDCG@10 per epoch")
    for ax in (loss_ax, valid_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    cols = ("model", "epochs", "best_epoch", "steps", "train_s", "train_events_per_s", "n_params")
    rows = [[name, *(cell(m.get(c)) for c in cols), cell(m.get("valid", {}).get("ndcg@10"))]
            for name, m in metrics.items() if m]
    where = f"{run.models.name}/*/{run.model_metrics('*').name}"
    table = Table(["name", *cols, "valid NDCG@10"], rows, f"{where} (best epoch's weights)")
    text = ("Left: the training loss at every logged step (count models such as markov take no gradient "
            "steps). Right: validation NDCG@10 after each epoch; early stopping keeps the best epoch.")
    return Section(text, _png(fig), [table])


# -- 2. next-behaviour metrics ------------------------------------------------------------------------
def eval_split(results: dict) -> str | None:
    splits = [s for by_split in results.values() for s in by_split]
    return "test" if "test" in splits else (splits[0] if splits else None)


def _grouped_bars(ax, rows: dict[str, dict], names: list[str]) -> None:
    """One group of bars per metric in `names`, one bar per model (colour = model)."""
    width = 0.8 / len(rows)
    for i, (model, r) in enumerate(rows.items()):
        ax.bar(np.arange(len(names)) + (i - (len(rows) - 1) / 2) * width, [r[m] for m in names], width,
               color=f"C{i}", label=model)
    ax.set_xticks(np.arange(len(names)), [m.upper() for m in names])
    ax.grid(axis="y", alpha=0.3)


def eval_section(run: RunDir) -> Section:
    results = run.read_eval() or {}
    split = eval_split(results)
    if split is None:
        raise NotRun(f"no {run.eval_report.name} (pantherseq evaluate)")
    rows = {name: r[split] for name, r in results.items() if split in r}
    metric_names = [k for k in next(iter(rows.values())) if k not in ("n", "users")]
    split_by = [m for m in ("repeat_hr@10", "explore_hr@10") if m in metric_names]
    fig = _figure(16 if split_by else 11, 3.6)
    axes = fig.subplots(1, 3 if split_by else 2)
    for ax, prefix in zip(axes, ("hr@", "ndcg@")):
        _grouped_bars(ax, rows, [m for m in metric_names if m.startswith(prefix)])
        ax.set(ylabel=prefix.rstrip("@").upper() + "@K", title=f"{prefix.rstrip('@').upper()}@K ({split})")
        ax.legend(fontsize=8)
    if split_by:  # where a model wins: targets already in the user's history vs new to the user
        _grouped_bars(axes[2], rows, split_by)
        axes[2].set(ylabel="HR@10", title=f"repeat vs explore targets ({split})")
    table = Table(["model", *metric_names, "n"], [[m, *(cell(r[k]) for k in metric_names), cell(r.get("n"))]
                                                  for m, r in rows.items()], f"{run.eval_report.name}, {split} split")
    text = (f"Full ranking over the vocabulary of every {split}-split event, predicted from the user's earlier "
            "events: hit rate and NDCG at K per model."
            + (" Right: HR@10 on repeat targets (the token occurred earlier in the user's sequence) and on "
               "explore targets (new to the user) — counting baselines win on repeats, only a model "
               "can score on explore targets." if split_by else ""))
    return Section(text, _png(fig), [table])


# -- 3. SPRM prototype attention ----------------------------------------------------------------------
def _prototype_entry(run: RunDir) -> dict[str, Any]:
    """prototypes.json's analysis of `panther` if there is one, else of the first model by name."""
    analyses = read_json(run.prototypes) or {}
    if not analyses:
        raise NotRun(f"no {run.prototypes.name} (pantherseq pretrain --model panther)")
    return analyses.get("panther") or analyses[min(analyses)]


def attention_section(run: RunDir) -> Section:
    entry = _prototype_entry(run)
    name = entry["model"]
    if entry.get("error"):
        raise ConfigError(entry["error"])
    att = np.asarray(entry["attention"], dtype=float)  # (G, M)
    labels, counts = entry["labels"], np.asarray(entry["counts"])

    def short(text: str) -> str:  # values only: "merchant_id=m1|amount=<4" -> "m1|<4"
        return "|".join(p.split("=", 1)[-1] for p in text.split("|"))

    G, M = att.shape
    fig = _figure(min(max(10, 6 + 0.14 * M), 16), 1.4 + 0.34 * G)
    ax = fig.subplots()
    image = ax.imshow(att, aspect="auto", cmap="viridis")  # colour range = the weights' range (see colorbar)
    ax.set_yticks(np.arange(G), [" → ".join(short(t) for t in g) for g in labels], fontsize=8)
    ax.set_xticks(np.arange(0, M, 1 if M <= 32 else 4))
    ax.tick_params(axis="x", labelsize=7)
    ax.set(xlabel="prototype", title=f"{name}: prototype weights at each 3-gram's last event")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.9)
    rows = [[str(i + 1), " → ".join(g), cell(int(c)), f"{int(a.argmax())} ({a.max():.3f})"]
            for i, (g, c, a) in enumerate(zip(labels, counts, att))]
    table = Table(["#", "3-gram (token fields: " + " × ".join(entry["token_fields"]) + ")", "in training",
                   "top prototype (weight)"], rows, "rows of the heatmap, most frequent first")
    text = (f"The {G} most frequent token 3-grams of the training split (rows; each seen {counts.min():,} to "
            f"{counts.max():,} times), each fed alone to the "
            f"{name} model as a 3-event window; the cells are the weights of the last SPRM layer's "
            f"{M} prototypes (columns) at the 3-gram's last event, averaged over up to {entry['per_gram']} "
            f"occurrences. A uniform row would be 1/M = {1 / M:.3f}; mean row maximum "
            f"{att.max(1).mean():.3f}.")
    return Section(text, _png(fig), [table])


# -- 4. fraud recall curves ---------------------------------------------------------------------------
def fraud_curve_section(run: RunDir) -> Section:
    path = run.fraud_dir().scores
    if not path.is_file():
        raise NotRun(f"no {_rel(run, path)} (pantherseq fraud)")
    import polars as pl

    from pantherseq.data.schema import LABEL
    from pantherseq.fraud.metrics import TOP_PCTS, recall_at_top

    scores = pl.read_parquet(path)
    labels = scores[LABEL].to_numpy() == 1
    if not labels.any():
        raise NotRun("no fraud among the scored test transactions")
    pcts = np.geomspace(0.01, 10.0, 41)
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for i, col in enumerate(c for c in scores.columns if c.startswith("score_")):
        s = scores[col].to_numpy()
        ax.plot(pcts, [recall_at_top(s, labels, p) for p in pcts], color=f"C{i}", label=col[len("score_"):])
    ax.plot(pcts, pcts / 100, ":", color="grey", label="random")
    ax.set_xscale("log")
    ax.set_xticks([0.01, 0.1, 1, 10], ["0.01%", "0.1%", "1%", "10%"])
    for p in TOP_PCTS:
        ax.axvline(p, color="grey", lw=0.5, alpha=0.4)
    ax.set(xlabel="top K% of transactions by risk score", ylabel="recall (share of frauds caught)",
           ylim=(0, 1.02), title="Recall@Top-K% on the test period")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    text = (f"{len(labels):,} test-period transactions, {int(labels.sum()):,} frauds "
            f"({labels.mean():.2%}). One line per risk model's feature set; the dotted line is a random order.")
    return Section(text, _png(fig), _fraud_tables(read_json(run.fraud_dir().report) or {}))


def _fraud_tables(report: dict[str, Any]) -> list[Table]:
    """fraud.json as tables: the operating points per feature set, and recall@1% per fraud scenario."""
    from pantherseq.fraud.metrics import TABLE_COLUMNS, scenario_ids

    sets = report.get("feature_sets") or {}
    if not sets:
        return []
    cols = list(TABLE_COLUMNS)
    tables = [Table(["feature set", *cols], [[name, *(cell(r.get(c)) for c in cols)] for name, r in sets.items()],
                    "operating points: the share of frauds in the top K% of transactions by risk score")]
    scen = scenario_ids(sets)
    if scen:
        tables.append(Table(["feature set", *(f"scenario {s}" for s in scen)],
                            [[name, *(cell(r.get("recall@1%_by_scenario", {}).get(s)) for s in scen)]
                             for name, r in sets.items()],
                            "recall@1% per fraud scenario (docs/FRAUD.md lists them)"))
    return tables


# -- 5. tokenizer coverage ----------------------------------------------------------------------------
def coverage_section(run: RunDir) -> Section:
    prep = run.read_prepare_report()
    if not prep or not prep.get("coverage_curve"):
        raise NotRun(f"no {run.prepare_report.name} with a coverage curve (pantherseq prepare)")
    ks, cov = np.asarray(prep["coverage_curve"], dtype=float).T
    k = min(prep["top_k"], prep["raw_combinations"])
    at_k = float(np.interp(np.log(k), np.log(ks), cov))
    fig = _figure(7.5, 4.0)
    ax = fig.subplots()
    ax.plot(ks, cov * 100, "-", color="C0", label="training events covered")
    ax.axvline(k, color="C3", ls="--", lw=1)
    ax.plot([k], [at_k * 100], "o", color="C3", label=f"chosen K = {k:,} ({at_k:.1%})")
    ax.axhline(96, color="grey", ls=":", lw=1, label=f"96% (K = {prep['k_for_96pct']:,})")
    ax.set_xscale("log")
    ax.set(xlabel="K (most frequent tokens kept)", ylabel="coverage (%)", ylim=(0, 101),
           title=f"{prep['raw_combinations']:,} raw combinations of {' × '.join(prep['token_fields'])}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    by_split = ", ".join(f"{s} {v:.2%}" for s, v in prep.get("coverage_by_split", {}).items())
    text = (f"Share of training events whose field combination is among the K most frequent (the rest become "
            f"UNK). With K = {k:,}: {prep['coverage']:.2%} of all kept events covered ({by_split}); "
            f"{prep['unk_users']:.1%} of users have at least one UNK event.")
    return Section(text, _png(fig))


# -- 6. merchant risk and fraud metrics ---------------------------------------------------------------
def merchant_section(run: RunDir) -> Section:
    fraud = run.fraud_dir()
    report, path = fraud.read_report(), fraud.merchant_risk
    if report is None and not path.is_file():
        raise NotRun(f"no {_rel(run, fraud.report)} (pantherseq fraud)")
    tables, png, text = [], None, "No merchant risk table (no merchant field or no deviation features)."
    if report is not None:
        sets = report["feature_sets"]
        cols = [c for c, v in next(iter(sets.values())).items() if not isinstance(v, dict)]
        tables.append(Table(["feature set", *cols], [[s, *(cell(r.get(c)) for c in cols)] for s, r in sets.items()],
                            f"{fraud.report.name}: risk models scored on the test period"))
    if path.is_file():
        import polars as pl

        table = pl.read_parquet(path)
        info = (report or {}).get("merchant_risk", {})
        rated = table.drop_nulls("risk")
        fig = _figure(7.5, 3.6)
        ax = fig.subplots()
        flag = "compromised" if "compromised" in rated.columns else "high_risk"
        bins = np.histogram_bin_edges(rated["risk"].to_numpy(), bins=40)
        names = {True: "compromised" if flag == "compromised" else "high risk (robust z > 3)", False: "other"}
        for value, colour in ((False, "C0"), (True, "C3")):
            part = rated.filter(pl.col(flag) == value)["risk"].to_numpy()
            ax.hist(part, bins=bins, color=colour, alpha=0.75, label=f"{names[value]} ({len(part):,})")
        ax.set(xlabel=f"R_m (q{info.get('quantile', '')} of users' mean {info.get('delta', 'Δ')})",
               ylabel="merchants", title="merchant risk R_m")
        ax.legend(fontsize=8)
        png = _png(fig)
        auc = info.get("roc_auc")
        text = (f"{rated.height:,} merchants rated (enough distinct users in the test period). "
                + (f"ROC-AUC of R_m for the {info.get('compromised')} compromised merchants: {auc:.4f}. "
                   if auc is not None else "") + f"Top {TOP_MERCHANTS} below.")
        head = table.head(TOP_MERCHANTS)
        tables.insert(0, Table(head.columns, [[cell(v) for v in row] for row in head.iter_rows()],
                               f"{_rel(run, path)}, top {TOP_MERCHANTS} by R_m"))
    return Section(text, png, tables)


# -- 7. serving latency -------------------------------------------------------------------------------
def latency_section(run: RunDir) -> Section:
    served = read_json(run.serve_demo) or {}
    lat = np.asarray(served.get("latencies_ms") or [], dtype=float)
    if not len(lat):
        raise NotRun(f"no {run.serve_demo.name} with latencies (pantherseq demo)")
    p50, p99 = np.percentile(lat, [50, 99])
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    ax.hist(lat, bins=min(40, max(5, len(lat) // 5)), color="C0", alpha=0.8)
    for value, name, colour in ((p50, "p50", "C2"), (p99, "p99", "C3")):
        ax.axvline(value, color=colour, ls="--", label=f"{name} {value:.1f} ms")
    ax.set(xlabel="latency per request (ms, client side)", ylabel="requests", title=f"{len(lat):,} POST /score")
    ax.legend(fontsize=8)
    extra = ", ".join(f"{k.replace('_', ' ')} {served[k]}" for k in ("model_version", "feature_set") if served.get(k))
    text = (f"{len(lat):,} requests through HTTP to the scoring service: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"max {lat.max():.1f} ms" + (f" ({extra})." if extra else "."))
    return Section(text, _png(fig))


SECTIONS = (  # (anchor and PNG file stem, title, builder), in report order
    ("training", "Pretraining curves", training_section),
    ("eval", "Next-behaviour prediction", eval_section),
    ("prototypes", "SPRM prototype attention over recurring 3-grams", attention_section),
    ("fraud_recall", "Fraud detection: Recall@Top-K%", fraud_curve_section),
    ("coverage", "Tokenizer coverage", coverage_section),
    ("merchant_risk", "Merchant risk and fraud metrics", merchant_section),
    ("latency", "Scoring service latency", latency_section),
)
