"""The HIL benchmark: BENCH on the emulated boards, `tinylstm bench` end to end (train, quantize, build, flash,
bench 50 windows; every output equal to the integer reference; the JSON report valid against its schema),
the Uno's BENCH count against simavr's own cycle count, and clear, bounded host-side errors."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_quantize import sine_csv
from tinylstm import bench, firmware, hil
from tinylstm.cli import main
from tinylstm.data import DataSpec, load_dataset
from tinylstm.qmodel import save
from tinylstm.quantize import QuantConfig, quantize_checkpoint
from tinylstm.reference import run_batch
from tinylstm.train import TrainConfig, train_model

SCHEMA = json.loads(bench.SCHEMA_PATH.read_text())
WINDOWS = 50


def test_schema_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_seeded_windows_follow_marsaglias_xorshift32():
    """The first state 2463534242 gives 723471715 (Marsaglia, "Xorshift RNGs", 2003); a byte is its top byte."""
    seed = 2463534242 ^ 0x9E3779B9  # window 0 starts from seed ^ (1 * 0x9E3779B9)
    x = hil.seeded_windows(seed, 0, 1, 1, 1)
    assert int(x[0, 0, 0]) == np.int8(np.uint8(723471715 >> 24))
    # Windows are addressed by index: a batch starting at 3 is the tail of a batch starting at 0.
    np.testing.assert_array_equal(hil.seeded_windows(9, 3, 2, 4, 3), hil.seeded_windows(9, 0, 5, 4, 3)[3:])


def _info_payload(window=4, input_size=2, output_size=1, max_payload=128):
    """An INFO record as docs/hil-protocol.md lays it out."""
    board = b"fake"
    return (struct.pack("<BB16sHHHBIIBHI", 1, 0, b"0123456789abcdef", input_size, window, output_size, 1,
                        16_000_000, 16_000_000, 1, max_payload, 0xFFFFFFFF) + bytes([len(board)]) + board)


def test_device_that_stops_answering_bench_times_out_clearly():
    """A device that answers INFO but never BENCH: HILTimeout within the request's timeout, not a hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def info_only() -> None:
        connection, _ = server.accept()
        buffer = b""
        with connection:
            while chunk := connection.recv(4096):
                buffer += chunk
                *frames, buffer = buffer.split(b"\x00")
                for encoded in filter(None, frames):
                    frame = hil.decode_frame(encoded)
                    if frame.command == hil.CMD_INFO:
                        connection.sendall(hil.encode_frame(hil.CMD_INFO | hil.REPLY, frame.sequence,
                                                            _info_payload()))

    threading.Thread(target=info_only, daemon=True).start()
    with hil.connect(f"socket://127.0.0.1:{server.getsockname()[1]}", timeout=0.5, retries=1,
                     ready_timeout=3) as device:
        assert device.info.board == "fake" and device.info.free_ram is None
        start = time.monotonic()
        with pytest.raises(hil.HILTimeout, match=r"no reply to command 0x06 .* within 0.5 s \(2 attempts\)"):
            device.bench_seeded(2, seed=1, timeout=0.5)
        assert time.monotonic() - start < 3
    server.close()


