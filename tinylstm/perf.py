"""Kernel performance on the emulated boards: exact instructions (QEMU) and cycles (simavr) per step.

For one model, kernel variant and board, ``measure`` builds a small benchmark firmware straight with the cross
compiler (``firmware_templates/bench``: no HIL, no UART), runs it in the board's emulator, and returns the count
of every step together with h and cell after every step and the final output, which the caller can check
against the integer reference (``check``).

- QEMU (Cortex-M): ``-icount shift=0`` and the TCG plugin ``boards/emulators/qemu_insn_count.c``, which records
  the guest's instruction count whenever the firmware enters ``bench_mark()``; the firmware writes its results
  to a host file through semihosting.
- simavr (AVR): the harness ``boards/emulators/simavr_bench.c`` runs the firmware to its end, copies UART0 to
  stdout and prints simavr's cycle counter at each write to GPIOR0.

A measurement's figure is the count between the two marks around a call, less the cost of an empty pair of
marks measured in the same firmware, so it is the call itself (for a step: every layer, the kernel's whole work).

Cortex-M firmware links with the board's memory map (``tinylstm.firmware.linker_script``), so it runs on every
emulated board. ``measure_cmsis_nn`` builds CMSIS-NN's arm_lstm_unidirectional_s8 from a checkout the user gives
(never part of this repository) with the same compiler and flags, for the suite's side-by-side comparison.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinylstm.boards import Board
from tinylstm.export import kernel_sources, render_c
from tinylstm.qmodel import QuantizedModel
from tinylstm.reference import Reference

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "firmware_templates" / "bench"
EMULATOR_SOURCES = REPO_ROOT / "boards" / "emulators"
PREFIX = "bm"

ARM_GCC, AVR_GCC = "arm-none-eabi-gcc", "avr-gcc"
# Flags used for every figure of a run (ours and any comparison built beside it).
ARM_FLAGS = ("-Ofast", "-mthumb")
AVR_FLAGS = ("-O2",)
WARNINGS = ("-std=c99", "-Wall", "-Wextra", "-Werror")


class PerfError(RuntimeError):
    """A benchmark firmware that does not build, or an emulator run that fails."""


@dataclass
class Measurement:
    """Counts per step (instructions on QEMU, cycles on simavr) and the state the device computed."""

    unit: str  # "instructions" or "cycles"
    steps: list[int]
    output_count: int  # the output() call (the dense head, or a copy of h)
    states: list[list[tuple[np.ndarray, np.ndarray]]]  # per step, per layer: (h, cell)
    output: np.ndarray
    text_bytes: int  # .text of the model's step code and kernel (flash constants excluded)
    compiler: str
    flags: tuple[str, ...]
    extra: dict = field(default_factory=dict)

    @property
    def steady_step(self) -> int:
        """The median step (steps differ by a few instructions with the data: activation and clamp branches)."""
        return int(np.median(self.steps[1:] if len(self.steps) > 1 else self.steps))


def macs_per_step(model: QuantizedModel) -> int:
    """Multiply-accumulates of one step: 4 gates x hidden x (input + hidden), summed over the layers."""
    return sum(4 * layer.hidden_size * (layer.input_size + layer.hidden_size) for layer in model.layers)


def compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def _bench_header(model: QuantizedModel, window: np.ndarray) -> str:
    hidden = ", ".join(str(layer.hidden_size) for layer in model.layers)
    values = ", ".join(str(int(v)) for v in np.asarray(window, dtype=np.int64).ravel())
    return (f'#include "{PREFIX}.h"\n#include "tinylstm_kernel.h"\n\n'
            f"static const int8_t bench_window[{window.size}] TINYLSTM_FLASH = {{{values}}};\n"
            f"static const uint16_t bench_hidden[{len(model.layers)}] = {{{hidden}}};\n")


def _write_sources(model: QuantizedModel, variant: str, window: np.ndarray, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    kernel = kernel_sources(variant)
    files = {**render_c(model, PREFIX, variant), **kernel, "bench_model.h": _bench_header(model, window)}
    for name, text in files.items():
        (directory / name).write_text(text)
    return [directory / f"{PREFIX}.c", *(directory / name for name in kernel if name.endswith(".c"))]


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, **kwargs)
    if result.returncode != 0:
        err = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
        raise PerfError(f"{what} failed ({result.returncode}): {err.strip()[-2000:]}")
    return result


def _text_size(objects: list[Path], size_tool: str) -> int:
    """Bytes of code (.text*) in object files."""
    total = 0
    for obj in objects:
        out = _run([size_tool, "-A", str(obj)], "size", text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith(".text") and parts[1].isdigit():
                total += int(parts[1])
    return total


def _parse_states(model: QuantizedModel, data: bytes) -> tuple[list, np.ndarray]:
    states, offset = [], 0
    for _ in range(model.input.window):
        step = []
        for layer in model.layers:
            H = layer.hidden_size
            h = np.frombuffer(data, np.int8, H, offset).astype(np.int64)
            c = np.frombuffer(data, "<i2", H, offset + H).astype(np.int64)
            offset += 3 * H
            step.append((h, c))
        states.append(step)
    output = np.frombuffer(data, np.int8, model.output_size, offset).astype(np.int64)
    if offset + model.output_size != len(data):
        raise PerfError(f"the firmware wrote {len(data)} bytes, expected {offset + model.output_size}")
    return states, output


def _counts(marks: list[int]) -> tuple[list[int], int]:
    """Steps and the output call from the marks: pairs around each call, the first pair around nothing, the
    last around output(); every figure less the empty pair."""
    if len(marks) % 2 or len(marks) < 6:
        raise PerfError(f"{len(marks)} marks: the firmware did not run to its end")
    pairs = [b - a for a, b in zip(marks[0::2], marks[1::2], strict=True)]
    empty = pairs[0]
    return [p - empty for p in pairs[1:-1]], pairs[-1] - empty


# ---- Cortex-M on QEMU ----------------------------------------------------------------------------------------

def _cached_tool(source_name: str, binary: Path, flags: list[str], what: str) -> Path:
    """A host tool compiled from ``boards/emulators/<source_name>`` into ``binary`` when missing or stale."""
    source = EMULATOR_SOURCES / source_name
    if not binary.is_file() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        # A private temporary name, so that concurrent builds (threads of one process too) never collide.
        tmp = binary.with_name(f".{binary.name}.{os.getpid()}.{threading.get_ident()}")
        _run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(source), *flags], what)
        tmp.replace(binary)
    return binary


def _compile_and_link(sources: list[Path], directory: Path, compile_command: list[str], link_flags: list[str],
                      include_dirs: tuple[Path, ...] = ()) -> tuple[Path, list[Path]]:
    """Compile ``sources`` (with ``directory`` and ``include_dirs`` on the include path) and link them into
    ``directory/bench.elf``; returns the ELF and the objects, in the order of ``sources``."""
    common = [*compile_command, "-ffunction-sections", "-fdata-sections", f"-I{directory}",
              *(f"-I{d}" for d in include_dirs)]
    objects = []
    for source in sources:
        obj = directory / f"{source.stem}.o"
        _run([*common, "-c", str(source), "-o", str(obj)], f"compiling {source.name}", text=True)
        objects.append(obj)
    elf = directory / "bench.elf"
    _run([*common, *link_flags, *map(str, objects), "-o", str(elf)], "linking", text=True)
    return elf, objects


def _copy_bench_files(names: tuple[str, ...], directory: Path) -> list[Path]:
    """Copy benchmark files of firmware_templates/bench into ``directory``; returns the copied C sources."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(BENCH_DIR / name, directory / name)
    return [directory / name for name in names if name.endswith(".c")]


