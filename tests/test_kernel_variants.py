"""The optimized kernel variants (arm_dsp, avr) against the integer reference and the published vectors.

- On the host: every variant's generated code, with the portable definitions of its instructions, over the 19
  vectors, the regression vectors and the 220+ random models of test_export_c (every h and cell after every
  step, the output, run()).
- In the emulators (slow): the real instructions, arm_dsp in QEMU mps2-an386 and avr in simavr, over the vectors
  and random models (h and cell after every step and the output, read back from the device); the regression
  vectors with every kernel of both boards.
- The memory layout the planner uses matches the compilers' symbol tables for every variant.
- The speed the variants exist for: instructions per step on QEMU, cycles per multiply-accumulate on simavr.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.random_models import random_model, random_windows
from tests.test_export_c import (
    HOST_FLAGS,
    LAYOUT_SHAPES,
    HostProgram,
    _compile_all,
    _cross_flags,
    _data_objects,
    _model_with_shape,
    _write_sources,
    check_models_against_reference,
    check_regression_vectors,
    program_models,
    random_cases,  # noqa: F401 (fixture)
    regression_cases,  # noqa: F401 (fixture)
    vector_cases,  # noqa: F401 (fixture)
)
from tests.test_export_c import test_random_models_match_reference as _check_random_models
from tests.test_export_c import test_vectors_bit_exact_on_host as _check_vectors
from tinylstm import firmware, perf
from tinylstm.boards import load_board
from tinylstm.budget import PlanError, plan
from tinylstm.export import (
    ExportError,
    ModelShape,
    _dsp_constants,
    default_variant,
    memory_layout,
    render_c,
)
from tinylstm.reference import sigmoid_q15, tanh_q15

OPTIMIZED = ("arm_dsp", "avr")
needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc")),
                                reason="qemu-system-arm or arm-none-eabi-gcc missing")
needs_simavr = pytest.mark.skipif(not (Path("/usr/include/simavr/sim_avr.h").is_file() and shutil.which("avr-gcc")),
                                  reason="simavr headers or avr-gcc missing")


@pytest.fixture(scope="module", params=OPTIMIZED)
def variant_program(request, tmp_path_factory, vector_cases, regression_cases, random_cases  # noqa: F811
                    ) -> HostProgram:
    return HostProgram(program_models(vector_cases, regression_cases, random_cases),
                       tmp_path_factory.mktemp(f"host_{request.param}"), request.param)


def test_variant_vectors_bit_exact_on_host(variant_program, vector_cases) -> None:  # noqa: F811
    _check_vectors(variant_program, vector_cases)


def test_variant_regression_vectors_on_host(variant_program, regression_cases) -> None:  # noqa: F811
    check_regression_vectors(variant_program, regression_cases)


def test_variant_random_models_match_reference_on_host(variant_program, random_cases) -> None:  # noqa: F811
    _check_random_models(variant_program, random_cases)


@pytest.mark.parametrize("variant", OPTIMIZED)
def test_variant_long_rows_match_reference_on_host(variant: str, tmp_path: Path) -> None:
    """Rows longer than one pass of the matrix loop (255 inputs on AVR, 504 with the DSP kernel): an input of 600
    and a hidden size of 300, so both halves take several passes."""
    models = {"wide": random_model(41, input_size=600, hidden_sizes=(5,), outputs=3, window=3),
              "deep": random_model(42, input_size=2, hidden_sizes=(300,), outputs=None, window=2, per_channel=True)}
    cases = [(model, random_windows(43 + k, model, 2)) for k, model in enumerate(models.values())]
    program = HostProgram({f"r{k}": m for k, m in enumerate(models.values())}, tmp_path, variant)
    check_models_against_reference(program, cases)


_ACTIVATION_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "tinylstm_kernel_arm_dsp.h"

/*
 * tl_dsp_sigmoid of every int16, then tl_dsp_tanh of every int16 for each left shift in [-31, 11], with its input
 * scaled as tl_dsp_layer scales the cell ((c * multiplier + round) >> shift, from argv per shift) (binary int16).
 */
int main(int argc, char **argv)
{
    for (int32_t x = INT16_MIN; x <= INT16_MAX; ++x) {
        const int16_t y = (int16_t)tl_dsp_sigmoid(x, tinylstm_dsp_activation_table);
        fwrite(&y, sizeof y, 1, stdout);
    }
    for (int arg = 1; arg + 2 < argc; arg += 3) {
        const int32_t multiplier = atoi(argv[arg]), round = atoi(argv[arg + 1]);
        const unsigned shift = (unsigned)atoi(argv[arg + 2]);
        for (int32_t x = INT16_MIN; x <= INT16_MAX; ++x) {
            const int32_t v = tl_asr(x * multiplier + round, shift);
            const int16_t y = (int16_t)tl_dsp_tanh(v, tinylstm_dsp_activation_table);
            fwrite(&y, sizeof y, 1, stdout);
        }
    }
    return 0;
}
"""


