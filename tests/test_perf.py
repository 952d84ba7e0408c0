"""The benchmark path (tinylstm.perf, `tinylstm bench --suite`): its firmware on every emulated board, the
CMSIS-NN comparison (`--cmsis-nn DIR`) and what the suite reports without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinylstm import perf
from tinylstm.boards import load_board
from tinylstm.export import default_variant
from tinylstm.reference import Reference

needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc")),
                                reason="qemu-system-arm or arm-none-eabi-gcc missing")
needs_simavr = pytest.mark.skipif(not (Path("/usr/include/simavr/sim_avr.h").is_file() and shutil.which("avr-gcc")),
                                  reason="simavr headers or avr-gcc missing")


def _states_and_output(model, window) -> tuple[list, np.ndarray]:
    """h and cell after every step, and the output, from the integer reference."""
    ref = Reference(model)
    states = []
    for x_t in window:
        ref.step(x_t)
        states.append([(s.h[:, 0].copy(), s.c[:, 0].copy()) for s in ref.states])
    return states, ref.output()


@pytest.mark.slow
@pytest.mark.parametrize("board_name", [
    pytest.param("mps2_an386", marks=needs_qemu), pytest.param("mps2_an500", marks=needs_qemu),
    pytest.param("netduinoplus2", marks=needs_qemu), pytest.param("uno_sim", marks=needs_simavr)])
def test_benchmark_firmware_runs_on_every_emulated_board(board_name: str, tmp_path: Path) -> None:
    """The benchmark firmware of one small model, with the board's default kernel, runs in the board's emulator
    and reads back the reference's h and cell after every step and its output."""
    board = load_board(board_name)
    model = perf.suite_model(3, 8, 3)
    window = perf.suite_window(model)
    result = perf.measure(model, default_variant(board.arch, board.dsp), board, window, tmp_path / "fw",
                          tmp_path / "cache")
    states, output = _states_and_output(model, window)
    assert len(result.states) == len(states) == 3
    for device, expected in zip(result.states, states, strict=True):
        for (h, c), (h_ref, c_ref) in zip(device, expected, strict=True):
            assert np.array_equal(h, h_ref) and np.array_equal(c, c_ref)
    assert np.array_equal(result.output, output)
    assert all(step > 0 for step in result.steps)


# ---- the CMSIS-NN comparison ---------------------------------------------------------------------------------

CMSIS_NN_CHECKOUT = os.environ.get("TINYLSTM_CMSIS_NN")
needs_cmsis_nn = pytest.mark.skipif(
    not CMSIS_NN_CHECKOUT,
    reason="set TINYLSTM_CMSIS_NN to a CMSIS-NN checkout (e.g. a clone of ARM-software/CMSIS-NN at the commit "
           "docs/performance.md names) to compare with CMSIS-NN")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "tinylstm.cli", *args], capture_output=True, text=True, env=env)