def _build_bench(model: QuantizedModel, variant: str, window: np.ndarray, directory: Path,
                 bench_files: tuple[str, ...], compile_command: list[str], link_flags: list[str], size_tool: str
                 ) -> tuple[Path, int]:
    """Compile the model, its kernel and the benchmark main, and link them into ``directory/bench.elf``."""
    sources = _write_sources(model, variant, window, directory)
    elf, objects = _compile_and_link([*sources, *_copy_bench_files(bench_files, directory)], directory,
                                     compile_command, link_flags)
    return elf, _text_size(objects[:len(sources)], size_tool)


# The QEMU benchmark run-time (start-up, marks, semihosting output) every Cortex-M benchmark main links.
ARM_RUNTIME = ("bench_cortexm.h", "bench_cortexm_runtime.c")


def _arm_link_flags(board: Board, directory: Path) -> list[str]:
    """Link flags for a Cortex-M benchmark firmware, with the board's memory map (the HIL firmware's script)."""
    from tinylstm.firmware import FirmwareError, linker_script

    directory.mkdir(parents=True, exist_ok=True)
    try:
        (directory / "cortexm.ld").write_text(linker_script(board))
    except FirmwareError as e:
        raise PerfError(str(e)) from None
    return ["-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections",
            f"-T{directory / 'cortexm.ld'}"]


def plugin_path(cache: Path) -> Path:
    """The instruction-count plugin, compiled into ``cache`` when missing or older than its source."""
    return _cached_tool("qemu_insn_count.c", cache / "qemu_insn_count.so", ["-shared", "-fPIC"], "plugin build")


def arm_target_flags(board: Board) -> tuple[str, ...]:
    """The board's code-generation flags less -mthumb, which ARM_FLAGS gives."""
    return tuple(f for f in board.gcc_target_flags if f != "-mthumb")


