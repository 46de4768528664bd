"""The run report: `pantherseq report RUN_DIR` (and the last step of `pantherseq demo`).

    write_report(run_dir) -> (RUN_DIR/report.html, RUN_DIR/report.md)      figures in RUN_DIR/report/*.png

The report only reads artefacts the stages wrote (RunDir names them); it never loads or runs a model.

A header (dataset, sizes, models; summary tables of eval.json and fraud.json), then the seven sections of
report_sections.py: pretraining curves, next-behaviour metrics, SPRM prototype attention (paper Fig. 3),
fraud Recall@Top-K% (paper Fig. 4), tokenizer coverage, merchant risk, serving latency. Every section is
optional: one whose stage has not run says "not run"; one whose inputs are unusable (e.g. no 3-gram recurs
for the prototype analysis) says why and the others still render.

report.html is one self-contained file: figures are base64 PNG data URIs, the CSS is inline and nothing
is fetched (no CDN, no font, no script). report.md links the PNG files written to RUN_DIR/report/.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pantherseq.errors import ConfigError, PantherseqError
from pantherseq.report_sections import SECTIONS, NotRun, Section, Table, cell, eval_split
from pantherseq.run import RunDir

log = logging.getLogger(__name__)
SUMMARY_EVAL = ("hr@1", "hr@10", "ndcg@10", "mrr")
SUMMARY_FRAUD = ("average_precision", "roc_auc", "recall@1%", "recall@5%")

CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --accent: #2f6fbf; --bg: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); line-height: 1.5;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 22px;
                  margin-bottom: 18px; }
.muted, caption { color: var(--muted); font-size: 13px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px; margin: 12px 0 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
nav ol { margin: 0; padding-left: 20px; columns: 2; }
nav a { color: var(--accent); text-decoration: none; } nav a:hover { text-decoration: underline; }
.tag { font-size: 11px; color: #9a3412; background: #ffedd5; border-radius: 4px; padding: 1px 6px; }
section.missing p { color: var(--muted); font-style: italic; }
figure { margin: 12px 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.table { overflow-x: auto; margin: 12px 0; }
table { border-collapse: collapse; font-size: 13px; min-width: 50%; }
caption { text-align: left; padding-bottom: 4px; caption-side: top; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: #eef2f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f8fafc; }
"""


@dataclass
class Part:
    """One rendered section: its place in the report and its content (None content = not run)."""

    key: str
    title: str
    section: Section | None
    note: str = ""  # why there is no content


# -- content ------------------------------------------------------------------------------------------
def run_outputs(run: RunDir) -> tuple[Path, ...]:
    """What any stage writes: a report needs at least one of them."""
    return run.prepare_report, run.models, run.eval_report, run.fraud_dir().path, run.serve_demo


def facts(run: RunDir) -> list[tuple[str, str]]:
    """(label, value) lines of the header: the dataset and its sizes, the trained models."""
    prep = run.read_prepare_report()
    out = [("run directory", str(run.path.resolve()))]
    if prep:
        split = prep["split"]
        out += [("dataset", f"{prep['dataset']} ({prep['source']})"),
                ("events", f"{prep['rows_kept']:,} kept of {prep['rows_read']:,} read"),
                ("users", f"{prep['users']:,}"),
                ("vocabulary", f"{prep['vocab_size']:,} tokens of {' × '.join(prep['token_fields'])}"),
                ("coverage", f"{prep['coverage']:.2%} of the events"),
                ("split", f"{split['kind']}: " + ", ".join(f"{k} {v:,}" for k, v in split["events"].items()))]
        if prep.get("labels"):
            out.append(("labels", f"{prep['labels'].get('positive', 0):,} positive events"))
    else:
        out.append(("prepare", f"not run (no {run.prepare_report.name})"))
    models = run.trained_models()
    out.append(("models", ", ".join(models) or "none trained"))
    return out


def summary_tables(run: RunDir) -> list[Table]:
    tables = []
    results = run.read_eval() or {}
    split = eval_split(results)
    if split:
        rows = [[m, *(cell(r[split].get(k)) for k in SUMMARY_EVAL)] for m, r in results.items() if split in r]
        tables.append(Table(["model", *(k.upper() for k in SUMMARY_EVAL)], rows,
                            f"next-behaviour prediction ({split} split)"))
    fraud = run.fraud_dir().read_report()
    if fraud:
        rows = [[s, *(cell(r.get(k)) for k in SUMMARY_FRAUD)] for s, r in fraud["feature_sets"].items()]
        tables.append(Table(["feature set", "AP", "ROC-AUC", "Recall@1%", "Recall@5%"], rows,
                            f"fraud risk models ({fraud['rows']['test']:,} test transactions, "
                            f"{fraud['rows']['test_frauds']:,} frauds)"))
    return tables