def test_variant_activations_exhaustive(tmp_path: Path) -> None:
    """arm_dsp's sigmoid and tanh (its interpolation table, tinylstm_kernel_arm_dsp.c) on every int16 input and
    every tanh shift, the tanh input scaled by the words the generator writes for the cell (TL_K_TANH_*)."""
    _write_sources({}, tmp_path, "arm_dsp")
    (tmp_path / "activations.c").write_text(_ACTIVATION_DRIVER)
    _compile_all([["gcc", *HOST_FLAGS, "activations.c", "tinylstm_kernel.c", "tinylstm_kernel_arm_dsp.c", "-o",
                   "activations"]], tmp_path)
    shifts = range(-31, 12)
    args = [str(w) for left in shifts for w in _dsp_tanh_scaling(left)]
    out = subprocess.run([str(tmp_path / "activations"), *args], capture_output=True, check=True).stdout
    got = np.frombuffer(out, dtype=np.int16).astype(np.int64)
    x = np.arange(-32768, 32768)
    assert np.array_equal(got[: x.size], sigmoid_q15(x)), "sigmoid"
    for k, shift in enumerate(shifts):
        assert np.array_equal(got[(k + 1) * x.size:(k + 2) * x.size], tanh_q15(x, shift)), f"tanh shift {shift}"


def _dsp_tanh_scaling(left_shift: int) -> list[int]:
    """The TL_K_TANH_MULTIPLIER, _ROUND and _SHIFT words of a layer whose cell tanh has this left shift."""
    layer = random_model(1, input_size=1, hidden_sizes=(1,), outputs=None, window=1).layers[0]
    layer = dataclasses.replace(layer, cell_scale_power=left_shift - 12)
    return [int(w) for w in _dsp_constants(layer)[6:9]]


# ---- layout against the compilers ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", OPTIMIZED)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=lambda s: f"I{s.input_size}-H{'x'.join(map(str, s.hidden_sizes))}"
                                                               f"-O{s.outputs}{'-pc' if s.per_channel else ''}")
def test_variant_memory_layout_matches_compilers(tmp_path: Path, shape: ModelShape, variant: str) -> None:
    model = _model_with_shape(shape, seed=sum(shape.hidden_sizes) + shape.input_size)
    source = _write_sources({"m": model}, tmp_path, variant)[-1]
    archs = ("arm", "host") if variant == "arm_dsp" else ("avr", "host")
    _compile_all([[*_cross_flags(arch, "-Os"), str(source), "-o", str(tmp_path / f"m_{arch}.o")] for arch in archs],
                 tmp_path)
    for arch in archs:
        expected = {f"m_{b.name}": (b.region, b.nbytes) for b in memory_layout(shape, arch, variant)}
        assert _data_objects(tmp_path / f"m_{arch}.o", arch) == expected, arch


def test_variant_selection() -> None:
    assert default_variant("avr", False) == "avr"
    assert default_variant("arm", True) == "arm_dsp"
    assert default_variant("arm", False) == "reference"
    assert default_variant("xtensa", True) == "reference"
    model = random_model(3)
    with pytest.raises(ExportError, match="unknown kernel variant"):
        render_c(model, "m", "neon")
    assert '#include "tinylstm_kernel_arm_dsp.h"' in render_c(model, "m", "arm_dsp")["m.c"]
    with pytest.raises(PlanError, match="no code size"):
        plan(load_board("pico"), ModelShape.from_model(model), variant="arm_dsp")
    with pytest.raises(firmware.FirmwareError, match="no code size"):  # one line for build/flash/bench
        firmware.check_fits(model, load_board("uno_sim"), "arm_dsp")


def test_planner_figures_per_variant() -> None:
    """The planner counts each variant's own objects: the DSP layout pads rows to four inputs, stores each half's
    four biases with its words and keeps an int16 copy of the inputs; the AVR layout keeps a byte copy."""
    shape = ModelShape(input_size=3, hidden_sizes=(16,), window=10, outputs=None)
    board = load_board("mps2_an386")
    dsp = {i.name: i.nbytes for i in plan(board, shape, variant="arm_dsp").items}
    assert dsp["l0_weights"] == 16 * (4 + 16 + 2 * 4) * 4 and dsp["scratch"] == (4 + 16) * 2
    avr = {i.name: i.nbytes for i in plan(load_board("uno_sim"), shape, variant="avr").items}
    assert avr["l0_weights"] == 4 * 16 * (3 + 16) and avr["scratch"] == 3 + 16 and avr["l0_bias"] == 8 * 16 * 4


# ---- in the emulators ----------------------------------------------------------------------------------------

