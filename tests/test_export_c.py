"""The generated C: bit-exact with the published vectors and with the integer reference, builds for Cortex-M4
and AVR, and occupies exactly the memory that ``memory_layout`` reports.

The host tests compile every model (19 vectors, the regression vectors and 200+ random models, each under its
own prefix) into one program built with AddressSanitizer and UndefinedBehaviorSanitizer, and drive it through
stdin/stdout.
"""

from __future__ import annotations

import io
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cmsis_vectors import VECTOR_FILES, load_case
from tests.random_models import random_model, random_windows
from tests.regression_vectors import RegressionCase
from tests.regression_vectors import regression_cases as load_regression_cases
from tinylstm import qmodel
from tinylstm.cli import main as cli
from tinylstm.export import (
    ExportError,
    ModelShape,
    export_c,
    kernel_layout,
    kernel_sources,
    memory_layout,
    render_c,
)
from tinylstm.qmodel import QuantizedModel
from tinylstm.reference import Reference, requantize, sigmoid_q15, tanh_q15

HOST_FLAGS = ["-std=c99", "-O1", "-g0", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all"]
CROSS = {
    "arm": ["arm-none-eabi-gcc", "-std=c99", "-mcpu=cortex-m4", "-mthumb", "-Wall", "-Wextra", "-Werror"],
    "avr": ["avr-gcc", "-std=c99", "-mmcu=atmega328p", "-Wall", "-Wextra", "-Werror"],
    "host": ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror"],
}
NM = {"arm": "arm-none-eabi-nm", "avr": "avr-nm", "host": "nm"}
RANDOM_MODELS = 220
WINDOWS_PER_MODEL = 2


def _compile_all(jobs: list[list[str]], cwd: Path) -> None:
    """Run compiler command lines in parallel; fail with the compiler's message."""
    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for cmd, result in zip(jobs, pool.map(run, jobs), strict=True):
            if result.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def _write_sources(models: dict[str, QuantizedModel], directory: Path, variant: str = "reference") -> list[Path]:
    """Render every model under its prefix plus one copy of the kernel; return the .c files, the kernel's first."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = []
    for name, text in kernel_sources(variant).items():
        (directory / name).write_text(text)
        if name.endswith(".c"):
            sources.append(directory / name)
    for prefix, model in models.items():
        for name, text in render_c(model, prefix, variant).items():
            (directory / name).write_text(text)
        sources.append(directory / f"{prefix}.c")
    return sources


# ---- the host program: every model in one binary ----------------------------------------------------------

_DRIVER = """
#include <stdio.h>
#include <stdint.h>
#include <stddef.h>
{includes}

typedef struct {{
    uint16_t input_size, window, output_size;
    uint8_t layers;
    uint16_t hidden_sizes[3];
    void (*reset)(void);
    void (*step)(const int8_t *x_t);
    void (*output)(int8_t *out);
    void (*run)(const int8_t *window, int8_t *out);
    const int8_t *(*hidden)(uint8_t layer);
    const int16_t *(*cell)(uint8_t layer);
}} model_api;

static const model_api models[] = {{
{table}
}};

static int8_t window[{max_window}];
static int8_t out[{max_output}];

static void dump_state(const model_api *m)
{{
    for (uint8_t layer = 0; layer < m->layers; ++layer) {{
        fwrite(m->hidden(layer), 1, m->hidden_sizes[layer], stdout);
        fwrite(m->cell(layer), sizeof(int16_t), m->hidden_sizes[layer], stdout);
    }}
}}

/* Per job (model index, window): bad-layer check, state after reset, state after every step, output,
   run() output, state after run(), state after a second reset. */
int main(void)
{{
    uint16_t index;
    while (fread(&index, sizeof index, 1, stdin) == 1) {{
        const model_api *m = &models[index];
        const size_t n = (size_t)m->window * m->input_size;
        if (fread(window, 1, n, stdin) != n) {{
            return 2;
        }}
        fputc(m->hidden(m->layers) == NULL && m->cell(m->layers) == NULL, stdout);
        m->reset();
        dump_state(m);
        for (uint16_t t = 0; t < m->window; ++t) {{
            m->step(window + (size_t)t * m->input_size);
            dump_state(m);
        }}
        m->output(out);
        fwrite(out, 1, m->output_size, stdout);
        m->run(window, out);
        fwrite(out, 1, m->output_size, stdout);
        dump_state(m);
        m->reset();
        dump_state(m);
    }}
    return 0;
}}
"""


@dataclass
class JobResult:
    layers_bounded: bool  # hidden()/cell() return NULL past the last layer
    after_reset: list[tuple[np.ndarray, np.ndarray]]  # (h, c) per layer
    steps: list[list[tuple[np.ndarray, np.ndarray]]]  # per step, per layer
    output: np.ndarray
    run_output: np.ndarray
    after_run: list[tuple[np.ndarray, np.ndarray]]
    after_second_reset: list[tuple[np.ndarray, np.ndarray]]


class HostProgram:
    def __init__(self, models: dict[str, QuantizedModel], directory: Path, variant: str = "reference") -> None:
        self.prefixes = list(models)
        self.models = list(models.values())
        sources = _write_sources(models, directory, variant)
        (directory / "driver.c").write_text(self._driver())
        # Several models per translation unit keeps the compiler runs few; each model keeps its own file.
        bundles = []
        kernel = [source for source in sources if source.name.startswith("tinylstm_kernel")]
        model_sources = sources[len(kernel):]
        chunk = -(-len(model_sources) // 8)
        for k in range(0, len(model_sources), chunk):
            bundle = directory / f"bundle_{k // chunk}.c"
            bundle.write_text("".join(f'#include "{s.name}"\n' for s in model_sources[k:k + chunk]))
            bundles.append(bundle)
        units = [*kernel, directory / "driver.c", *bundles]
        _compile_all([["gcc", *HOST_FLAGS, "-c", str(u), "-o", str(u.with_suffix(".o"))] for u in units], directory)
        self.exe = directory / "host_models"
        _compile_all([["gcc", *HOST_FLAGS, *(str(u.with_suffix(".o")) for u in units), "-o", str(self.exe)]],
                     directory)

    def _driver(self) -> str:
        rows = []
        for prefix, model in zip(self.prefixes, self.models, strict=True):
            P = prefix.upper()
            hidden = ", ".join(f"{P}_HIDDEN_SIZE_{n}" for n in range(len(model.layers)))
            rows.append(f"    {{{P}_INPUT_SIZE, {P}_WINDOW, {P}_OUTPUT_SIZE, {P}_LAYERS, {{{hidden}}}, "
                        f"{prefix}_reset, {prefix}_step, {prefix}_output, {prefix}_run, {prefix}_hidden, "
                        f"{prefix}_cell}},")
        return _DRIVER.format(
            includes="\n".join(f'#include "{p}.h"' for p in self.prefixes),
            table="\n".join(rows),
            max_window=max(m.input.window * m.input.features for m in self.models),
            max_output=max(m.output_size for m in self.models),
        )

    def run(self, jobs: list[tuple[int, np.ndarray]]) -> list[JobResult]:
        """Run (model index, int8 window) jobs; every window has its model's WINDOW x INPUT_SIZE shape."""
        request = b"".join(np.uint16(i).tobytes() + np.ascontiguousarray(w, np.int8).tobytes() for i, w in jobs)
        proc = subprocess.run([str(self.exe)], input=request, capture_output=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"host program failed ({proc.returncode}):\n{proc.stderr.decode()[-4000:]}")
        stream = io.BytesIO(proc.stdout)

        def read(dtype: type, count: int) -> np.ndarray:
            data = stream.read(count * np.dtype(dtype).itemsize)
            assert len(data) == count * np.dtype(dtype).itemsize, "host program output is short"
            return np.frombuffer(data, dtype=dtype).astype(np.int64)

        results = []
        for index, _ in jobs:
            model = self.models[index]

            def state(model: QuantizedModel = model) -> list[tuple[np.ndarray, np.ndarray]]:
                return [(read(np.int8, layer.hidden_size), read(np.int16, layer.hidden_size))
                        for layer in model.layers]

            bounded = bool(read(np.uint8, 1)[0])
            after_reset = state()
            steps = [state() for _ in range(model.input.window)]
            output, run_output = read(np.int8, model.output_size), read(np.int8, model.output_size)
            results.append(JobResult(bounded, after_reset, steps, output, run_output, state(), state()))
        assert stream.read() == b"", "host program wrote more than expected"
        return results


def _vector_prefix(name: str) -> str:
    return "v_" + name.replace("-", "_")


@pytest.fixture(scope="module")
def vector_cases() -> list:
    assert len(VECTOR_FILES) == 19, f"expected the 19 published vectors, found {len(VECTOR_FILES)}"
    return [load_case(p) for p in VECTOR_FILES]


@pytest.fixture(scope="module")
def regression_cases() -> list[RegressionCase]:
    return load_regression_cases()


@pytest.fixture(scope="module")
def random_cases() -> list[tuple[QuantizedModel, np.ndarray]]:
    models = [random_model(seed) for seed in range(RANDOM_MODELS)]
    cases = [(m, random_windows(10_000 + seed, m, WINDOWS_PER_MODEL)) for seed, m in enumerate(models)]
    # The corners of the supported range, each once.
    corners = [
        random_model(1001, input_size=32, hidden_sizes=(128,), outputs=16, window=200, per_channel=True),
        random_model(1002, input_size=1, hidden_sizes=(1, 1, 1), outputs=None, window=1),
        random_model(1003, input_size=1, hidden_sizes=(128, 1, 128), outputs=1, window=3, per_channel=False),
        random_model(1004, input_size=32, hidden_sizes=(5, 9, 3), outputs=4, window=200, extreme=0.6),
    ]
    cases += [(m, random_windows(20_000 + k, m, WINDOWS_PER_MODEL)) for k, m in enumerate(corners)]
    return cases


def program_models(vector_cases: list, regression_cases: list, random_cases: list) -> dict[str, QuantizedModel]:
    """The models of a host program by prefix: the vectors, the regression vectors, then r0, r1, ..."""
    models = {_vector_prefix(case.name): case.model for case in vector_cases}
    models.update({_vector_prefix(r.case.name): r.case.model for r in regression_cases})
    models.update({f"r{k}": model for k, (model, _) in enumerate(random_cases)})
    return models


@pytest.fixture(scope="module")
def host_program(tmp_path_factory: pytest.TempPathFactory, vector_cases: list, regression_cases: list,
                 random_cases: list) -> HostProgram:
    return HostProgram(program_models(vector_cases, regression_cases, random_cases), tmp_path_factory.mktemp("host"))


def _initial_state(model: QuantizedModel) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.full(layer.hidden_size, layer.output_zero_point), np.zeros(layer.hidden_size))
            for layer in model.layers]


