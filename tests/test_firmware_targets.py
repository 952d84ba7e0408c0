"""Firmware against independent truth: the planner's figures against the linker's on every emulated board, the
Uno's 2 KB RAM limit with an LSTM of input 6 and hidden 32, and the real boards' generated projects checked
offline (PlatformIO parses them; the sources compile with the host and the closest cross compilers here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.random_models import random_model, random_windows
from tinylstm import firmware, hil
from tinylstm.boards import load_board
from tinylstm.reference import Reference

EMULATED = ["uno_sim", "mps2_an386", "mps2_an500", "netduinoplus2"]
# (input, hidden sizes, outputs): small to the largest that still fits the Uno, with and without a head.
SHAPES = [(1, (1,), None), (3, (4,), 2), (6, (8,), 4), (6, (16,), None), (6, (32,), 3), (10, (12, 12), 5),
          (4, (8, 8, 8), None), (16, (24,), 8), (2, (40,), 1), (20, (10, 6), 2)]


def _tolerance(figure: int) -> float:
    return max(0.01 * figure, 64)


# Every emulated board with the kernel a firmware builds by default, and with the reference kernel where that is
# another one.
PLANNED = [(name, None) for name in EMULATED] + [
    (name, "reference") for name in EMULATED if firmware.board_variant(load_board(name)) != "reference"]


@pytest.mark.slow
@pytest.mark.parametrize(("board_name", "variant"), PLANNED, ids=lambda v: v or "default")
def test_planner_matches_linker(board_name, variant, tmp_path):
    board = load_board(board_name)

    def build(n: int) -> tuple[tuple[int, int], firmware.Sizes]:
        inputs, hidden, outputs = SHAPES[n]
        model = random_model(n, input_size=inputs, hidden_sizes=hidden, outputs=outputs, window=4,
                             per_channel=n % 2 == 1)
        (p,) = firmware.check_fits(model, board, variant)
        project = firmware.generate_project(model, board, tmp_path / f"shape{n}", variant=variant)
        return firmware.predicted_sizes(p), firmware.build(project).sizes

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(build, range(len(SHAPES))))
    for n, ((flash, ram), sizes) in enumerate(results):
        assert abs(sizes.flash - flash) <= _tolerance(sizes.flash), (board_name, variant, SHAPES[n], sizes, flash)
        assert abs(sizes.ram - ram) <= _tolerance(sizes.ram), (board_name, variant, SHAPES[n], sizes, ram)


@pytest.mark.slow
def test_uno_lstm_6x32_within_2k(tmp_path):
    """An LSTM of input 6, hidden 32 (weights in PROGMEM) runs on the simulated Uno within its 2 KB of RAM."""
    board = load_board("uno_sim")
    model = random_model(632, input_size=6, hidden_sizes=(32,), outputs=None, window=16, extreme=0.0)
    result = firmware.build(firmware.generate_project(model, board, tmp_path / "uno"))
    assert result.sizes.ram + board.overhead.ram["stack"] <= 2048
    with firmware.start_emulator(board, result.elf) as emulator, hil.connect(emulator.url, timeout=60) as device:
        assert device.info.free_ram is not None and device.info.free_ram >= board.overhead.ram["stack"]
        window = random_windows(632, model, 1)[0]
        run = device.run(window)
        np.testing.assert_array_equal(run.output, Reference(model).run(window))
        print(f"\nuno_sim LSTM 6x32, window {len(window)}: {run.counts:,} cycles per window "
              f"({run.counts // len(window):,} per step) with {result.compiler}; "
              f"RAM .data+.bss {result.sizes.ram} B, free at run time {device.info.free_ram} B", file=sys.stderr)


@pytest.mark.parametrize("board_name", ["esp32dev", "nano33ble"])
def test_real_board_project_config_offline(board_name, tmp_path):
    model = random_model(7, input_size=6, hidden_sizes=(16,), outputs=3, window=8)
    project = firmware.generate_project(model, board_name, tmp_path / board_name)
    env = firmware.pio_environment()
    env["PLATFORMIO_CORE_DIR"] = str(tmp_path / "core")  # an empty core: proves nothing is fetched
    out = subprocess.run([sys.executable, "-m", "platformio", "project", "config", "-d", str(project.path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    board = load_board(board_name)
    # A real board's platform is pinned to the release its board file names, so its build is reproducible.
    assert board.platformio.version is not None
    assert f"platform       =  platformio/{board.platformio.platform}@{board.platformio.version}\n" in out.stdout
    assert f"board          =  {board.platformio.board}" in out.stdout


# The C sources of a real board's project (the Arduino glue, serial_arduino.cpp and the ESP32 counter, needs the
# framework's headers, which only a user's PlatformIO install has).
def _c_sources(project: firmware.Project) -> list[str]:
    return [str(p) for p in sorted((project.path / "src").glob("*.c"))]


CROSS = {
    # nano33ble (nRF52840, Cortex-M4F): the same family compiler, with the board's FPU ABI.
    "nano33ble": ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"],
    # esp32dev (Xtensa LX6): no Xtensa compiler here; the closest is another 32-bit little-endian target.
    "esp32dev": ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb"],
}


@pytest.mark.parametrize("board_name", ["esp32dev", "nano33ble"])
@pytest.mark.parametrize("compiler", ["host", "cross"])
def test_real_board_sources_compile(board_name, compiler, tmp_path):
    model = random_model(8, input_size=5, hidden_sizes=(12, 7), outputs=4, window=8)
    project = firmware.generate_project(model, board_name, tmp_path / board_name)
    cmd = ["gcc", "-std=c99"] if compiler == "host" else CROSS[board_name] + ["-std=c99", "-Os"]
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is missing (bash boards/setup.sh installs it)")
    for source in _c_sources(project):
        out = subprocess.run(cmd + ["-Wall", "-Wextra", "-Werror", "-c", source, "-o", str(tmp_path / "x.o")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
