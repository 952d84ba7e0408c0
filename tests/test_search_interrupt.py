"""Ctrl-C on `tinylstm search`: a non-zero exit, results marked partial and no recommendation; --resume then
finishes the search and recommends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tinylstm import search

COMMAND = ["search", "--dataset", "basic_motions", "--board", "uno_sim", "--hidden", "4,5,6,7", "--layers", "1",
           "--epochs", "30", "--no-early-stop", "--no-verify", "--cpus", "1", "--out", "s"]


@pytest.mark.slow
def test_an_interrupted_search_is_partial_and_resume_finishes_it(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "tinylstm.cli", *COMMAND], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    trials = tmp_path / "s" / search.TRIALS_DIR
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not any(trials.glob("*.json")):
        time.sleep(0.5)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0, stderr
    assert "--resume" in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s" / search.RECOMMENDED_CONFIG).exists()
    results = tmp_path / "s" / search.RESULTS_FILE
    if results.exists():
        summary = json.loads(results.read_text())
        assert summary["partial"] and summary["recommended"] is None

    resumed = subprocess.run([sys.executable, "-m", "tinylstm.cli", *COMMAND, "--resume"], cwd=tmp_path, text=True,
                             capture_output=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(results.read_text())
    assert not summary["partial"] and summary["completed"] == 4 and summary["recommended"] is not None
    assert (tmp_path / "s" / search.RECOMMENDED_CONFIG).is_file()