def test_bench_cli_missing_port_is_a_clear_error(tmp_path):
    model = bench.synthetic_model(2, [3], 4, 2)
    path = save(model, tmp_path / "m.npz")
    start = time.monotonic()
    result = CliRunner().invoke(main, ["bench", "--model", str(path), "--board", "uno",
                                       "--port", "/dev/tinylstm-no-such-port"])
    assert result.exit_code == 1 and "serial port /dev/tinylstm-no-such-port does not exist" in result.output
    result = CliRunner().invoke(main, ["bench", "--model", str(path), "--board", "uno"])
    assert result.exit_code == 1 and "uno is a real board: give its serial port (--port)" in result.output
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A small forecaster trained and quantized as a user would (hidden 8, window 16)."""
    tmp = tmp_path_factory.mktemp("bench")
    ds = load_dataset(DataSpec(task="forecasting", path=str(sine_csv(tmp)), features=["v"], target="v", window=16))
    ckpt, _ = train_model(ds, [8], TrainConfig(epochs=5, lr=1e-2, batch_size=64, patience=5))
    result = quantize_checkpoint(ckpt, QuantConfig(), dataset=ds, name="sine8")
    return result.qmodel, save(result.qmodel, tmp / "sine8.npz")


def _bench_emulators() -> list:
    """Emulators still running a firmware that run_bench built (in its tinylstm-bench-* work directory)."""
    def command(pid: int) -> bytes:
        try:
            return open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            return b""

    return [e for e in firmware.running_emulators() if b"tinylstm-bench-" in command(e.pid)]


@pytest.mark.slow
@pytest.mark.parametrize("board", ["uno_sim", "mps2_an386"])
def test_bench_cli_end_to_end(board, trained_model, tmp_path):
    model, path = trained_model
    out = {k: tmp_path / f"report.{k}" for k in ("json", "md", "png")}
    result = CliRunner().invoke(main, ["bench", "--model", str(path), "--board", board, "--windows", str(WINDOWS),
                                       "--json", str(out["json"]), "--markdown", str(out["md"]),
                                       "--plot", str(out["png"])])
    assert result.exit_code == 0, result.output
    report = json.loads(out["json"].read_text())
    jsonschema.validate(report, SCHEMA)
    (entry,) = report["models"]
    assert entry["windows"] == WINDOWS and entry["mismatches"] == 0 and entry["first_mismatch"] is None
    assert entry["source"] == "data" and entry["hash"] == model.digest()
    # The device ran the held-out windows: its metric is the integer reference's on the same windows.
    accuracy = entry["accuracy"]
    assert accuracy["windows"] == WINDOWS and accuracy["device"] == accuracy["host_int8"]
    assert report["board"]["unit"] == ("cycles" if board == "uno_sim" else "instructions")
    assert (entry["latency"]["us_per_window"] is None) == (board != "uno_sim")
    assert "QEMU" in entry["latency"]["note"] or board == "uno_sim"
    assert entry["firmware"]["ram"] <= (2048 if board == "uno_sim" else 4 * 2**20)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sine8 | 8 | 50 | data | 0 |" in out["md"].read_text()
    assert not _bench_emulators()


@pytest.fixture(scope="module")
def uno_device(tmp_path_factory):
    """A synthetic model on uno_sim, with its emulator (for the harness's cycle log) and a connected client."""
    model = bench.synthetic_model(3, [6], 5, 2, seed=4)
    result = firmware.build(firmware.generate_project(model, "uno_sim", tmp_path_factory.mktemp("uno")))
    with firmware.start_emulator("uno_sim", result.elf) as emulator, \
            hil.connect(emulator.url, baudrate=firmware.SIMAVR_BAUD, timeout=30) as device:
        yield model, emulator, device
    assert not emulator.running()


@pytest.mark.slow
def test_uno_bench_counts_match_simavr(uno_device):
    """BENCH's count for a window equals simavr's own count of the same code: the reset, each step and the output
    are measured apart, so the harness logs window + 2 marker pairs, each less the empty measurement."""
    model, emulator, device = uno_device
    before = len(emulator.harness_cycles())
    result = device.bench_seeded(1, seed=77)
    cycles = emulator.harness_cycles()
    parts = cycles[before:]
    assert len(parts) == model.input.window + 2
    assert result.counts[0] == sum(parts) - len(parts) * cycles[0]  # cycles[0]: the boot calibration
    np.testing.assert_array_equal(result.outputs, run_batch(model, hil.seeded_windows(77, 0, 1, 5, 3)))


@pytest.mark.slow
def test_bench_sources_and_batches_bit_exact(uno_device):
    """Seeded and uploaded BENCH requests in batches, and the library's driver, all match the reference."""
    model, _, device = uno_device
    capacity = device.bench_capacity(uploaded=False)
    assert capacity >= 2
    seeded = device.bench_seeded(capacity, seed=5, first=11)
    windows = hil.seeded_windows(5, 11, capacity, model.input.window, model.input.features)
    np.testing.assert_array_equal(seeded.outputs, run_batch(model, windows))
    n = device.bench_capacity(uploaded=True)
    uploaded = device.bench_windows(windows[:n])
    np.testing.assert_array_equal(uploaded.outputs, seeded.outputs[:n])
    counts_only = device.bench_seeded(2, seed=5, first=11, outputs=False)
    assert counts_only.outputs is None and np.all(counts_only.counts < seeded.counts[:2])  # no output computed
    with pytest.raises(hil.DeviceError) as too_many:
        device.request(hil.CMD_BENCH, struct.pack("<BBHII", 0, 1, capacity + 1, 5, 0))
    assert too_many.value.code == 2
    with pytest.raises(hil.DeviceError) as unknown:
        device.request(hil.CMD_BENCH, struct.pack("<BBH", 7, 1, 1))
    assert unknown.value.code == 9
    entry = bench.bench_model(device, model, windows=30, source="seed", seed=3)
    assert entry["mismatches"] == 0 and entry["method"] == "BENCH seeded" and entry["windows"] == 30


def test_bench_needs_models_or_the_suite():
    from click.testing import CliRunner

    from tinylstm.cli import main

    missing = CliRunner().invoke(main, ["bench"])
    assert missing.exit_code == 2 and "give --model and --board (or --suite)" in missing.output
    mixed = CliRunner().invoke(main, ["bench", "--suite", "--board", "uno_sim"])
    assert mixed.exit_code == 2 and "drop --model/--board" in mixed.output