def build_parts(run: RunDir) -> list[Part]:
    parts = []
    for key, title, build in SECTIONS:
        try:
            parts.append(Part(key, title, build(run)))
        except NotRun as exc:
            parts.append(Part(key, title, None, f"not run: {exc}"))
        except PantherseqError as exc:  # unusable inputs: say why, render the rest
            log.warning("report section %r failed: %s", key, exc)
            parts.append(Part(key, title, None, f"could not be drawn: {exc}"))
    return parts


# -- HTML ---------------------------------------------------------------------------------------------
NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+%?$|^–$")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if NUMERIC.match(c) else ""}>{html.escape(c)}</td>'
                                     for c in row) + "</tr>" for row in t.rows)
    caption = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f'<div class="table"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_part(i: int, p: Part) -> str:
    title = f"<h2>{i}. {html.escape(p.title)}</h2>"
    if p.section is None:
        return f'<section id="{p.key}" class="missing">{title}<p>{html.escape(p.note)}</p></section>'
    s = p.section
    img = ""
    if s.png:
        data = base64.b64encode(s.png).decode("ascii")
        img = f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(p.title)}"></figure>'
    tables = "".join(_html_table(t) for t in s.tables)
    return f'<section id="{p.key}">{title}<p>{html.escape(s.text)}</p>{img}{tables}</section>'


def render_html(title: str, lines: list[tuple[str, str]], summary: list[Table], parts: list[Part]) -> str:
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in lines)
    nav = "".join(f'<li><a href="#{p.key}">{html.escape(p.title)}</a>'
                  + ("" if p.section else ' <span class="tag">not run</span>') + "</li>" for p in parts)
    tables = "".join(_html_table(t) for t in summary) or "<p class=muted>nothing evaluated yet</p>"
    body = "".join(_html_part(i, p) for i, p in enumerate(parts, 1))
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body><main>"
            f'<header><h1>{html.escape(title)}</h1><div class="muted">generated {stamp} by pantherseq report'
            f'</div><dl class="facts">{dl}</dl></header>'
            f'<section id="summary"><h2>Summary</h2>{tables}<nav><ol>{nav}</ol></nav></section>'
            f"{body}</main></body></html>\n")


# -- markdown -----------------------------------------------------------------------------------------
def _md_table(t: Table) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(t.header), "|" + "---|" * len(t.header), *(row(r) for r in t.rows)]
    caption = t.caption.replace("*", "\\*")
    return (f"*{caption}*\n\n" if caption else "") + "\n".join(lines) + "\n"


def render_markdown(title: str, lines: list[tuple[str, str]], summary: list[Table], parts: list[Part],
                    figures: str) -> str:
    out = [f"# {title}\n", *(f"- **{k}**: {v}" for k, v in lines), "", "## Summary\n"]
    out += [_md_table(t) for t in summary] or ["nothing evaluated yet\n"]
    for i, p in enumerate(parts, 1):
        out.append(f"## {i}. {p.title}\n")
        if p.section is None:
            out.append(f"*{p.note}*\n")
            continue
        out.append(p.section.text + "\n")
        if p.section.png:
            out.append(f"![{p.title}]({figures}/{p.key}.png)\n")
        out += [_md_table(t) for t in p.section.tables]
    return "\n".join(out)


def write_report(run_dir: RunDir | str | Path) -> tuple[Path, Path]:
    """Render RUN_DIR/report.html (self-contained) and RUN_DIR/report.md (+ RUN_DIR/report/*.png).

    Not `RunDir.require()`: a run with any stage's outputs gets a report, even without prepare.json."""
    run = RunDir.of(run_dir)
    if not run.path.is_dir():
        raise ConfigError(f"no run directory at {run}: run `pantherseq prepare` (or `pantherseq demo`) first")
    outputs = run_outputs(run)
    if not any(p.exists() for p in outputs):
        raise ConfigError(f"{run} holds no pantherseq outputs ({', '.join(p.name for p in outputs)})")
    parts = build_parts(run)
    figures = run.report_figures
    figures.mkdir(exist_ok=True)
    for p in parts:
        png = figures / f"{p.key}.png"
        if p.section is not None and p.section.png:
            png.write_bytes(p.section.png)
        else:
            png.unlink(missing_ok=True)  # no stale figure from an earlier report
    title = f"pantherseq run report — {run.path.resolve().name}"
    lines, summary = facts(run), summary_tables(run)
    html_path, md_path = run.report_html, run.report_md
    html_path.write_text(render_html(title, lines, summary, parts), encoding="utf-8")
    md_path.write_text(render_markdown(title, lines, summary, parts, figures.name), encoding="utf-8")
    drawn = sum(p.section is not None for p in parts)
    log.info("report: %d of %d sections drawn -> %s", drawn, len(parts), html_path)
    return html_path, md_path
