"""The board catalogue: every file loads, its figures agree with the toolchains and emulators that model the
chips, and malformed files are reported with their path and field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinylstm.boards import BOARDS_DIR, BoardError, board_names, list_boards, load_board
from tinylstm.cli import main

REQUIRED = {"uno", "nano", "mega2560", "nano33ble", "esp32dev", "esp32s3", "esp32c3", "pico", "nucleo_f401re",
            "teensy41", "uno_sim", "mps2_an386", "mps2_an500", "netduinoplus2"}


def test_catalogue_covers_the_required_boards():
    assert REQUIRED <= set(board_names())
    boards = {b.name: b for b in list_boards()}
    assert {name for name, b in boards.items() if b.emulated} == {"uno_sim", "mps2_an386", "mps2_an500",
                                                                  "netduinoplus2"}
    assert boards["uno_sim"].emulator.kind == "simavr"
    assert {boards[n].emulator.kind for n in ("mps2_an386", "mps2_an500", "netduinoplus2")} == {"qemu"}
    for board in boards.values():
        assert set(board.sources) == {"clock_hz", "ram_bytes", "flash_bytes"}
        assert board.overhead.estimate or board.emulated, f"{board.name}: real boards are not measured here"


def _avr_header_value(mcu: str, macro: str) -> int:
    out = subprocess.run(["avr-gcc", f"-mmcu={mcu}", "-E", "-dM", "-include", "avr/io.h", "-x", "c", "/dev/null"],
                         check=True, capture_output=True, text=True).stdout
    match = re.search(rf"^#define {macro} (\S+)$", out, re.M)
    assert match, f"{macro} not defined for {mcu}"
    return int(match.group(1).strip("()"), 0)


@pytest.mark.skipif(shutil.which("avr-gcc") is None, reason="avr-gcc is not installed")
@pytest.mark.parametrize("name", ["uno", "nano", "mega2560", "uno_sim"])
def test_avr_figures_match_avr_libc(name):
    """RAM is the MCU's SRAM; flash is the MCU's flash less a boot section of a size the fuses allow."""
    board = load_board(name)
    mcu = board.gcc_target_flags[0].removeprefix("-mmcu=")
    sram = _avr_header_value(mcu, "RAMEND") - _avr_header_value(mcu, "RAMSTART") + 1
    flash = _avr_header_value(mcu, "FLASHEND") + 1
    assert board.ram_bytes == sram
    boot_sections = {"atmega328p": {0, 512, 1024, 2048, 4096}, "atmega2560": {0, 1024, 2048, 4096, 8192}}[mcu]
    assert flash - board.flash_bytes in boot_sections
    if board.emulated:
        assert board.flash_bytes == flash  # simavr loads the ELF itself: no bootloader


def _qemu_regions(machine: str) -> dict[int, int]:
    """{start address: size} of the RAM and ROM regions QEMU maps for a machine (`info mtree -f`)."""
    result = subprocess.run(["qemu-system-arm", "-M", machine, "-nographic", "-monitor", "stdio", "-serial", "null",
                             "-S"], input="info mtree -f\nquit\n", capture_output=True, text=True, timeout=30)
    regions = {}
    for start, end in re.findall(r"([0-9a-f]{16})-([0-9a-f]{16}) \(prio 0, (?:ram|rom)\)", result.stdout):
        regions[int(start, 16)] = int(end, 16) - int(start, 16) + 1
    return regions


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="qemu-system-arm is not installed")
@pytest.mark.parametrize("name, flash_base", [("mps2_an386", 0x0), ("mps2_an500", 0x0),
                                              ("netduinoplus2", 0x08000000)])
def test_qemu_figures_match_what_qemu_models(name, flash_base):
    board = load_board(name)
    regions = _qemu_regions(board.emulator.machine)
    assert regions[0x20000000] == board.ram_bytes
    assert regions[flash_base] == board.flash_bytes


@pytest.fixture
def board_file(tmp_path):
    """A copy of a real board file to break, and a function that writes changes to it and loads it."""
    document = json.loads((BOARDS_DIR / "uno.json").read_text())
    path = tmp_path / "uno.json"

    def write(change) -> Path:
        broken = json.loads(json.dumps(document))
        change(broken)
        path.write_text(json.dumps(broken))
        return path

    return write


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("ram_bytes"), "ram_bytes"),
    (lambda d: d.update(clock_hz="16 MHz"), "clock_hz"),
    (lambda d: d.update(flash_bytes=-1), "flash_bytes"),
    (lambda d: d.update(arch="pic"), "arch"),
    (lambda d: d.update(dsp=1), "dsp"),
    (lambda d: d.update(name="uno2"), "name"),
    (lambda d: d["sources"].pop("flash_bytes"), "sources.flash_bytes"),
    (lambda d: d["overhead"]["ram"].pop("stack"), "overhead.ram.stack"),
    (lambda d: d["overhead"].update(estimate="yes"), "overhead.estimate"),
    (lambda d: d["platformio"].update(board=""), "platformio.board"),
    (lambda d: d.update(emulator={"kind": "renode", "machine": "x"}), "emulator.kind"),
    (lambda d: d["code"].update(dense_text_bytes=10**6), "code.dense_text_bytes"),
])
def test_malformed_board_file_names_path_and_field(board_file, change, field):
    path = board_file(change)
    with pytest.raises(BoardError) as error:
        load_board(path)
    message = str(error.value)
    assert str(path) in message and f"'{field}'" in message


def test_invalid_json_names_the_path_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "bad",\n  "mcu": }')
    with pytest.raises(BoardError, match=r"bad\.json: not valid JSON \(line 2"):
        load_board(path)


def test_a_malformed_file_in_the_catalogue_is_named_when_listing(tmp_path):
    for name in ("uno", "pico"):
        shutil.copy(BOARDS_DIR / f"{name}.json", tmp_path)
    (tmp_path / "pico.json").write_text((tmp_path / "pico.json").read_text().replace('"fpu": "none"', '"fpu": 0'))
    with pytest.raises(BoardError, match=r"pico\.json: field 'fpu'"):
        list_boards(tmp_path)


def test_unknown_board_suggests_the_closest_names():
    with pytest.raises(BoardError, match=r"unknown board 'mps2_an385'; did you mean mps2_an386, mps2_an500"):
        load_board("mps2_an385")


def test_cli_lists_every_board():
    result = CliRunner().invoke(main, ["boards"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines()[1:]}
    assert listed == set(board_names())
    assert re.search(r"^uno_sim\s+ATmega328P / avr5\s+16 MHz\s+2 KB\s+32 KB\s+simavr atmega328p\s+cycles$",
                     result.output, re.M)


def test_cli_shows_one_board_with_sources():
    result = CliRunner().invoke(main, ["boards", "netduinoplus2"])
    assert result.exit_code == 0
    assert "196,608 bytes" in result.output and "source: QEMU 7.2" in result.output


def test_cli_unknown_board_exits_non_zero_with_suggestions():
    result = CliRunner().invoke(main, ["boards", "esp32"])
    assert result.exit_code == 1
    assert "did you mean" in result.output and "esp32dev" in result.output