def _assert_state(actual: list, expected: list, where: str) -> None:
    for n, ((h, c), (h_ref, c_ref)) in enumerate(zip(actual, expected, strict=True)):
        for name, a, e in (("h", h, h_ref), ("c", c, c_ref)):
            if not np.array_equal(a, e):
                k = int(np.flatnonzero(a != e)[0])
                raise AssertionError(f"{where}, layer {n}: {name}[{k}] = {a[k]}, expected {e[k]}")


def test_vectors_bit_exact_on_host(host_program: HostProgram, vector_cases: list) -> None:
    """The published CMSIS-NN vectors: h after every step (batch rows are independent sequences)."""
    jobs, expected = [], []
    for case in vector_cases:
        index = host_program.prefixes.index(_vector_prefix(case.name))
        for b in range(case.inputs.shape[0]):
            jobs.append((index, case.inputs[b]))
            expected.append((case.name, b, case.expected[b].astype(np.int64)))
    results = host_program.run(jobs)
    for (name, b, h_expected), result in zip(expected, results, strict=True):
        h_steps = np.stack([steps[0][0] for steps in result.steps])
        assert np.array_equal(h_steps, h_expected), f"{name} batch {b}: h differs from the published output"
        assert np.array_equal(result.output, h_expected[-1]), f"{name} batch {b}: output()"
        assert np.array_equal(result.run_output, h_expected[-1]), f"{name} batch {b}: run()"