def _emulator_cases(vector_cases, variant: str) -> list:  # noqa: F811
    """(name, model, window): the 19 vectors (first batch row) and random models that fit the board."""
    cases = [(case.name, case.model, case.inputs[0]) for case in vector_cases]
    small = dict(hidden_sizes=None, input_size=None)
    for seed in range(12):
        if variant == "avr":  # ATmega328P: 2 KB RAM, 32 KB flash
            small = dict(hidden_sizes=tuple(int(h) for h in np.random.default_rng(seed).integers(1, 25, 1 + seed % 2)),
                         input_size=int(np.random.default_rng(seed).integers(1, 12)))
        model = random_model(500 + seed, window=int(3 + seed % 5), per_channel=bool(seed % 3 == 0), **small)
        cases.append((model.name, model, random_windows(600 + seed, model, 1)[0]))
    # an input row longer than one pass of the matrix loop (255 inputs on AVR, 504 with the DSP kernel)
    wide = random_model(530, input_size=300 if variant == "avr" else 600, hidden_sizes=(4,), window=3, outputs=2)
    cases.append((wide.name, wide, random_windows(630, wide, 1)[0]))
    return cases


def _run_on_board(board_name: str, variant: str, cases: list, tmp_path: Path) -> None:
    """Every case that fits the board: the device's h and cell after every step and its output equal the
    reference's; the random models' unclipped cells reach both ends of the int16 range on the device."""
    board = load_board(board_name)
    cache = tmp_path / "cache"
    rails = {-32768: 0, 32767: 0}
    for name, model, window in cases:
        if not plan(board, ModelShape.from_model(model), variant=variant).fits:
            continue
        result = perf.measure(model, variant, board, window, tmp_path / name, cache)
        perf.check(model, window, result)
        for step in result.states:
            for layer, (_, cell) in zip(model.layers, step, strict=True):
                if layer.cell_clip == 0:
                    rails = {rail: count + int(np.sum(cell == rail)) for rail, count in rails.items()}
    assert all(rails.values()), f"cells at the rails: {rails}"


@pytest.mark.slow
@needs_qemu
def test_arm_dsp_bit_exact_in_qemu(tmp_path: Path, vector_cases) -> None:  # noqa: F811
    cases = _emulator_cases(vector_cases, "arm_dsp")
    for case in vector_cases:  # the published h after every step, read back from the device
        result = perf.measure(case.model, "arm_dsp", load_board("mps2_an386"), case.inputs[0],
                              tmp_path / f"v_{case.name}", tmp_path / "cache")
        assert np.array_equal(np.stack([s[0][0] for s in result.states]), case.expected[0]), case.name
    _run_on_board("mps2_an386", "arm_dsp", cases, tmp_path)


@pytest.mark.slow
@needs_simavr
def test_avr_bit_exact_in_simavr(tmp_path: Path, vector_cases) -> None:  # noqa: F811
    _run_on_board("uno_sim", "avr", _emulator_cases(vector_cases, "avr"), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("board_name", "variant"), [
    pytest.param("mps2_an386", "reference", marks=needs_qemu), pytest.param("mps2_an386", "arm_dsp", marks=needs_qemu),
    pytest.param("uno_sim", "reference", marks=needs_simavr), pytest.param("uno_sim", "avr", marks=needs_simavr)])
def test_regression_vectors_in_emulators(tmp_path: Path, regression_cases, board_name: str, variant: str  # noqa: F811
                                         ) -> None:
    """The regression vectors (first batch row) on the device: h after every step, and the final h and cell
    state, equal the values recorded in each file."""
    for regression in regression_cases:
        case = regression.case
        result = perf.measure(case.model, variant, load_board(board_name), case.inputs[0], tmp_path / case.name,
                              tmp_path / "cache")
        np.testing.assert_array_equal(np.stack([s[0][0] for s in result.states]), case.expected[0], err_msg=case.name)
        h, cell = result.states[-1][0]
        np.testing.assert_array_equal(h, regression.final_h[0], err_msg=f"{case.name}: final h")
        np.testing.assert_array_equal(cell, regression.final_cell[0], err_msg=f"{case.name}: final cell")


@pytest.mark.slow
@needs_qemu
def test_arm_dsp_speed_in_qemu(tmp_path: Path) -> None:
    """At (6, 32): under half the reference kernel's instructions per step, and under 14,385 instructions,
    half of CMSIS-NN's 28,771 measured with the same flags (docs/performance.md)."""
    board = load_board("mps2_an386")
    model = perf.suite_model(6, 32, 6)
    window = perf.suite_window(model)
    fast = perf.measure(model, "arm_dsp", board, window, tmp_path / "dsp", tmp_path / "cache")
    slow = perf.measure(model, "reference", board, window, tmp_path / "ref", tmp_path / "cache")
    perf.check(model, window, fast)
    assert fast.steady_step < 28_771 / 2
    assert fast.steady_step < slow.steady_step / 2


@pytest.mark.slow
@needs_simavr
def test_avr_matrix_cycles_per_mac(tmp_path: Path) -> None:
    """The AVR matrix part costs at most 10 cycles per multiply-accumulate (simavr's cycle counter)."""
    assert perf.avr_matrix_cycles(tmp_path, tmp_path / "cache")["per_mac"] <= 10
