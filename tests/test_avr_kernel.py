"""The AVR variant's gate arithmetic (tinylstm_kernel_avr.h) against the integer reference, value by value.

The same driver runs on the host (portable C, under the sanitizers) and in simavr (the assembly multiply, avr-gcc
at -Os and -O2): requantization over extreme and random (value, multiplier, shift) triples, sigmoid on every
int16, and tanh on every int16 for every shift on the host, for the common shifts in simavr (a stride of int16
for the others).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_export_c import HOST_FLAGS, _write_sources
from tinylstm import perf
from tinylstm.reference import requantize, sigmoid_q15, tanh_q15

needs_simavr = pytest.mark.skipif(not (Path("/usr/include/simavr/sim_avr.h").is_file() and shutil.which("avr-gcc")),
                                  reason="simavr headers or avr-gcc missing")

_DRIVER = r"""
#include <stdint.h>
#include "tinylstm_kernel_avr.h"
#include "cases.h"

#if defined(__AVR__)
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/sleep.h>
static void put(const void *data, uint8_t size)
{
    const uint8_t *bytes = data;
    for (uint8_t k = 0; k < size; ++k) {
        while (!(UCSR0A & _BV(UDRE0))) {
        }
        UDR0 = bytes[k];
    }
}
#else
#include <stdio.h>
static void put(const void *data, uint8_t size)
{
    fwrite(data, 1, size, stdout);
}
#endif

