"""docs/tutorial.md section 8, run as written: its generator, `init` on its CSV, and its project end to end."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinylstm import pipeline
from tinylstm.cli import main

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def tutorial_block(language: str, first_line: str) -> str:
    """The fenced block of ``language`` in the tutorial whose body starts with ``first_line``."""
    for body in re.findall(rf"```{language}\n(.*?)```", TUTORIAL.read_text(), flags=re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"no {language} block starting {first_line!r} in {TUTORIAL}")


@pytest.fixture(scope="module")
def wrist_imu(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tutorial")
    (work / "wrist_imu.py").write_text(tutorial_block("python", "# wrist_imu.py"))
    subprocess.run([sys.executable, "wrist_imu.py"], cwd=work, check=True, timeout=120)
    return work / "wrist_imu.csv"


def test_the_generator_writes_what_the_tutorial_says(wrist_imu):
    lines = wrist_imu.read_text().splitlines()
    assert lines[0] == "subject,recording,ax,ay,az,activity"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 25_303
    assert {r[0] for r in rows} == {str(s) for s in range(1, 11)}
    assert len({r[1] for r in rows}) == 80  # 10 subjects x 4 activities x 2
    assert {r[5] for r in rows} == {"rest", "walk", "run", "jump"}


def test_init_flags_the_id_columns_as_the_tutorial_shows(wrist_imu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init", "--data", str(wrist_imu)])
    assert result.exit_code == 0, result.output
    shown = tutorial_block("text", "columns in wrist_imu.csv").strip().splitlines()
    for line in shown:  # the tutorial quotes init's output word for word
        assert line in result.output
    written = tomllib.loads(Path("tinylstm.toml").read_text())
    assert written["data"]["features"] == ["ax", "ay", "az"]


@pytest.mark.slow
def test_the_multi_subject_project_runs_on_the_uno(wrist_imu, tmp_path, monkeypatch):
    """The tutorial's edits applied to init's file: whole subjects per part, every device window bit-exact, a
    measured step inside the 20 ms period, and accuracy on unseen subjects (95-97% over three training seeds
    where the tutorial was written; the bar leaves room for other CPUs)."""
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["init", "--data", str(wrist_imu)]).exit_code == 0
    raw = tomllib.loads(Path("tinylstm.toml").read_text())
    edits = tomllib.loads(tutorial_block("toml", '[data]\npath = "wrist_imu.csv"'))
    for section, values in edits.items():
        raw[section].update(values)
    raw["data"]["path"] = str(wrist_imu)
    config = pipeline.make_config(raw, "tinylstm run tinylstm.toml")
    result = pipeline.run(config, tmp_path / "out")
    s = result.summaries

    groups = s["data"]["groups"]
    assert sorted(sum(groups.values(), []), key=int) == [str(g) for g in range(1, 11)]
    assert not (set(groups["train"]) & set(groups["val"]) or set(groups["train"]) & set(groups["test"])
                or set(groups["val"]) & set(groups["test"]))
    comparison = s["quantize"]["comparison"]
    assert comparison["fp32"]["accuracy"] >= 0.85
    assert abs(comparison["int8"]["accuracy"] - comparison["fp32"]["accuracy"]) <= 0.03
    bench = s["bench"]
    assert bench["windows"] == 50 and bench["mismatches"] == 0
    assert bench["deadline"]["status"] == "fits" and bench["deadline"]["step_s"] < 0.02
    assert s["plan"]["deadline"]["sample_rate_hz"] == 50
