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

from tests.random_models import random_model
from tinylstm import arduino, reference
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
    path = arduino.export_arduino(model, tmp_path, prefix="gesture")
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
        arduino.export_arduino(model, tmp_path, library="-bad name")
    path = arduino.export_arduino(model, tmp_path / "lib.zip")
    before = path.read_bytes()
    with pytest.raises(arduino.ArduinoError, match="exists"):
        arduino.export_arduino(random_model(4), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.zip"]


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
    with zipfile.ZipFile(arduino.export_arduino(model, tmp_path)) as zf:
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