def test_regression_vectors_on_host(host_program: HostProgram, regression_cases: list) -> None:
    check_regression_vectors(host_program, regression_cases)


def check_regression_vectors(program: HostProgram, regression_cases: list) -> None:
    """The regression vectors: h after every step, and the final h and cell state, equal the values of the integer
    model of CMSIS-NN recorded in each file."""
    jobs, expected = [], []
    for regression in regression_cases:
        index = program.prefixes.index(_vector_prefix(regression.case.name))
        for b in range(regression.case.inputs.shape[0]):
            jobs.append((index, regression.case.inputs[b]))
            expected.append((regression, b))
    for (regression, b), result in zip(expected, program.run(jobs), strict=True):
        where = f"{regression.case.name} batch {b}"
        h_steps = np.stack([steps[0][0] for steps in result.steps])
        assert np.array_equal(h_steps, regression.case.expected[b]), f"{where}: h differs from the expected output"
        h, c = result.steps[-1][0]
        np.testing.assert_array_equal(h, regression.final_h[b], err_msg=f"{where}: final h")
        np.testing.assert_array_equal(c, regression.final_cell[b], err_msg=f"{where}: final cell")


@dataclass
class Coverage:
    """What a run of the random models reached: saturated outputs, and cells of unclipped layers (cell_clip = 0)
    at each end of the int16 range, counted per step, window and unit."""

    saturated: int
    outputs: int
    cells_at_min: int  # cell == -32768
    cells_at_max: int  # cell == 32767


