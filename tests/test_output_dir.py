"""The pipeline's output directory: tinylstm replaces only what its manifest lists as its own, and refuses, in
one line and before writing anything, a directory whose stage names hold the user's files. Run through the
command line in a subprocess, as a user would."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tinylstm import pipeline
from tinylstm.data import DATA_DIR

PROJECT = """\
# my sensor project: keep these comments
[data]
path = "data/sensor.csv"
window = 24
test_fraction = 0.2
val_fraction = 0.2
[task]
kind = "forecasting"
target = "demand"
[model]
hidden = [4]
[train]
epochs = 2
batch_size = 256
[board]
name = "uno"
build = false
"""


def tinylstm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinylstm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file below ``directory``, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def user_project(directory: Path, config_name: str = "project.toml") -> Path:
    (directory / "data").mkdir(parents=True)
    shutil.copy(DATA_DIR / "taylor_demand.csv", directory / "data" / "sensor.csv")
    (directory / config_name).write_text(PROJECT)
    return directory / config_name


def assert_refused(result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name} is not tinylstm output" in lines[0], result.stderr


def test_out_dot_with_the_users_data_inside_changes_nothing(tmp_path):
    user_project(tmp_path)
    before = snapshot(tmp_path)
    result = tinylstm("run", "project.toml", "--out", ".", cwd=tmp_path)
    assert_refused(result, "data")
    assert snapshot(tmp_path) == before  # the CSV and the config are intact, and nothing was added


def test_the_users_config_in_the_output_directory_is_never_overwritten(tmp_path):
    user_project(tmp_path, config_name=pipeline.CONFIG_COPY)
    (tmp_path / "data" / "sensor.csv").rename(tmp_path / "sensor.csv")
    (tmp_path / "data").rmdir()
    config = tmp_path / pipeline.CONFIG_COPY
    config.write_text(PROJECT.replace("data/sensor.csv", "sensor.csv"))
    before = snapshot(tmp_path)
    result = tinylstm("run", str(config), "--out", str(tmp_path), cwd=tmp_path)
    assert_refused(result, pipeline.CONFIG_COPY)
    assert snapshot(tmp_path) == before


def test_demo_refuses_a_stage_name_that_holds_the_users_files(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "notes.txt").write_text("my measurements")
    result = tinylstm("demo", "--out", str(tmp_path), cwd=tmp_path)
    assert_refused(result, "bench")
    assert snapshot(tmp_path) == {"bench/notes.txt": hashlib.sha256(b"my measurements").hexdigest()}


def test_reruns_replace_only_the_tools_own_files(tmp_path):
    config = user_project(tmp_path / "project")
    out = tmp_path / "project" / "out"
    first = tinylstm("run", str(config), "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (out / pipeline.MANIFEST).is_file() and (out / "quantize" / "model.npz").is_file()

    # The tool's own config copy and artefacts are replaced freely on a rerun with other settings.
    changed = tinylstm("run", str(config), "--out", str(out), cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr

    # A file the user adds inside a stage directory, or an edit to the config copy, makes the directory theirs.
    (out / "train" / "my_notes.txt").write_text("keep me")
    before = snapshot(out)
    result = tinylstm("run", str(config), "--out", str(out), cwd=tmp_path)
    assert_refused(result, "train/my_notes.txt")
    assert snapshot(out) == before
    (out / "train" / "my_notes.txt").unlink()

    (out / pipeline.CONFIG_COPY).write_text((out / pipeline.CONFIG_COPY).read_text() + "# my edit\n")
    before = snapshot(out)
    assert_refused(tinylstm("run", str(config), "--out", str(out), cwd=tmp_path), pipeline.CONFIG_COPY)
    assert snapshot(out) == before