def build_arm(model: QuantizedModel, variant: str, window: np.ndarray, directory: Path, board: Board,
              flags: tuple[str, ...] = ARM_FLAGS) -> tuple[Path, int]:
    """The QEMU benchmark firmware for ``model`` on ``board``; returns the ELF and the .text of model and kernel
    code."""
    return _build_bench(model, variant, window, directory, ("bench_cortexm.c", *ARM_RUNTIME),
                        [ARM_GCC, *WARNINGS, *arm_target_flags(board), *flags], _arm_link_flags(board, directory),
                        "arm-none-eabi-size")


def symbol_address(elf: Path, symbol: str, nm: str = "arm-none-eabi-nm") -> int:
    for line in _run([nm, str(elf)], "nm", text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == symbol:
            return int(parts[0], 16)
    raise PerfError(f"{elf}: no symbol {symbol}")


def run_qemu(elf: Path, machine: str, cache: Path, timeout: float = 300) -> tuple[list[int], bytes]:
    """Run a benchmark ELF to its end; returns the instruction counts at each mark and the file it wrote."""
    work = Path(tempfile.mkdtemp(prefix="qemu-", dir=elf.parent))
    marks_file = work / "marks.txt"
    marker = symbol_address(elf, "bench_mark")
    cmd = ["qemu-system-arm", "-M", machine, "-nographic", "-monitor", "none", "-nodefaults",
           "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
           "-plugin", f"{plugin_path(cache)},marker={marker:#x},out={marks_file}", "-kernel", str(elf)]
    try:
        _run(cmd, f"qemu {machine}", cwd=work, timeout=timeout)
        marks = [int(line.split()[1]) for line in marks_file.read_text().splitlines() if line.startswith("mark")]
        return marks, (work / "bench.out").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- AVR on simavr -------------------------------------------------------------------------------------------

def simavr_path(cache: Path) -> Path:
    """The simavr benchmark harness, compiled into ``cache`` when missing or older than its source."""
    return _cached_tool("simavr_bench.c", cache / "simavr_bench", ["-I/usr/include/simavr", "-lsimavr"],
                        "simavr harness build")


def build_avr(model: QuantizedModel, variant: str, window: np.ndarray, directory: Path,
              target_flags: tuple[str, ...] = ("-mmcu=atmega328p",), flags: tuple[str, ...] = AVR_FLAGS
              ) -> tuple[Path, int]:
    """The simavr benchmark firmware for ``model``; returns the ELF and the .text of model and kernel code."""
    return _build_bench(model, variant, window, directory, ("bench_avr.c",),
                        [AVR_GCC, *WARNINGS, *target_flags, *flags], ["-Wl,--gc-sections"], "avr-size")


def run_simavr(elf: Path, mcu: str, clock_hz: int, cache: Path, timeout: float = 300) -> tuple[list[int], bytes]:
    """Run a benchmark ELF to its end; returns simavr's cycle counter at each mark and the UART bytes."""
    result = _run([str(simavr_path(cache)), "-m", mcu, "-f", str(clock_hz), "-c", "/dev/stderr", str(elf)],
                  f"simavr {mcu}", timeout=timeout)
    marks = [int(line.split()[1]) for line in result.stderr.decode().splitlines() if line.startswith("mark ")]
    return marks, result.stdout


# ---- one measurement -----------------------------------------------------------------------------------------

def measure(model: QuantizedModel, variant: str, board: Board, window: np.ndarray, directory: Path,
            cache: Path) -> Measurement:
    """Build and run the benchmark firmware of ``model`` with ``variant`` on an emulated ``board``."""
    window = np.asarray(window, dtype=np.int8).reshape(model.input.window, model.input.features)
    if board.emulator is None:
        raise PerfError(f"{board.name} is not emulated")
    if board.emulator.kind == "qemu":
        elf, text = build_arm(model, variant, window, directory, board)
        marks, data = run_qemu(elf, board.emulator.machine, cache)
        unit, cc, flags = "instructions", ARM_GCC, (*arm_target_flags(board), *ARM_FLAGS)
    else:
        elf, text = build_avr(model, variant, window, directory, board.gcc_target_flags)
        marks, data = run_simavr(elf, board.emulator.machine, board.clock_hz, cache)
        unit, cc, flags = "cycles", AVR_GCC, (*board.gcc_target_flags, *AVR_FLAGS)
    steps, output_count = _counts(marks)
    states, output = _parse_states(model, data)
    return Measurement(unit, steps, output_count, states, output, text, compiler_version(cc), flags)


def check(model: QuantizedModel, window: np.ndarray, result: Measurement) -> None:
    """Raise PerfError unless the device's states after every step and its output equal the integer reference."""
    ref = Reference(model)
    for t, x_t in enumerate(np.asarray(window).reshape(model.input.window, -1)):
        ref.step(x_t)
        for n, (state, (h, c)) in enumerate(zip(ref.states, result.states[t], strict=True)):
            if not (np.array_equal(state.h[:, 0], h) and np.array_equal(state.c[:, 0], c)):
                raise PerfError(f"{model.name}: step {t}, layer {n}: the device's state differs from the reference")
    if not np.array_equal(ref.output(), result.output):
        raise PerfError(f"{model.name}: the device's output differs from the reference")


# ---- CMSIS-NN beside the tinylstm kernels ----------------------------------------------------------------------

# arm_lstm_unidirectional_s8 and every function it calls, in a CMSIS-NN checkout (v6.0.0 onwards).
CMSIS_NN_SOURCES = (
    "Source/LSTMFunctions/arm_lstm_unidirectional_s8.c",
    "Source/NNSupportFunctions/arm_nn_lstm_step_s8.c",
    "Source/NNSupportFunctions/arm_nn_lstm_calculate_gate_s8_s16.c",
    "Source/NNSupportFunctions/arm_nn_vec_mat_mul_result_acc_s8_s16.c",
    "Source/BasicMathFunctions/arm_elementwise_mul_s16.c",
    "Source/BasicMathFunctions/arm_elementwise_mul_acc_s16.c",
    "Source/BasicMathFunctions/arm_elementwise_mul_s16_s8.c",
    "Source/ActivationFunctions/arm_nn_activation_s16.c",
    "Source/NNSupportFunctions/arm_nntables.c",
)
CMSIS_NN_HEADER = "Include/arm_nnfunctions.h"
# Steps of the long call: CMSIS-NN's steady step is (call(CMSIS_NN_STEPS) - call(1)) / (CMSIS_NN_STEPS - 1).
CMSIS_NN_STEPS = 9
CMSIS_NN_METHOD = (f"(one call of {CMSIS_NN_STEPS} steps - one call of 1 step) / {CMSIS_NN_STEPS - 1}: each call "
                   "starts from the initial state, so the difference is its steady steps without the call's set-up")


def cmsis_nn_sources(checkout: Path) -> list[Path]:
    """The CMSIS-NN sources the comparison compiles, from ``checkout``; PerfError naming what is missing."""
    if not (checkout / CMSIS_NN_HEADER).is_file():
        raise PerfError(f"{checkout} is not a CMSIS-NN checkout: it has no {CMSIS_NN_HEADER}")
    missing = [name for name in CMSIS_NN_SOURCES if not (checkout / name).is_file()]
    if missing:
        raise PerfError(f"{checkout} lacks arm_lstm_unidirectional_s8: no {', '.join(missing)}")
    return [checkout / name for name in CMSIS_NN_SOURCES]


def cmsis_nn_revision(checkout: Path) -> str:
    """The checkout's commit as `git describe` gives it (tag, distance, abbreviated hash, -dirty), or "unknown"."""
    result = subprocess.run(["git", "-C", str(checkout), "describe", "--tags", "--always", "--dirty", "--abbrev=8"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown (not a git checkout)"


def _c_rows(rows: np.ndarray) -> str:
    """A C initializer of a 2-D integer array."""
    return "{" + ", ".join("{" + ", ".join(str(int(v)) for v in row) + "}" for row in rows) + "}"


def _cmsis_nn_header(model: QuantizedModel, window: np.ndarray) -> str:
    """bench_cmsis_nn_model.h: the layer of ``model`` as CMSIS-NN takes it, and the input samples."""
    if len(model.layers) != 1 or model.layers[0].per_channel:
        raise PerfError(f"{model.name}: the CMSIS-NN comparison takes one LSTM layer with per-tensor scales")
    layer = model.layers[0]
    wx, wh = layer.input_weights.astype(np.int64), layer.hidden_weights.astype(np.int64)
    constants = {
        "INPUT_SIZE": layer.input_size, "HIDDEN_SIZE": layer.hidden_size, "STEPS": len(window),
        "INPUT_ZERO_POINT": layer.input_zero_point, "OUTPUT_ZERO_POINT": layer.output_zero_point,
        "FORGET_TO_CELL_MULTIPLIER": layer.forget_to_cell_multiplier,
        "FORGET_TO_CELL_SHIFT": layer.forget_to_cell_shift,
        "INPUT_TO_CELL_MULTIPLIER": layer.input_to_cell_multiplier, "INPUT_TO_CELL_SHIFT": layer.input_to_cell_shift,
        "CELL_CLIP": layer.cell_clip,  # CMSIS-NN's own rule: 0 saturates the cell to the int16 range
        "CELL_SCALE_POWER": layer.cell_scale_power,
        "OUTPUT_MULTIPLIER": layer.output_multiplier, "OUTPUT_SHIFT": layer.output_shift,
    }
    scales = np.stack([layer.input_multiplier, layer.input_shift, layer.hidden_multiplier, layer.hidden_shift], 1)
    H, In = layer.hidden_size, layer.input_size
    arrays = [
        ("int8_t", "cm_window[CM_STEPS * CM_INPUT_SIZE]", "{" + ", ".join(map(str, window.ravel())) + "}"),
        ("int8_t", "cm_input_weights[4][CM_HIDDEN_SIZE * CM_INPUT_SIZE]", _c_rows(wx.reshape(4, H * In))),
        ("int8_t", "cm_hidden_weights[4][CM_HIDDEN_SIZE * CM_HIDDEN_SIZE]", _c_rows(wh.reshape(4, H * H))),
        ("int32_t", "cm_bias[4][CM_HIDDEN_SIZE]", _c_rows(layer.bias)),
        ("int32_t", "cm_input_bias[4][CM_HIDDEN_SIZE]",
         _c_rows(layer.bias.astype(np.int64) - layer.input_zero_point * wx.sum(axis=2))),
        ("int32_t", "cm_hidden_bias[4][CM_HIDDEN_SIZE]", _c_rows(-layer.output_zero_point * wh.sum(axis=2))),
        ("int32_t", "cm_scales[4][4]", _c_rows(scales)),
    ]
    lines = [f"/* {model.name} for CMSIS-NN (generated by tinylstm.perf). Gates: input, forget, cell, output; "
             "scales: input multiplier, shift, hidden multiplier, shift. */", "#include <stdint.h>", ""]
    lines += [f"#define CM_{name} ({value})" for name, value in constants.items()]
    lines += [""] + [f"static const {ctype} {declaration} = {init};" for ctype, declaration, init in arrays]
    return "\n".join(lines) + "\n"


@dataclass
class CmsisNNMeasurement:
    """CMSIS-NN's instructions for a call of 1 step and of CMSIS_NN_STEPS steps, and what it computed."""

    one_step_call: int
    long_call: int
    h: np.ndarray  # [CMSIS_NN_STEPS, hidden]: h after every step of the long call
    cell: np.ndarray  # after the long call

    @property
    def steady_step(self) -> int:
        return round((self.long_call - self.one_step_call) / (CMSIS_NN_STEPS - 1))


def measure_cmsis_nn(model: QuantizedModel, window: np.ndarray, checkout: Path, board: Board, directory: Path,
                     cache: Path) -> CmsisNNMeasurement:
    """Build CMSIS-NN's arm_lstm_unidirectional_s8 from ``checkout`` with the benchmark main bench_cmsis_nn.c on
    ``model`` (the first CMSIS_NN_STEPS samples of ``window``) and run it in ``board``'s QEMU machine."""
    sources = cmsis_nn_sources(checkout)
    window = np.asarray(window, dtype=np.int8).reshape(-1, model.input.features)[:CMSIS_NN_STEPS]
    if len(window) != CMSIS_NN_STEPS:
        raise PerfError(f"the CMSIS-NN comparison needs a window of at least {CMSIS_NN_STEPS} steps")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench_cmsis_nn_model.h").write_text(_cmsis_nn_header(model, window))
    main = _copy_bench_files(("bench_cmsis_nn.c", *ARM_RUNTIME), directory)
    elf, _ = _compile_and_link([*main, *sources], directory, [ARM_GCC, *WARNINGS, *arm_target_flags(board),
                                                              *ARM_FLAGS], _arm_link_flags(board, directory),
                               (checkout / "Include",))
    marks, data = run_qemu(elf, board.emulator.machine, cache)
    if len(marks) != 6:
        raise PerfError(f"CMSIS-NN firmware: {len(marks)} marks, expected 6: it did not run to its end")
    empty, one, long = (b - a for a, b in zip(marks[0::2], marks[1::2], strict=True))
    H = model.layers[0].hidden_size
    if len(data) != CMSIS_NN_STEPS * H + 2 * H:
        raise PerfError(f"CMSIS-NN firmware wrote {len(data)} bytes, expected {CMSIS_NN_STEPS * H + 2 * H}")
    h = np.frombuffer(data, np.int8, CMSIS_NN_STEPS * H).reshape(CMSIS_NN_STEPS, H).astype(np.int64)
    cell = np.frombuffer(data, "<i2", H, CMSIS_NN_STEPS * H).astype(np.int64)
    return CmsisNNMeasurement(one - empty, long - empty, h, cell)


def check_cmsis_nn(model: QuantizedModel, window: np.ndarray, result: CmsisNNMeasurement) -> None:
    """Raise PerfError unless CMSIS-NN's h after every step and its final cell equal the integer reference."""
    ref = Reference(model)
    for t, x_t in enumerate(np.asarray(window).reshape(-1, model.input.features)[:CMSIS_NN_STEPS]):
        ref.step(x_t)
        if not np.array_equal(ref.states[0].h[:, 0], result.h[t]):
            raise PerfError(f"{model.name}: step {t}: CMSIS-NN's h differs from the integer reference")
    if not np.array_equal(ref.states[0].c[:, 0], result.cell):
        raise PerfError(f"{model.name}: CMSIS-NN's cell differs from the integer reference")


# ---- the benchmark suite -------------------------------------------------------------------------------------

SUITE_SHAPES = ((3, 16), (6, 32), (12, 64), (32, 128))
DEMO_SHAPE = (6, 32)  # the demo model: input 6, hidden 32, window 100
SUITE_BOARDS = {"mps2_an386": ("reference", "arm_dsp"), "uno_sim": ("reference", "avr")}
SUITE_WINDOW = 8  # steps per shape (the figure is the median step after the first)


def suite_model(input_size: int, hidden: int, window: int, seed: int = 7) -> QuantizedModel:
    """A one-layer benchmark model with seeded random int8 weights and realistic constants: gate multipliers
    that put the gates in the order of one, TFLite's power-of-two cell scales, h at scale 1/128."""
    from tinylstm.qmodel import InputSpec, LSTMLayer
    from tinylstm.quantize import quantize_multiplier

    rng = np.random.default_rng(seed)
    spread = 74.0 * 74.0  # product of two uniform int8 standard deviations

    def gates(real: float) -> tuple[np.ndarray, np.ndarray]:
        pairs = [quantize_multiplier(real * float(rng.uniform(0.5, 2.0))) for _ in range(4)]
        return np.array([m for m, _ in pairs], np.int32), np.array([s for _, s in pairs], np.int32)

    mx, sx = gates(4096 / (spread * np.sqrt(input_size)))
    mh, sh = gates(4096 / (spread * np.sqrt(hidden)))
    cell_power = -11
    ftc, itc, out = (quantize_multiplier(r) for r in (2.0**-15, 2.0 ** (-30 - cell_power), 2.0**-30 * 128))
    layer = LSTMLayer(
        input_size=input_size, hidden_size=hidden, input_zero_point=int(rng.integers(-20, 20)),
        output_zero_point=int(rng.integers(-20, 20)), input_scale=1 / 64, output_scale=1 / 128,
        cell_scale_power=cell_power, cell_clip=0,
        input_weights=rng.integers(-128, 128, (4, hidden, input_size), dtype=np.int8),
        hidden_weights=rng.integers(-128, 128, (4, hidden, hidden), dtype=np.int8),
        bias=np.round(rng.normal(0, spread * np.sqrt(input_size), (4, hidden))).astype(np.int32),
        input_multiplier=mx, input_shift=sx, hidden_multiplier=mh, hidden_shift=sh,
        forget_to_cell_multiplier=ftc[0], forget_to_cell_shift=ftc[1],
        input_to_cell_multiplier=itc[0], input_to_cell_shift=itc[1], output_multiplier=out[0], output_shift=out[1])
    spec = InputSpec(features=input_size, window=window, scale=1 / 64, zero_point=layer.input_zero_point)
    model = QuantizedModel(spec, [layer], name=f"bench_{input_size}x{hidden}")
    model.validate()
    return model


def suite_window(model: QuantizedModel, seed: int = 3) -> np.ndarray:
    """Seeded uniform int8 inputs [window, features]."""
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, (model.input.window, model.input.features), dtype=np.int8)


def _fits(board: Board, model: QuantizedModel, variant: str) -> bool:
    from tinylstm.budget import plan
    from tinylstm.export import ModelShape

    return plan(board, ModelShape.from_model(model), variant=variant).fits


CMSIS_NN_BOARD = "mps2_an386"  # the board of the CMSIS-NN comparison
NOT_MEASURED = "not measured"


def run_suite(work: Path, cache: Path, log: Callable[[str], object] = print, cmsis_nn: Path | None = None,
              shapes: tuple[tuple[int, int], ...] = SUITE_SHAPES, boards: dict[str, tuple[str, ...]] | None = None,
              demo: bool = True) -> dict:
    """Measure every variant on every suite board over ``shapes`` and the demo shape; returns the records.

    ``cmsis_nn``: a CMSIS-NN checkout, whose arm_lstm_unidirectional_s8 is measured beside the kernels on
    CMSIS_NN_BOARD over ``shapes`` (without it the comparison says "not measured"). ``boards`` and ``demo``
    select part of the suite.
    """
    from tinylstm.boards import load_board
    from tinylstm.export import ModelShape, memory_layout

    boards = SUITE_BOARDS if boards is None else boards
    if cmsis_nn is not None:
        cmsis_nn_sources(cmsis_nn)  # a bad checkout fails before anything is measured
    records = []
    cases = [(f"{i}x{h}", i, h, SUITE_WINDOW) for i, h in shapes]
    if demo:
        cases.append(("demo 6x32, window 100", *DEMO_SHAPE, 100))
    for board_name, variants in boards.items():
        board = load_board(board_name)
        arch = "avr" if board.arch == "avr" else "arm"
        for label, input_size, hidden, window in cases:
            model = suite_model(input_size, hidden, window)
            windows = suite_window(model)
            for variant in variants:
                if not _fits(board, model, variant):
                    log(f"{board_name} {variant} {label}: does not fit the board, skipped")
                    continue
                directory = work / f"{board_name}-{variant}-{input_size}x{hidden}-w{window}"
                result = measure(model, variant, board, windows, directory, cache)
                check(model, windows, result)
                layout = memory_layout(ModelShape.from_model(model), arch, variant)
                record = {
                    "board": board_name, "variant": variant, "shape": label, "input": input_size, "hidden": hidden,
                    "window": window, "unit": result.unit, "per_step": result.steady_step,
                    "per_mac": round(result.steady_step / macs_per_step(model), 3),
                    "min_step": min(result.steps), "max_step": max(result.steps),
                    "code_bytes": result.text_bytes,
                    "flash_constants": sum(b.nbytes for b in layout if b.region == "flash"),
                    "ram_bytes": sum(b.nbytes for b in layout if b.region == "ram"),
                    "compiler": result.compiler, "flags": " ".join(result.flags), "bit_exact": True,
                }
                if result.unit == "cycles":
                    record["per_step_ms"] = round(1000 * result.steady_step / board.clock_hz, 3)
                records.append(record)
                log(f"{board_name} {variant:9} {label:22} {record['per_step']:>9,} {result.unit}/step "
                    f"{record['per_mac']:>7} /MAC  code {record['code_bytes']:,} B  RAM {record['ram_bytes']:,} B")
    suite = {"records": records,
             "cmsis_nn": {"status": NOT_MEASURED} if cmsis_nn is None else
             cmsis_nn_comparison(cmsis_nn, shapes, work, cache, log)}
    if "uno_sim" in boards:
        matrix = avr_matrix_cycles(work, cache)
        log(f"uno_sim avr: matrix part {matrix['per_mac']} cycles per MAC (marginal, {matrix['method']})")
        suite["avr_matrix"] = matrix
    return suite


def cmsis_nn_comparison(checkout: Path, shapes: tuple[tuple[int, int], ...], work: Path, cache: Path,
                        log: Callable[[str], object] = print) -> dict:
    """CMSIS-NN's arm_lstm_unidirectional_s8 from ``checkout`` on the suite models of ``shapes`` on CMSIS_NN_BOARD,
    each checked against the integer reference: instructions per steady step (CMSIS_NN_METHOD)."""
    from tinylstm.boards import load_board

    board = load_board(CMSIS_NN_BOARD)
    records = []
    for input_size, hidden in shapes:
        model = suite_model(input_size, hidden, CMSIS_NN_STEPS)  # the suite's constants whatever the window
        window = suite_window(model)
        result = measure_cmsis_nn(model, window, checkout, board, work / f"cmsis-nn-{input_size}x{hidden}", cache)
        check_cmsis_nn(model, window, result)
        records.append({"shape": f"{input_size}x{hidden}", "input": input_size, "hidden": hidden,
                        "per_step": result.steady_step, "one_step_call": result.one_step_call,
                        "long_call": result.long_call, "bit_exact": True})
        log(f"{CMSIS_NN_BOARD} cmsis_nn  {input_size}x{hidden:<20} {result.steady_step:>9,} instructions/step")
    return {"status": "measured", "function": "arm_lstm_unidirectional_s8", "revision": cmsis_nn_revision(checkout),
            "board": CMSIS_NN_BOARD, "unit": "instructions", "method": CMSIS_NN_METHOD,
            "compiler": compiler_version(ARM_GCC), "flags": " ".join((*arm_target_flags(board), *ARM_FLAGS)),
            "records": records}


def avr_matrix_cycles(work: Path, cache: Path) -> dict:
    """Cycles per multiply-accumulate of the AVR variant's matrix part: the step of (38, 32) less that of
    (6, 32), over the 4 x 32 x 32 extra multiply-accumulates (the gate part is the same for both)."""
    from tinylstm.boards import load_board

    board = load_board("uno_sim")
    steps = {}
    for input_size in (6, 38):
        model = suite_model(input_size, 32, SUITE_WINDOW)
        windows = suite_window(model)
        result = measure(model, "avr", board, windows, work / f"avr-matrix-{input_size}", cache)
        check(model, windows, result)
        steps[input_size] = result.steady_step
    extra = 4 * 32 * 32
    return {"per_mac": round((steps[38] - steps[6]) / extra, 3), "steps": steps,
            "method": "step(38x32) - step(6x32) over 4096 extra multiply-accumulates"}


SUITE_BEGIN, SUITE_END = "<!-- bench-suite:begin -->", "<!-- bench-suite:end -->"


def markdown_table(result: dict) -> str:
    """The suite's records as a Markdown table, with the compilers and flags that made them, and the CMSIS-NN
    comparison (or that it was not measured)."""
    lines = ["| board | variant | shape (input x hidden) | per step | per MAC | code (B) | flash constants (B) "
             "| RAM (B) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        unit = "instr." if r["unit"] == "instructions" else "cycles"
        step = f"{r['per_step']:,} {unit}" + (f" ({r['per_step_ms']} ms)" if "per_step_ms" in r else "")
        lines.append(f"| {r['board']} | {r['variant']} | {r['shape']} | {step} | {r['per_mac']} | "
                     f"{r['code_bytes']:,} | {r['flash_constants']:,} | {r['ram_bytes']:,} |")
    lines.append("")
    if "avr_matrix" in result:
        matrix = result["avr_matrix"]
        lines += [f"AVR matrix part: {matrix['per_mac']} cycles per multiply-accumulate ({matrix['method']}).", ""]
    builds = sorted({(r["board"], r["compiler"], r["flags"]) for r in result["records"]})
    lines += [f"- {board}: `{compiler}`, flags `{flags}`" for board, compiler, flags in builds]
    return "\n".join(lines + ["", *_cmsis_nn_table(result)]) + "\n"


def _cmsis_nn_table(result: dict) -> list[str]:
    """The CMSIS-NN column beside the tinylstm kernels on CMSIS_NN_BOARD, shape by shape."""
    cmsis = result["cmsis_nn"]
    measured = {r["shape"]: r["per_step"] for r in cmsis.get("records", [])}
    ours = {(r["variant"], r["shape"]): r["per_step"] for r in result["records"] if r["board"] == CMSIS_NN_BOARD}
    labels = [r["shape"] for r in result["records"] if r["board"] == CMSIS_NN_BOARD and r["window"] == SUITE_WINDOW]
    if cmsis["status"] == NOT_MEASURED:
        lines = [f"CMSIS-NN side by side ({CMSIS_NN_BOARD}, instructions per step): CMSIS-NN {NOT_MEASURED} (run "
                 "`tinylstm bench --suite --cmsis-nn DIR` with a CMSIS-NN checkout in DIR)."]
    else:
        lines = [f"CMSIS-NN side by side ({cmsis['board']}, instructions per step): `{cmsis['function']}` at "
                 f"`{cmsis['revision']}`, `{cmsis['compiler']}`, flags `{cmsis['flags']}`, its h after every step "
                 f"and its cell equal to the integer reference; steady step = {cmsis['method']}."]
    lines += ["", "| shape (input x hidden) | MACs per step | CMSIS-NN | tinylstm `arm_dsp` | ratio | "
              "tinylstm `reference` |", "|---|---|---|---|---|---|"]
    for label in dict.fromkeys([*labels, *measured]):
        input_size, hidden = (int(v) for v in label.split("x"))
        dsp, reference = ours.get(("arm_dsp", label)), ours.get(("reference", label))
        theirs = measured.get(label)
        ratio = f"{theirs / dsp:.2f}x" if theirs is not None and dsp else "-"
        lines.append(f"| ({input_size}, {hidden}) | {4 * hidden * (input_size + hidden):,} | "
                     f"{NOT_MEASURED if theirs is None else f'{theirs:,}'} | {'-' if dsp is None else f'{dsp:,}'} | "
                     f"{ratio} | {'-' if reference is None else f'{reference:,}'} |")
    return lines


def write_report(result: dict, json_path: Path, markdown_path: Path) -> None:
    """Write the JSON records, and the table between the suite markers of ``markdown_path`` (atomically)."""
    import json

    def replace_atomically(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)

    replace_atomically(json_path, json.dumps(result, indent=1) + "\n")
    text = markdown_path.read_text() if markdown_path.is_file() else f"{SUITE_BEGIN}\n{SUITE_END}\n"
    if SUITE_BEGIN not in text or SUITE_END not in text:
        raise PerfError(f"{markdown_path} has no {SUITE_BEGIN} ... {SUITE_END} section for the table")
    head, rest = text.split(SUITE_BEGIN, 1)
    _, tail = rest.split(SUITE_END, 1)
    replace_atomically(markdown_path, f"{head}{SUITE_BEGIN}\n{markdown_table(result)}{SUITE_END}{tail}")
