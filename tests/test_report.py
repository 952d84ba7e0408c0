"""The HTML report: rendered by headless Chromium without console errors or network use, and screenshotted."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tinylstm import pipeline, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--enable-logging=stderr", "--v=0"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian: apt-get install chromium)")


def open_in_chromium(html: Path, screenshot: Path, tmp_path: Path) -> str:
    """Render ``html`` in headless Chromium: fail on any console message (a script error, or a blocked network
    request: the report's Content-Security-Policy forbids every fetch); write a screenshot; return the DOM."""
    runs = []
    for n, action in enumerate(["--dump-dom", f"--screenshot={screenshot}"]):
        result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / f'chromium-{n}'}",
                                 "--window-size=1100,3000", action, html.resolve().as_uri()],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, "\n".join(console)
        runs.append(result.stdout)
    with open(screenshot, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1100, 3000)
    return runs[0]


@needs_chromium
def test_console_errors_are_caught(tmp_path):
    """The check itself fails on a page with a script error or a network request."""
    for body in ("<script>undefinedFunction()</script>",
                 '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
                 '<img src="http://192.0.2.1/x.png">'):
        page = tmp_path / "bad.html"
        page.write_text(f"<!DOCTYPE html><html><head></head><body>{body}</body></html>")
        with pytest.raises(AssertionError, match="CONSOLE"):
            open_in_chromium(page, tmp_path / "bad.png", tmp_path)


def test_nice_ticks():
    assert report.nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert report.nice_ticks(69_687_396, 70_084_316) == [69_600_000, 69_700_000, 69_800_000, 69_900_000,
                                                         70_000_000, 70_100_000]
    assert report.nice_ticks(3, 3)[0] <= 3 <= report.nice_ticks(3, 3)[-1]


def test_report_needs_a_run(tmp_path):
    with pytest.raises(report.ReportError, match="no pipeline run"):
        report.write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def forecast_run(tmp_path_factory):
    """A small forecasting project on a real board without a build: every stage but the benchmark."""
    raw = {"data": {"dataset": "taylor_demand", "window": 24}, "model": {"hidden": [4]},
           "train": {"epochs": 3, "batch_size": 256}, "board": {"name": "uno", "build": False}}
    out = tmp_path_factory.mktemp("forecast")
    pipeline.run(pipeline.make_config(raw, "tinylstm run forecast.toml"), out)
    return out


@needs_chromium
def test_report_renders_in_chromium(forecast_run, tmp_path):
    dom = open_in_chromium(forecast_run / "report.html", tmp_path / "report.png", tmp_path)
    for section in ("training", "quality", "memory", "device", "reproduce"):
        assert f'id="{section}"' in dom
    assert dom.count("<svg") == 3  # training curves, forecast, memory bars (no benchmark in this run)
    assert "tinylstm run forecast.toml" in dom
    assert not re.search(r"""(src|href)=["']?https?:""", (forecast_run / "report.html").read_text())


def test_forecast_chart_shades_labelled_anomalies_and_marks_flags():
    """One band per labelled anomaly inside the plotted rows (none for one outside), and a tick under each
    point whose INT8 error exceeds the threshold."""
    rows = list(range(100, 200))
    truth = [0.0] * 100
    int8 = [0.0] * 100
    for i in (5, 45, 46):
        int8[i] = 2.0
    series = {"row": rows, "truth": truth, "fp32": truth, "int8": int8, "target": "value"}
    svg = str(report.forecast_chart(series, [[140, 149], [300, 310]], threshold=1.0))
    assert svg.count('class="labelled"') == 1 and "labelled anomaly, rows 140 to 149" in svg
    assert svg.count('class="flag"') == 3
    assert 'class="flag"' not in str(report.forecast_chart(series, [[140, 149]]))


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory):
    """The bundled anomaly set (its labelled anomaly lies thousands of rows into the test split), briefly
    trained, on a real board without a build."""
    raw = {"data": {"dataset": "kdd_tsad_135"}, "model": {"hidden": [4]}, "train": {"epochs": 2, "batch_size": 256},
           "board": {"name": "uno", "build": False}}
    out = tmp_path_factory.mktemp("anomaly")
    pipeline.run(pipeline.make_config(raw, "tinylstm run anomaly.toml"), out)
    return out


def test_anomaly_report_shows_the_labelled_anomaly_and_events(anomaly_run):
    html = (anomaly_run / "report.html").read_text()
    assert html.count('class="labelled"') == 1 and "labelled anomaly, rows 4187 to 4198" in html
    assert "labelled events, INT8 host" in html and "point-F1" in html


def test_real_time_card_shows_the_measured_margin_beside_the_prediction():
    from tinylstm.boards import load_board
    from tinylstm.budget import Deadline, timed

    board = load_board("uno_sim")
    # 20,000 cycles at 16 MHz = 1.25 ms; 30,000 = 1.875 ms; at 400 Hz the period is 2.5 ms.
    planned = timed(board, 20_000, "cycles", 400.0, 0.1, "predicted").to_dict()
    measured = timed(board, 30_000, "cycles", 400.0, 0.1, "measured").to_dict()
    card = report.real_time_card({"deadline": planned}, {"deadline": measured})
    assert card["title"] == "real time at 400 Hz" and card["ok"] is True
    assert card["values"] == [("period", "2.5 ms"), ("measured mean step", "1.88 ms"), ("predicted step", "1.25 ms")]
    assert card["detail"].startswith("device: uses 75% of the period")
    slow = timed(board, 60_000, "cycles", 400.0, 0.1, "measured").to_dict()  # 3.75 ms
    card = report.real_time_card({"deadline": planned}, {"deadline": slow})
    assert card["ok"] is False and card["detail"].startswith("device: 1.5x too slow (keeps up to 267 Hz)")
    assert Deadline.from_dict(slow).to_dict() == slow
    assert report.real_time_card({"deadline": None}, None) is None