def test_random_models_match_reference(host_program: HostProgram, random_cases: list) -> None:
    """Every output and every layer's h and c after every step; streaming equals run(); reset restores."""
    coverage = check_models_against_reference(host_program, random_cases)
    # The set must exercise both the linear range and saturation, and unclipped cells at both rails.
    assert 0.05 < coverage.saturated / coverage.outputs < 0.8, coverage
    assert coverage.cells_at_min > 0 and coverage.cells_at_max > 0, coverage


def check_models_against_reference(host_program: HostProgram, random_cases: list) -> Coverage:
    """Check models r0, r1, ... of the program on their windows against the reference, as
    test_random_models_match_reference describes; returns what the outputs and cells reached."""
    offset = host_program.prefixes.index("r0")
    jobs = [(offset + k, w) for k, (_, windows) in enumerate(random_cases) for w in windows]
    results = iter(host_program.run(jobs))
    coverage = Coverage(0, 0, 0, 0)
    for k, (model, windows) in enumerate(random_cases):
        ref = Reference(model, columns=len(windows))
        expected_steps = []
        for t in range(model.input.window):
            ref.step(windows[:, t, :])
            expected_steps.append([(s.h, s.c) for s in ref.states])
        expected_output = ref.output(2)
        initial = _initial_state(model)
        for j in range(len(windows)):
            where = f"model r{k} ({model.name}), window {j}"
            result = next(results)
            assert result.layers_bounded, f"{where}: hidden()/cell() past the last layer is not NULL"
            _assert_state(result.after_reset, initial, f"{where}, after reset")
            for t, step in enumerate(result.steps):
                _assert_state(step, [(h[:, j], c[:, j]) for h, c in expected_steps[t]], f"{where}, step {t}")
                for layer, (_, c) in zip(model.layers, step, strict=True):
                    if layer.cell_clip == 0:
                        coverage.cells_at_min += int(np.sum(c == -32768))
                        coverage.cells_at_max += int(np.sum(c == 32767))
            assert np.array_equal(result.output, expected_output[j]), f"{where}: output"
            assert np.array_equal(result.run_output, result.output), f"{where}: run() differs from streaming"
            _assert_state(result.after_run, result.steps[-1], f"{where}, after run()")
            _assert_state(result.after_second_reset, initial, f"{where}, after the second reset")
            coverage.saturated += int(np.sum(np.abs(result.output) >= 127))
            coverage.outputs += result.output.size
    return coverage