def test_cmsis_nn_dir_that_is_not_a_checkout_is_a_one_line_error(tmp_path: Path) -> None:
    result = _cli("bench", "--suite", "--cmsis-nn", str(tmp_path), "--json", str(tmp_path / "p.json"),
                  "--markdown", str(tmp_path / "p.md"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {tmp_path} is not a CMSIS-NN checkout: it has no Include/arm_nnfunctions.h"]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "p.md").exists()


def test_cmsis_nn_checkout_without_the_lstm_names_the_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "Include").mkdir()
    (tmp_path / "Include" / "arm_nnfunctions.h").write_text("/* an older CMSIS-NN */\n")
    (tmp_path / "Source" / "LSTMFunctions").mkdir(parents=True)
    (tmp_path / "Source" / "LSTMFunctions" / "arm_lstm_unidirectional_s8.c").write_text("\n")
    result = _cli("bench", "--suite", "--cmsis-nn", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {tmp_path} lacks arm_lstm_unidirectional_s8: no ")
    assert "Source/NNSupportFunctions/arm_nn_lstm_step_s8.c" in line
    assert "arm_lstm_unidirectional_s8.c" not in line.split(": no ")[1]


def test_cmsis_nn_check_refuses_an_output_off_by_one() -> None:
    """check_cmsis_nn compares every step's h and the final cell: one value off by one is refused."""
    model = perf.suite_model(3, 8, perf.CMSIS_NN_STEPS)
    window = perf.suite_window(model)
    states, _ = _states_and_output(model, window)
    h = np.stack([step[0][0] for step in states])
    cell = states[-1][0][1]
    perf.check_cmsis_nn(model, window, perf.CmsisNNMeasurement(1, 9, h, cell))
    for t in (0, perf.CMSIS_NN_STEPS - 1):
        wrong = h.copy()
        wrong[t, 3] += 1
        with pytest.raises(perf.PerfError, match=f"step {t}"):
            perf.check_cmsis_nn(model, window, perf.CmsisNNMeasurement(1, 9, wrong, cell))
    with pytest.raises(perf.PerfError, match="cell"):
        perf.check_cmsis_nn(model, window, perf.CmsisNNMeasurement(1, 9, h, cell + np.eye(1, 8, 5, np.int64)[0]))


@pytest.mark.slow
@needs_qemu
def test_suite_without_cmsis_nn_says_not_measured(tmp_path: Path) -> None:
    result = perf.run_suite(tmp_path / "work", tmp_path / "cache", log=lambda _: None, shapes=((3, 16),),
                            boards={"mps2_an386": ("arm_dsp",)}, demo=False)
    perf.write_report(result, tmp_path / "p.json", tmp_path / "p.md")
    assert json.loads((tmp_path / "p.json").read_text())["cmsis_nn"] == {"status": "not measured"}
    table = (tmp_path / "p.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| (3, 16) |"))
    dsp = result["records"][0]["per_step"]
    assert row == f"| (3, 16) | 1,216 | not measured | {dsp:,} | - | - |"
    assert "CMSIS-NN not measured (run `tinylstm bench --suite --cmsis-nn DIR`" in table


@pytest.mark.slow
@needs_qemu
@needs_cmsis_nn
def test_cmsis_nn_outputs_equal_the_reference_and_are_measured_beside_ours(tmp_path: Path) -> None:
    """CMSIS-NN's arm_lstm_unidirectional_s8, built from the checkout, computes the integer reference's h after
    every step and its cell on a suite model, and the suite reports its figure beside the tinylstm kernels."""
    checkout = Path(CMSIS_NN_CHECKOUT)
    board = load_board("mps2_an386")
    model = perf.suite_model(6, 32, perf.CMSIS_NN_STEPS)
    window = perf.suite_window(model)
    measured = perf.measure_cmsis_nn(model, window, checkout, board, tmp_path / "direct", tmp_path / "cache")
    states, _ = _states_and_output(model, window)
    assert np.array_equal(measured.h, np.stack([step[0][0] for step in states]))
    assert np.array_equal(measured.cell, states[-1][0][1])
    assert 0 < measured.one_step_call < measured.long_call

    result = perf.run_suite(tmp_path / "work", tmp_path / "cache", log=lambda _: None, cmsis_nn=checkout,
                            shapes=((6, 32),), boards={"mps2_an386": ("arm_dsp",)}, demo=False)
    cmsis = result["cmsis_nn"]
    assert cmsis["status"] == "measured" and cmsis["revision"] == perf.cmsis_nn_revision(checkout)
    [record] = cmsis["records"]
    assert record["bit_exact"] and record["per_step"] == measured.steady_step
    dsp = result["records"][0]["per_step"]
    row = next(line for line in perf.markdown_table(result).splitlines() if line.startswith("| (6, 32) |"))
    assert row == (f"| (6, 32) | 4,864 | {measured.steady_step:,} | {dsp:,} | {measured.steady_step / dsp:.2f}x "
                   "| - |")
