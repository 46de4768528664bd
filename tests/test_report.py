"""The run report (report.py, report_sections.py): every section drawn from a full run (pretrained, evaluated,
fraud, served), the HTML rendered by headless Chromium with every image decoded, a run with only
prepare.json, the prototype figure drawn from prototypes.json alone, a missing run directory."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pantherseq.cli import main
from pantherseq.report import write_report
from pantherseq.report_sections import SECTIONS
from stolen_routine import PERIODS

pytest.importorskip("matplotlib")

KEYS = [key for key, _, _ in SECTIONS]
IMG = '<img src="data:image/png;base64,'
CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var d = document.createElement("div");
  d.id = "report-check";
  d.textContent = "LOADED=" + ok + "/" + imgs.length;
  document.body.appendChild(d);
});
</script>"""


@pytest.fixture(scope="module")
def full_run(trained_run: Path, tmp_path_factory) -> Path:
    """A copy of the shared trained run (other tests write into it) with eval.json, fraud/ and a serving log."""
    from pantherseq.eval.nextevent import evaluate_run
    from pantherseq.fraud.hybrid import LGBMConfig
    from pantherseq.fraud.pipeline import FraudConfig, run_fraud

    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("fraud", "eval.json", "report*", "states.db*"))
    evaluate_run(run, ["panther"], ("test",), progress=False, max_users=50)
    lgbm = LGBMConfig(max_rounds=50, early_stopping=10, learning_rate=0.1, min_child_samples=20, refit=False)
    run_fraud(run, "panther", FraudConfig(**PERIODS, context=24, threads=1, lgbm=lgbm, out_dir=str(run / "fraud")))
    latencies = [1.8, 2.1, 2.4, 1.9, 3.2, 2.2, 12.5, 2.0, 2.6, 1.7]
    (run / "serve_demo.json").write_text(json.dumps({"latencies_ms": latencies, "responses": []}))
    return run


@pytest.fixture(scope="module")
def report(full_run: Path) -> tuple[Path, Path]:
    return write_report(full_run)


@pytest.mark.slow
def test_every_section_is_drawn(report, full_run):
    html_path, md_path = report
    html = html_path.read_text()
    assert html.count(IMG) == len(SECTIONS) == 7
    assert "not run" not in html and "could not be drawn" not in html
    for key in KEYS:
        assert f'<section id="{key}">' in html
        png = full_run / "report" / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](report/{key}.png)" in md_path.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html  # self-contained
    assert "hybrid" in html and "stolen_routine" in html and "→" in html  # fraud table, header, 3-grams
    assert "explore targets (new to the user)" in html  # the repeat / explore panel's caption (drawn with it)
    assert "operating points" in html and "recall@1% per fraud scenario" in html  # the fraud section's tables


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser on PATH (make setup installs Debian's chromium)")
    page = tmp_path / "report.html"
    page.write_text(report[0].read_text().replace("</body>", CHECK + "</body>"))
    out = subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=90, check=False)
    found = re.search(r"LOADED=(\d+)/(\d+)", out.stdout)
    assert found, f"no check output from {binary}: {out.stderr[-500:]}"
    loaded, total = map(int, found.groups())
    assert loaded == total >= 6


def test_a_run_with_only_prepare_json(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "prepare.json", run)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert html.count(IMG) == 1  # the tokenizer coverage curve
    assert html.count('class="missing"') == 6 and html.count("not run: ") == 6
    assert (run / "report.md").read_text().count("*not run: ") == 6
    assert str(run / "report.html") in capsys.readouterr().out


def test_the_prototype_figure_is_drawn_from_prototypes_json_alone(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("prepare.json", "prototypes.json"):  # no model, no sequences: the report reads the analysis
        shutil.copy(trained_run / name, run)
    html = write_report(run)[0].read_text()
    assert html.count(IMG) == 2 and html.count("not run: ") == 5  # the coverage curve and the prototypes
    assert '<section id="prototypes">' in html and "→" in html
    analysis = json.loads((run / "prototypes.json").read_text())
    analysis["panther"] = {"model": "panther", "error": "no token 3-gram occurs twice in the training split"}
    (run / "prototypes.json").write_text(json.dumps(analysis))
    html = write_report(run)[0].read_text()
    assert "could not be drawn: no token 3-gram occurs twice" in html


def test_a_missing_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directory" in err