def test_random_models_cover_the_range(random_cases: list) -> None:
    models = [m for m, _ in random_cases]
    assert len(models) >= 200
    assert {len(m.layers) for m in models} == {1, 2, 3}
    assert min(m.input.features for m in models) == 1 and max(m.input.features for m in models) == 32
    hidden = [layer.hidden_size for m in models for layer in m.layers]
    assert min(hidden) == 1 and max(hidden) == 128
    windows = [m.input.window for m in models]
    assert min(windows) == 1 and max(windows) == 200
    assert any(m.head is None for m in models) and any(m.head is not None for m in models)
    assert any(m.layers[0].per_channel for m in models) and any(not m.layers[0].per_channel for m in models)
    assert any(m.head is not None and m.head.multiplier.size > 1 for m in models)
    assert any(layer.cell_clip > 0 for m in models for layer in m.layers)
    extremes = np.concatenate([w.ravel() for _, w in random_cases])
    assert (extremes == -128).any() and (extremes == 127).any()


# ---- scalar arithmetic: C against the reference ------------------------------------------------------------

_SCALAR_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tinylstm_kernel.h"

/* "tables": sigmoid of every int16, then tanh of every int16 for each left shift in [-31, 11] (binary).
   Otherwise: lines "value multiplier shift" -> requantize result. */
int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "tables") == 0) {
        for (int32_t x = INT16_MIN; x <= INT16_MAX; ++x) {
            int16_t y = tinylstm_sigmoid((int16_t)x);
            fwrite(&y, sizeof y, 1, stdout);
        }
        for (int shift = -31; shift <= 11; ++shift) {
            for (int32_t x = INT16_MIN; x <= INT16_MAX; ++x) {
                int16_t y = tinylstm_tanh((int16_t)x, shift);
                fwrite(&y, sizeof y, 1, stdout);
            }
        }
        return 0;
    }
    long long value, multiplier;
    int shift;
    while (scanf("%lld %lld %d", &value, &multiplier, &shift) == 3) {
        printf("%ld\n", (long)tinylstm_requantize((int32_t)value, (int32_t)multiplier, shift));
        fflush(stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def scalar_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("scalar")
    _write_sources({}, directory)
    (directory / "scalar.c").write_text(_SCALAR_DRIVER)
    exe = directory / "scalar"
    _compile_all([["gcc", *HOST_FLAGS, "scalar.c", "tinylstm_kernel.c", "-o", str(exe)]], directory)
    return exe


def test_activations_exhaustive(scalar_driver: Path) -> None:
    """sigmoid and tanh (every cell-state shift the format allows, and more) on every int16 input."""
    out = subprocess.run([str(scalar_driver), "tables"], capture_output=True, check=True).stdout
    c = np.frombuffer(out, dtype=np.int16).astype(np.int64)
    x = np.arange(-32768, 32768)
    assert c.size == x.size * (1 + 43)
    assert np.array_equal(c[: x.size], sigmoid_q15(x)), "sigmoid"
    for k, shift in enumerate(range(-31, 12)):
        got = c[(k + 1) * x.size:(k + 2) * x.size]
        assert np.array_equal(got, tanh_q15(x, shift)), f"tanh with left shift {shift}"


@pytest.fixture(scope="module")
def requantize_process(scalar_driver: Path):
    proc = subprocess.Popen([str(scalar_driver)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield proc
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


_INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31), -(2**31) + 1, -1, 0, 1, 2**31 - 1]))
_MULTIPLIER = st.one_of(st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2**30, 2**31 - 1]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_INT32, _MULTIPLIER, st.integers(-31, 30)), min_size=1, max_size=32))
def test_requantize_matches_reference(requantize_process, triples: list[tuple[int, int, int]]) -> None:
    requantize_process.stdin.write("".join(f"{v} {m} {s}\n" for v, m, s in triples))
    requantize_process.stdin.flush()
    got = [int(requantize_process.stdout.readline()) for _ in triples]
    v, m, s = (np.array(col, dtype=np.int64) for col in zip(*triples, strict=True))
    assert got == requantize(v, m, s).tolist()


