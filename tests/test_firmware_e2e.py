"""End to end on the emulated boards: generate a PlatformIO project, build it with `pio run` (offline), start the
emulator, and check over the HIL protocol that the device's output bytes equal the published CMSIS-NN vectors,
the regression vectors and the integer reference, bit for bit, for whole windows (RUN) and step-by-step streaming
after a RESET.

Each board builds its models into as few firmwares as fit (several models per firmware, selected by hash), once
with the reference kernel and once with the board's optimized kernel variant (export.default_variant): the
variants are proven bit-exact on the device, through the same HIL path.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.cmsis_vectors import VECTOR_FILES, load_case
from tests.random_models import random_model, random_windows
from tests.regression_vectors import regression_cases
from tinylstm import budget, export, firmware, hil
from tinylstm.boards import load_board
from tinylstm.export import ModelShape
from tinylstm.reference import Reference

pytestmark = pytest.mark.slow

BOARDS = ["uno_sim", "mps2_an386", "netduinoplus2"]
# (board, kernel variant): the reference and the board's fastest variant on each board.
BUILDS = [(board, variant) for board in BOARDS
          for variant in ("reference", export.default_variant(load_board(board).arch, load_board(board).dsp))]
RANDOM_MODELS = 20
RANDOM_WINDOWS = 2


def _random_models(board: str, variant: str) -> list:
    """At least RANDOM_MODELS seeded random models that the planner says fit the board. The Uno gets short
    windows so the cycle-exact simulation stays quick."""
    b = load_board(board)
    models = []
    seed = 1000
    while len(models) < RANDOM_MODELS:
        window = 3 + seed % 10 if b.arch == "avr" else None
        model = random_model(seed, window=window, big=0.0)
        seed += 1
        if budget.plan(b, ModelShape.from_model(model), variant=variant).fits:
            models.append(model)
    return models


def _groups(board: str, variant: str, models: list) -> list[list]:
    """Models packed into firmwares: a group grows while its models' own parts (from the planner) take at most
    90% (optimized variants: 60%) of what the board has left after the firmware overhead and the shared kernel."""
    b = load_board(board)
    # The optimized variants' static helpers are compiled into each model's source, which the planner's
    # once-per-firmware kernel code does not count: their groups are filled less.
    fill = 0.9 if variant == "reference" else 0.6
    groups: list[list] = []
    used = {"flash": 0, "ram": 0}
    for model in models:
        p = budget.plan(b, ModelShape.from_model(model), variant=variant)
        need, room = {}, {}
        for resource in (p.flash, p.ram):
            region = resource.region
            kernel = sum(i.nbytes for i in p.items if i.region == region and i.part == "kernel")
            need[region] = resource.model - kernel
            room[region] = fill * (resource.capacity - resource.overhead - kernel)
        if groups and all(used[r] + need[r] <= room[r] for r in used):
            groups[-1].append(model)
            used = {r: used[r] + need[r] for r in used}
        else:
            groups.append([model])
            used = dict(need)
    return groups


@pytest.fixture(scope="module", params=BUILDS, ids=[f"{b}-{v}" for b, v in BUILDS])
def board_firmwares(request, tmp_path_factory):
    """(board, cases, [(elf, models)]) with every vector and random model built for the board with the variant."""
    board, variant = request.param
    cases = [load_case(path) for path in VECTOR_FILES] + [r.case for r in regression_cases()]
    models = [c.model for c in cases] + _random_models(board, variant)
    builds = []
    for n, group in enumerate(_groups(board, variant, models)):
        project = firmware.generate_project(group, board, tmp_path_factory.mktemp(f"{board}-{variant}-{n}"),
                                            variant=variant)
        assert project.variant == variant
        result = firmware.build(project)
        assert result.sizes.ram <= load_board(board).ram_bytes
        builds.append((result.elf, group))
    return board, cases, builds


@pytest.fixture
def device_factory():
    """Starts emulators and connects to them; everything is stopped at the end of the test."""
    started = []

    def start(board, elf):
        emulator = firmware.start_emulator(board, elf)
        started.append(emulator)
        client = hil.connect(emulator.url, timeout=60, ready_timeout=20)
        started.append(client)
        return emulator, client

    yield start
    for thing in reversed(started):
        thing.close() if isinstance(thing, hil.HILClient) else thing.stop()
    assert not any(t.running() for t in started if isinstance(t, firmware.Emulator))


def test_models_bit_exact(board_firmwares, device_factory):
    board, cases, builds = board_firmwares
    vector_expected = {c.model.digest(): c for c in cases}
    checked = 0
    rails = {-32768: 0, 32767: 0}  # steps of the streamed random windows with an unclipped cell at a rail
    for elf, group in builds:
        _, device = device_factory(board, elf)
        assert device.info.board == board and device.info.model_count == len(group)
        for model in group:
            digest = model.digest()
            info = device.select(digest)
            assert info.model_hash == digest
            assert (info.input_size, info.window, info.output_size) == (
                model.input.features, model.input.window, model.output_size)
            case = vector_expected.get(digest)
            windows = case.inputs if case is not None else random_windows(int(model.name.split("_")[1]), model,
                                                                           RANDOM_WINDOWS)
            reference = Reference(model)
            for n, window in enumerate(windows):
                result = device.run(window)
                expected = case.expected[n][-1] if case is not None else reference.run(window)
                np.testing.assert_array_equal(result.output, expected, err_msg=f"{board} {model.name} RUN {n}")
                assert result.counts > 0 and result.steps == len(window)
            # Streaming: RESET, then one STEP per sample with the output after each.
            window = windows[0]
            device.reset()
            reference.reset()
            for t, x_t in enumerate(window):
                reference.step(x_t)
                step = device.step(x_t)
                expected = case.expected[0][t] if case is not None else reference.output()
                np.testing.assert_array_equal(step.output, expected, err_msg=f"{board} {model.name} step {t}")
                for layer, state in zip(model.layers, reference.states, strict=True):
                    if case is None and layer.cell_clip == 0:
                        rails = {rail: count + int(np.sum(state.c == rail)) for rail, count in rails.items()}
            checked += 1
    assert checked == len(cases) + RANDOM_MODELS
    # The random models drive unclipped cells to both ends of the int16 range (tests/random_models.py).
    assert all(rails.values()), f"cells at the rails: {rails}"


def test_protocol_robustness(board_firmwares, device_factory):
    """Garbage, truncated and corrupt frames, an oversized frame and a wrong model hash give error frames or are
    dropped, and the device still answers RUN correctly afterwards."""
    board, cases, builds = board_firmwares
    elf, group = builds[0]
    _, device = device_factory(board, elf)
    model = group[0]
    device.select(model.digest())
    port = device.port

    def errors_after(raw: bytes, seconds: float = 1.0) -> list[int]:
        port.write(raw)
        return [f.payload[0] for f in device._frames(seconds) if f.command == hil.CMD_ERROR]

    rng = np.random.default_rng(5)
    garbage = bytes(rng.integers(1, 256, size=300, dtype=np.uint8)) + b"\x00"
    assert set(errors_after(garbage)) <= {1, 2, 6, 7}  # dropped as a bad frame, whatever it decodes to
    good = hil.encode_frame(hil.CMD_INFO, 9)
    assert errors_after(good[: len(good) // 2] + b"\x00") in ([1], [2], [7])  # truncated
    corrupt = bytearray(hil.cobs_decode(good[:-1]))
    corrupt[-1] ^= 0x55
    assert errors_after(hil.cobs_encode(bytes(corrupt)) + b"\x00") == [1]  # bad CRC
    # far beyond the receive buffer; an emulated UART on a loaded machine takes a while to swallow 5000 bytes
    assert errors_after(b"\x07" * 5000 + b"\x00", seconds=5.0) == [6]
    assert errors_after(hil.encode_frame(0x42, 9)) == [3]  # unknown command
    assert errors_after(hil.encode_frame(hil.CMD_INFO, 9, version=2)) == [5]
    with pytest.raises(hil.DeviceError) as wrong:
        device.select("0123456789abcdef")
    assert wrong.value.code == 4
    with pytest.raises(hil.DeviceError) as short:
        device.request(hil.CMD_STEP, b"\x01")
    assert short.value.code == 2

    window = random_windows(77, model, 1)[0]
    np.testing.assert_array_equal(device.run(window).output, Reference(model).run(window))


def test_uno_cycles_match_simavr(board_firmwares, device_factory):
    """The device's Timer1 count for a window equals simavr's own cycle count for the same code."""
    board, _, builds = board_firmwares
    if board != "uno_sim":
        pytest.skip("cycle-exact check is for the simavr board")
    elf, group = builds[0]
    emulator, device = device_factory(board, elf)
    model = group[0]
    device.select(model.digest())
    window = random_windows(3, model, 1)[0][: max(1, (device.info.max_payload - 1) // model.input.features)]
    before = len(emulator.harness_cycles())
    result = device.run(window)
    cycles = emulator.harness_cycles()
    # The first marker pair is the firmware's empty calibration measurement.
    assert len(cycles) == before + 1
    assert result.counts == cycles[-1] - cycles[0]
