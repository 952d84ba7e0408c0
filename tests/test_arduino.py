"""The Arduino library zip: its layout, and its example sketch compiled for the Uno with Debian's Arduino core
and avr-gcc, then run in simavr on real test windows against the integer reference's classes."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import serial
from click.testing import CliRunner

from tests.random_models import random_model
from tinylstm import arduino, firmware, qmodel, reference
from tinylstm.cli import main
from tinylstm.data import DataSpec, load_dataset
from tinylstm.quantize import QuantConfig, quantize_checkpoint
from tinylstm.train import TrainConfig, train_model

ARDUINO_AVR = Path("/usr/share/arduino/hardware/arduino/avr")
REQUIRED_PROPERTIES = {"name", "version", "author", "maintainer", "sentence", "paragraph", "category", "url",
                       "architectures"}


def _members(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name).decode() for name in zf.namelist()}


def test_zip_is_an_arduino_library(tmp_path):
    model = random_model(7)
    model.name = "gesture v2"
    path = arduino.export_arduino(model, tmp_path, variant="reference", prefix="gesture")
    assert path == tmp_path / "tinylstm_gesture_v2.zip"
    files = _members(path)
    assert {name.split("/")[0] for name in files} == {"tinylstm_gesture_v2"}
    properties = dict(line.split("=", 1) for line in files["tinylstm_gesture_v2/library.properties"].splitlines())
    assert REQUIRED_PROPERTIES <= set(properties)
    assert properties["name"] == "tinylstm_gesture_v2" and properties["includes"] == "gesture.h"
    for name in ("gesture.h", "gesture.c", "tinylstm_kernel.h", "tinylstm_kernel.c"):
        assert f"tinylstm_gesture_v2/src/{name}" in files
    sketch = files["tinylstm_gesture_v2/examples/StreamSamples/StreamSamples.ino"]
    assert "#include <gesture.h>" in sketch and "gesture_step(x);" in sketch


def test_refuses_bad_names_and_existing_zips(tmp_path):
    model = random_model(3)
    with pytest.raises(arduino.ArduinoError, match="library name"):
        arduino.export_arduino(model, tmp_path, variant="avr", library="-bad name")
    path = arduino.export_arduino(model, tmp_path / "lib.zip", variant="avr")
    before = path.read_bytes()
    with pytest.raises(arduino.ArduinoError, match="exists"):
        arduino.export_arduino(random_model(4), path, variant="avr")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.zip"]


@pytest.mark.parametrize(("board", "variant", "kernel"), [("uno", "avr", "tinylstm_kernel_avr.h"),
                                                        ("nano33ble", "arm_dsp", "tinylstm_kernel_arm_dsp.c")])
def test_cli_zip_ships_the_sources_of_the_boards_firmware(tmp_path, board, variant, kernel):
    model = random_model(11, layers=2, outputs=3)
    qmodel.save(model, tmp_path / "m.npz")
    result = CliRunner().invoke(main, ["export", "--format", "arduino", "--model", str(tmp_path / "m.npz"),
                                       "--board", board, "--out", str(tmp_path / "zip")])
    assert result.exit_code == 0, result.output
    files = _members(tmp_path / "zip" / f"tinylstm_{model.name}.zip")
    project = firmware.generate_project(model, board, tmp_path / "fw")
    assert project.variant == variant
    shipped = {name.split("/src/")[1]: text for name, text in files.items() if "/src/" in name}
    assert kernel in shipped
    assert shipped == {name: (project.path / "src" / name).read_text() for name in shipped}
    assert f"Kernel: {variant}." in files[f"tinylstm_{model.name}/library.properties"]


def test_cli_arduino_export_needs_a_board(tmp_path):
    qmodel.save(random_model(3), tmp_path / "m.npz")
    args = ["export", "--format", "arduino", "--model", str(tmp_path / "m.npz"), "--out", str(tmp_path / "zip")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "give --board (e.g. uno" in result.output
    result = CliRunner().invoke(main, [*args, "--board", "unoo"])
    assert result.exit_code == 1 and "unoo" in result.output
    assert not (tmp_path / "zip").exists()


@pytest.fixture(scope="module")
def classifier():
    """A small BasicMotions classifier, quantized: its dataset is the truth the sketch is checked against."""
    dataset = load_dataset(DataSpec.for_dataset("basic_motions"))
    checkpoint, _ = train_model(dataset, [8], TrainConfig(epochs=40, lr=1e-2, batch_size=8))
    return quantize_checkpoint(checkpoint, QuantConfig(), dataset=dataset, name="basic_motions").qmodel, dataset


def _compile_for_uno(library: Path, build: Path) -> Path:
    """Compile the Arduino core, the library and the example sketch as the IDE does for an Uno; link an ELF."""
    flags = ["-mmcu=atmega328p", "-DF_CPU=16000000L", "-DARDUINO=10807", "-DARDUINO_AVR_UNO", "-DARDUINO_ARCH_AVR",
             "-Os", "-ffunction-sections", "-fdata-sections", "-Wall", f"-I{ARDUINO_AVR}/cores/arduino",
             f"-I{ARDUINO_AVR}/variants/standard", f"-I{library}/src"]
    cxx = ["avr-g++", *flags, "-std=gnu++11", "-fno-exceptions", "-fno-threadsafe-statics",
           "-DDECIMAL_DIG=__DECIMAL_DIG__"]  # gcc-avr 5.4's float.h omits DECIMAL_DIG for C++
    sketch = build / "StreamSamples.ino.cpp"  # what the IDE's preprocessor makes of the .ino
    sketch.write_text('#include <Arduino.h>\n#line 1 "StreamSamples.ino"\n'
                      + (library / "examples" / "StreamSamples" / "StreamSamples.ino").read_text())
    jobs = [(["avr-gcc", *flags, "-std=gnu11"], src) for src in
            [*(ARDUINO_AVR / "cores" / "arduino").glob("*.c"), *(library / "src").glob("*.c")]]
    jobs += [(cxx, src) for src in [*(ARDUINO_AVR / "cores" / "arduino").glob("*.cpp"), sketch]]
    jobs += [(["avr-gcc", *flags, "-x", "assembler-with-cpp"], src)
             for src in (ARDUINO_AVR / "cores" / "arduino").glob("*.S")]
    objects = []
    for command, src in jobs:
        obj = build / f"{src.name}.o"
        result = subprocess.run([*command, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert result.returncode == 0, f"{src.name}: {result.stderr}"
        objects.append(str(obj))
    elf = build / "StreamSamples.elf"
    subprocess.run(["avr-gcc", "-mmcu=atmega328p", "-Os", "-Wl,--gc-sections", "-o", str(elf), *objects, "-lm"],
                   check=True)
    return elf


@pytest.mark.slow
@pytest.mark.skipif(not ARDUINO_AVR.is_dir() or shutil.which("avr-g++") is None,
                    reason="needs Debian's arduino-core-avr and gcc-avr")
def test_example_sketch_compiles_for_the_uno_and_classifies_in_simavr(tmp_path, classifier):
    from tinylstm import firmware

    model, dataset = classifier
    with zipfile.ZipFile(arduino.export_arduino(model, tmp_path, variant="avr")) as zf:
        zf.extractall(tmp_path / "libraries")
    build = tmp_path / "build"
    build.mkdir()
    elf = _compile_for_uno(tmp_path / "libraries" / "tinylstm_basic_motions", build)
    size = subprocess.run(["avr-size", "-B", "-d", str(elf)], capture_output=True, text=True, check=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    assert text + data <= 32256 and data + bss <= 2048 - 256  # the Uno's flash after optiboot; RAM with a stack

    # One test window of each class the host predicts, so a sketch stuck on one answer fails.
    predicted = reference.run_batch(model, model.quantize_input(dataset.test.x)).argmax(axis=1)
    picks = [int(np.flatnonzero(predicted == c)[0]) for c in np.unique(predicted)]
    assert len(picks) >= 3
    windows, expected = dataset.test.x[picks], predicted[picks]
    with firmware.start_emulator("uno_sim", elf) as emulator:
        port = serial.serial_for_url(emulator.url, baudrate=115200, timeout=5)
        port.read_until(b">")  # the start-up banner, unless it went out before the port was open
        port.timeout = 30
        for window, label in zip(windows, expected, strict=True):
            replies = b""
            for sample in window:  # the sketch answers '>' when it is ready for the next sample
                port.write((",".join(f"{v:.7g}" for v in sample) + "\n").encode())
                replies += port.read_until(b">")
                assert replies.endswith(b">"), replies
            lines = [line for line in replies.decode().replace(">", "").splitlines() if line.strip()]
            assert lines == [f"class: {dataset.classes[label]}"]
        port.close()


def _functions(obj: Path) -> dict[str, str]:
    """Each function of an object file compiled with -ffunction-sections: its disassembly with relocations (the
    bytes, and the symbol each address refers to)."""
    names = [line.split()[-1] for line in subprocess.run(["avr-nm", "--defined-only", str(obj)], capture_output=True,
                                                         text=True, check=True).stdout.splitlines()
             if line.split()[1] in "Tt"]
    out = {}
    for name in names:
        text = subprocess.run(["avr-objdump", "-d", "-r", "-j", f".text.{name}", str(obj)], capture_output=True,
                              text=True, check=True).stdout
        out[name] = text.split("Disassembly of section", 1)[1]  # after the header naming the file
    return out


def _sizes(elf: Path, names: set[str]) -> dict[str, int]:
    lines = subprocess.run(["avr-nm", "-S", "--defined-only", str(elf)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return {f[3]: int(f[1], 16) for f in (line.split() for line in lines) if len(f) == 4 and f[3] in names}


@pytest.mark.slow
@pytest.mark.skipif(not ARDUINO_AVR.is_dir() or shutil.which("avr-g++") is None,
                    reason="needs Debian's arduino-core-avr and gcc-avr")
def test_sketch_for_the_uno_runs_the_step_routine_of_the_uno_firmware(tmp_path):
    model = random_model(11, layers=2, input_size=6, hidden_sizes=(8, 8), outputs=3, window=20, extreme=0.0)
    qmodel.save(model, tmp_path / "m.npz")
    result = CliRunner().invoke(main, ["export", "--format", "arduino", "--model", str(tmp_path / "m.npz"),
                                       "--board", "uno", "--out", str(tmp_path / "lib.zip")])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "lib.zip") as zf:
        zf.extractall(tmp_path / "libraries")
    build = tmp_path / "build"
    build.mkdir()
    sketch = _compile_for_uno(tmp_path / "libraries" / f"tinylstm_{model.name}", build)  # the IDE's flags
    built = firmware.build(firmware.generate_project(model, "uno_sim", tmp_path / "fw"))  # PlatformIO's
    objects = built.elf.parent / "src"

    for source in ("tinylstm_model", "tinylstm_kernel"):
        ours, theirs = _functions(build / f"{source}.c.o"), _functions(objects / f"{source}.o")
        assert set(ours) == set(theirs) and ours == theirs, source
    steps = set(_functions(objects / "tinylstm_model.o"))
    assert {"tinylstm_model_step", "tl_avr_layer"} <= steps  # the avr kernel's layer routine, not the reference's
    # The linked sketch holds the step routine at the size the firmware links it.
    linked = {"tinylstm_model_step", "tl_avr_layer", "tl_avr_requantize", "tl_avr_sigmoid", "tl_avr_tanh"}
    assert _sizes(sketch, linked) == _sizes(built.elf, linked) and len(_sizes(sketch, linked)) == len(linked)