# ---- cross compilers and the memory layout -----------------------------------------------------------------

def _cross_flags(arch: str, opt: str) -> list[str]:
    return [*CROSS[arch], opt, "-c"]


@pytest.mark.parametrize("arch", ["arm", "avr"])
def test_vectors_build_for_targets(tmp_path: Path, vector_cases: list, arch: str) -> None:
    """The vector models and the kernel compile warning-free for Cortex-M4 and ATmega328P at -Os and -O2."""
    sources = _write_sources({_vector_prefix(c.name): c.model for c in vector_cases}, tmp_path)
    jobs = []
    for opt in ("-Os", "-O2"):
        (tmp_path / opt).mkdir()
        jobs += [[*_cross_flags(arch, opt), str(s), "-o", str(tmp_path / opt / s.with_suffix(".o").name)]
                 for s in sources]
    _compile_all(jobs, tmp_path)


# Shapes whose generated objects are checked against the compilers' symbol tables (add more freely).
LAYOUT_SHAPES = [
    ModelShape(input_size=3, hidden_sizes=(8,), window=10, outputs=None),
    ModelShape(input_size=1, hidden_sizes=(1,), window=1, outputs=1),
    ModelShape(input_size=22, hidden_sizes=(11,), window=10, outputs=4, per_channel=True),
    ModelShape(input_size=7, hidden_sizes=(5, 3), window=20, outputs=3, per_channel=True, head_per_channel=False),
    ModelShape(input_size=32, hidden_sizes=(17, 33, 9), window=50, outputs=5, head_per_channel=True),
    ModelShape(input_size=13, hidden_sizes=(64, 2), window=30, outputs=None, per_channel=True),
]
# Where each output section lives. On AVR, .rodata and .data are copied to RAM: constants must be .progmem.
SECTION_REGIONS = {
    "avr": {".progmem.data": "flash", ".rodata": "ram", ".data": "ram", ".bss": "ram"},
    "arm": {".rodata": "flash", ".data": "ram", ".bss": "ram"},
    "host": {".rodata": "flash", ".data.rel.ro": "flash", ".data": "ram", ".bss": "ram"},
}


def _model_with_shape(shape: ModelShape, seed: int) -> QuantizedModel:
    return random_model(seed, input_size=shape.input_size, hidden_sizes=shape.hidden_sizes, outputs=shape.outputs,
                        window=shape.window, per_channel=shape.per_channel,
                        head_per_channel=shape.head_is_per_channel)


def _data_objects(obj: Path, arch: str) -> dict[str, tuple[str, int]]:
    """Data symbols of an object file: name -> (region, size), from nm's System V listing."""
    listing = subprocess.run([NM[arch], "--format=sysv", str(obj)], capture_output=True, text=True, check=True)
    objects = {}
    for line in listing.stdout.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 7 and fields[3] == "OBJECT":
            section = fields[6]
            region = next((r for s, r in SECTION_REGIONS[arch].items()
                           if section == s or section.startswith(s + ".")), section)
            objects[fields[0]] = (region, int(fields[4], 16))
    return objects


