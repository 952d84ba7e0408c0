"""The benchmark path (tinylstm.perf, `tinylstm bench --suite`): its firmware on every emulated board, the
CMSIS-NN comparison (`--cmsis-nn DIR`) and what the suite reports without it."""

from __future__ import annotations

import shutil
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