int main(void)
{
#if defined(__AVR__)
    UBRR0 = 0;
    UCSR0A = _BV(U2X0);
    UCSR0B = _BV(TXEN0);
#endif
    for (uint16_t k = 0; k < RQ_CASES; ++k) {
        const int32_t r = tl_avr_requantize(TL_AVR_READ_I32(&rq_value[k]), TL_AVR_READ_I32(&rq_multiplier[k]),
                                            TL_AVR_READ_I8(&rq_shift[k]));
        put(&r, sizeof r);
    }
    for (uint8_t k = 0; k < ACT_RANGES; ++k) {
        const int8_t shift = TL_AVR_READ_I8(&act_shift[k]);
        const uint16_t stride = (uint16_t)TL_AVR_READ_I32(&act_stride[k]);
        int32_t x = INT16_MIN;
        for (uint16_t n = (uint16_t)(65535u / stride); ; --n, x += stride) {
            const int16_t y = shift == 99 ? tl_avr_sigmoid((int16_t)x) : tl_avr_tanh((int16_t)x, shift);
            put(&y, sizeof y);
            if (n == 0u) {
                break;
            }
        }
    }
#if defined(__AVR__)
    while (!(UCSR0A & _BV(TXC0))) {
    }
    cli();
    sleep_mode();
#endif
    return 0;
}
"""

SIGMOID = 99  # the driver's marker for sigmoid in act_shift


def _requantize_cases(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    edges = np.array([-2**31, -2**31 + 1, -2**30, -65537, -1, 0, 1, 65536, 2**30 - 1, 2**31 - 1], np.int64)
    multipliers = np.array([0, 1, 2**30 - 1, 2**30, 2**30 + 1, 2**31 - 1], np.int64)
    values, mults, shifts = [], [], []
    for v in edges:
        for m in multipliers:
            for s in (-31, -30, -17, -9, -8, -1, 0, 1, 8, 30):
                values.append(v), mults.append(m), shifts.append(s)
    n = count - len(values)
    bits = rng.integers(1, 33, n)
    values += list(rng.integers(-2**31, 2**31, n) >> (32 - bits))
    mults += list(np.where(rng.random(n) < 0.8, rng.integers(2**30, 2**31, n), rng.integers(0, 2**31, n)))
    shifts += list(np.clip(rng.normal(-4, 8, n).round(), -31, 30).astype(np.int64))
    return np.array(values, np.int64), np.array(mults, np.int64), np.array(shifts, np.int64)


def _activation_cases(every_value_shifts: tuple[int, ...], stride: int) -> list[tuple[int, int]]:
    """(shift, stride) ranges over int16 from -32768: every value for sigmoid and the given tanh shifts."""
    ranges = [(SIGMOID, 1)]
    ranges += [(shift, 1 if shift in every_value_shifts else stride) for shift in range(-31, 12)]
    return ranges


def _activation_inputs(act: list[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    return [(shift, np.arange(-32768, 32768, stride)[: 65535 // stride + 1]) for shift, stride in act]


def _expected(rq: tuple, act: tuple) -> bytes:
    values, mults, shifts = rq
    r = requantize(values, mults, shifts).astype("<i4").tobytes()
    y = [sigmoid_q15(x) if shift == SIGMOID else tanh_q15(x, shift) for shift, x in _activation_inputs(act)]
    return r + np.concatenate(y).astype("<i2").tobytes()


def _array(name: str, ctype: str, values: np.ndarray) -> str:
    body = ",".join(str(int(v)) if int(v) != -2**31 else "INT32_MIN" for v in values)
    return f"static const {ctype} {name}[{values.size}] TINYLSTM_FLASH = {{{body}}};\n"


def _write_driver(directory: Path, rq: tuple, act: tuple) -> None:
    _write_sources({}, directory, "avr")
    values, mults, shifts = rq
    shift, stride = (np.array(column, np.int64) for column in zip(*act, strict=True))
    (directory / "cases.h").write_text(
        f"#define RQ_CASES {values.size}u\n#define ACT_RANGES {shift.size}u\n"
        + _array("rq_value", "int32_t", values) + _array("rq_multiplier", "int32_t", mults)
        + _array("rq_shift", "int8_t", shifts) + _array("act_shift", "int8_t", shift)
        + _array("act_stride", "int32_t", stride))
    (directory / "driver.c").write_text(_DRIVER)


def test_avr_gate_arithmetic_on_host(tmp_path: Path) -> None:
    rq = _requantize_cases(20_000)
    act = _activation_cases(tuple(range(-31, 12)), 1)
    _write_driver(tmp_path, rq, act)
    subprocess.run(["gcc", *HOST_FLAGS, "driver.c", "tinylstm_kernel.c", "-o", "driver"], cwd=tmp_path, check=True)
    out = subprocess.run([str(tmp_path / "driver")], capture_output=True, check=True).stdout
    _compare(out, rq, act)


@pytest.mark.slow
@needs_simavr
@pytest.mark.parametrize("optimisation", ["-Os", "-O2"])
def test_avr_gate_arithmetic_in_simavr(tmp_path: Path, optimisation: str) -> None:
    """The assembly multiply and the AVR code paths, run by simavr (the cases fit the ATmega328P's 32 KB)."""
    rq = _requantize_cases(1_200)
    act = _activation_cases((-11, -1, 0, 1), 97)
    _write_driver(tmp_path, rq, act)
    elf = tmp_path / "driver.elf"
    subprocess.run([perf.AVR_GCC, *perf.WARNINGS, "-mmcu=atmega328p", optimisation, "-I.", "driver.c",
                    "tinylstm_kernel.c", "-o", str(elf)], cwd=tmp_path, check=True)
    _, out = perf.run_simavr(elf, "atmega328p", 16_000_000, tmp_path / "cache")
    _compare(out, rq, act)


def _compare(out: bytes, rq: tuple, act: tuple) -> None:
    expected = _expected(rq, act)
    assert len(out) == len(expected)
    n = rq[0].size
    got_rq, want_rq = np.frombuffer(out[:4 * n], "<i4"), np.frombuffer(expected[:4 * n], "<i4")
    bad = np.flatnonzero(got_rq != want_rq)
    assert bad.size == 0, [(int(rq[0][k]), int(rq[1][k]), int(rq[2][k]), int(got_rq[k]), int(want_rq[k]))
                           for k in bad[:5]]
    got_act, want_act = np.frombuffer(out[4 * n:], "<i2"), np.frombuffer(expected[4 * n:], "<i2")
    inputs = [(shift, int(x)) for shift, xs in _activation_inputs(act) for x in xs]
    bad = np.flatnonzero(got_act != want_act)
    assert bad.size == 0, [(inputs[k], int(got_act[k]), int(want_act[k])) for k in bad[:5]]