@pytest.mark.parametrize("shape", LAYOUT_SHAPES,
                         ids=lambda s: f"I{s.input_size}-H{'x'.join(map(str, s.hidden_sizes))}-O{s.outputs}"
                                       f"{'-pc' if s.per_channel else ''}{'-hpc' if s.head_is_per_channel else ''}")
def test_memory_layout_matches_compilers(tmp_path: Path, shape: ModelShape) -> None:
    model = _model_with_shape(shape, seed=sum(shape.hidden_sizes) + shape.input_size)
    assert ModelShape.from_model(model) == shape
    source = _write_sources({"m": model}, tmp_path)[-1]
    jobs = []
    for arch in ("avr", "arm", "host"):
        jobs.append([*_cross_flags(arch, "-Os"), str(source), "-o", str(tmp_path / f"m_{arch}.o")])
    _compile_all(jobs, tmp_path)
    for arch in ("avr", "arm", "host"):
        expected = {f"m_{b.name}": (b.region, b.nbytes) for b in memory_layout(shape, arch)}
        assert _data_objects(tmp_path / f"m_{arch}.o", arch) == expected, arch


def test_kernel_layout_matches_compilers(tmp_path: Path) -> None:
    _write_sources({}, tmp_path)
    for arch in ("avr", "arm", "host"):
        obj = tmp_path / f"kernel_{arch}.o"
        _compile_all([[*_cross_flags(arch, "-Os"), "tinylstm_kernel.c", "-o", str(obj)]], tmp_path)
        expected = {b.name: (b.region, b.nbytes) for b in kernel_layout(arch)}
        assert _data_objects(obj, arch) == expected, arch


def test_arm_dsp_kernel_layout_matches_compilers(tmp_path: Path) -> None:
    """arm_dsp's own kernel object, its activation table, has the size kernel_layout gives it (the firmware
    links it instead of the sigmoid table, which only the other kernels' activations read)."""
    _write_sources({}, tmp_path, "arm_dsp")
    for arch in ("arm", "host"):
        obj = tmp_path / f"dsp_{arch}.o"
        _compile_all([[*_cross_flags(arch, "-Os"), "tinylstm_kernel_arm_dsp.c", "-o", str(obj)]], tmp_path)
        expected = {b.name: (b.region, b.nbytes) for b in kernel_layout(arch, "arm_dsp")}
        assert _data_objects(obj, arch) == expected, arch


def test_memory_layout_figures() -> None:
    """Sizes worked out by hand for one shape (struct padding included)."""
    shape = ModelShape(input_size=3, hidden_sizes=(8,), window=10, outputs=2)
    arm = {b.name: b.nbytes for b in memory_layout(shape, "arm")}
    assert arm["l0_input_weights"] == 4 * 8 * 3 and arm["l0_hidden_weights"] == 4 * 8 * 8
    assert arm["l0_input_bias"] == 4 * 8 * 4 and arm["l0_input_multiplier"] == 16 and arm["l0_input_shift"] == 4
    assert arm["state_cell"] == 16 and arm["scratch"] == 8 and arm["head_multiplier"] == 4
    # 8 pointers + 3 int32 + 4 int16 + 6 int8 = 58 bytes, padded to 60 on Arm; 42 on AVR (16-bit pointers)
    assert arm["l0_params"] == 60 and arm["head_params"] == 24  # 4 pointers + 2 int16 + 2 int8, padded to 4
    assert {b.name: b.nbytes for b in memory_layout(shape, "avr")}["l0_params"] == 42
    assert {b.name: b.nbytes for b in memory_layout(shape, "host")}["head_params"] == 4 * 8 + 8
    with pytest.raises(ValueError, match="unknown architecture"):
        memory_layout(shape, "pdp11")


# ---- the generated sources and the export command ----------------------------------------------------------

@pytest.fixture
def vector_model(vector_cases: list) -> QuantizedModel:
    return vector_cases[0].model


def test_header_api(vector_model: QuantizedModel) -> None:
    files = render_c(vector_model, "gesture")
    header = files["gesture.h"]
    layer = vector_model.layers[0]
    for line in (f"#define GESTURE_INPUT_SIZE {layer.input_size}",
                 f"#define GESTURE_WINDOW {vector_model.input.window}",
                 f"#define GESTURE_OUTPUT_SIZE {layer.hidden_size}", "#define GESTURE_LAYERS 1",
                 f'#define GESTURE_MODEL_HASH "{vector_model.digest()}"', "void gesture_reset(void);",
                 "void gesture_step(const int8_t *x_t);", "void gesture_output(int8_t *out);",
                 "void gesture_run(const int8_t *window, int8_t *out);",
                 "const int8_t *gesture_hidden(uint8_t layer);", "const int16_t *gesture_cell(uint8_t layer);"):
        assert line in header
    assert "float" not in files["gesture.c"] and "malloc" not in files["gesture.c"]
    assert "float" not in kernel_sources()["tinylstm_kernel.c"]


@pytest.mark.parametrize("prefix", ["Model", "9lives", "a-b", "", "tinylstm_lstm", "tinylstm_kernel", "string"])
def test_bad_prefix_is_refused(vector_model: QuantizedModel, prefix: str) -> None:
    with pytest.raises(ExportError, match="prefix"):
        render_c(vector_model, prefix)


def test_export_c_refuses_non_empty_dir_and_force_keeps_other_files(vector_model: QuantizedModel,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "gen"
    written = export_c(vector_model, out, prefix="m")
    assert sorted(p.name for p in written) == ["m.c", "m.h", "tinylstm_kernel.c", "tinylstm_kernel.h"]
    (out / "m.c").write_text("stale")
    (out / "main.c").write_text("user code")
    with pytest.raises(ExportError, match="--force"):
        export_c(vector_model, out, prefix="m")
    assert (out / "m.c").read_text() == "stale"
    export_c(vector_model, out, prefix="m", force=True)
    assert (out / "m.c").read_text() == render_c(vector_model, "m")["m.c"]
    assert (out / "main.c").read_text() == "user code"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no temporary directory left


def test_export_c_leaves_nothing_on_error(vector_model: QuantizedModel, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = Path.write_text

    def failing_write(self: Path, text: str, *args, **kwargs) -> int:
        if self.name == "tinylstm_kernel.c":
            raise OSError("disk full")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        export_c(vector_model, tmp_path / "gen", prefix="m")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(vector_model: QuantizedModel, tmp_path: Path) -> None:
    model_file = qmodel.save(vector_model, tmp_path / "model.npz")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["export", "--format", "c", "--model", str(model_file), "--out", str(out), "--prefix", "kws"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["kws.c", "kws.h", "tinylstm_kernel.c", "tinylstm_kernel.h"]

    result = runner.invoke(cli, args)
    assert result.exit_code != 0 and "--force" in result.output
    assert runner.invoke(cli, [*args, "--force"]).exit_code == 0

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a model")
    result = runner.invoke(cli, ["export", "--format", "c", "--model", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "not a tinylstm model file" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()

    result = runner.invoke(cli, ["export", "--format", "onnx", "--model", str(model_file), "--out", str(out)])
    assert result.exit_code != 0 and "onnx" in result.output

    # --board: the kernel of the board's firmware (the Uno's: avr), the model source generated for it.
    result = runner.invoke(cli, [*args[:-4], "--out", str(tmp_path / "uno"), "--prefix", "kws", "--board", "uno"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "uno" / "tinylstm_kernel_avr.h").is_file()
    assert (tmp_path / "uno" / "kws.c").read_text() == render_c(vector_model, "kws", "avr")["kws.c"]
