"""The integer reference against the published CMSIS-NN vectors and against exact arithmetic."""

from __future__ import annotations

from fractions import Fraction
from math import exp, tanh

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cmsis_vectors import VECTOR_FILES, load_case
from tinylstm.reference import Reference, requantize, rounding_divide_by_pot, sigmoid_q15, tanh_q15


def test_all_vector_files_are_present():
    published = [f for f in VECTOR_FILES if f.parent.name == "cmsis-nn-lstm"]
    random = [f for f in VECTOR_FILES if f.parent.name == "cmsis-nn-lstm-random"]
    assert (len(published), len(random)) == (3, 16)


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_reference_reproduces_vector_bit_exactly(path):
    case = load_case(path)
    batch, steps = case.inputs.shape[:2]
    ref = Reference(case.model, columns=batch)
    hidden = np.stack([ref.step(case.inputs[:, t, :]) for t in range(steps)], axis=1)
    assert hidden.dtype == np.int8
    mismatches = np.argwhere(hidden != case.expected)
    assert len(mismatches) == 0, f"{len(mismatches)} bytes differ, first at [batch, step, unit] {mismatches[0]}"


@pytest.mark.parametrize("path", VECTOR_FILES[:3], ids=lambda p: p.stem)
def test_single_sequence_equals_its_batch_column(path):
    case = load_case(path)
    for b in range(case.inputs.shape[0]):
        ref = Reference(case.model)
        got = np.stack([ref.step(x) for x in case.inputs[b]])
        np.testing.assert_array_equal(got, case.expected[b])


def test_run_resets_and_equals_streaming():
    case = load_case(VECTOR_FILES[-1])
    window = case.inputs[0]
    ref = Reference(case.model)
    first = ref.run(window)
    ref.step(window[0])  # disturb the state
    assert np.array_equal(ref.run(window), first)
    np.testing.assert_array_equal(first, case.expected[0, -1])
    ref.reset()
    for kernel, state in zip(ref.kernels, ref.states, strict=True):
        assert np.all(state.h == kernel.layer.output_zero_point) and np.all(state.c == 0)


int32 = st.integers(-(2**31), 2**31 - 1)


@settings(max_examples=400, deadline=None)
@given(v=int32, multiplier=st.integers(2**30, 2**31 - 1), shift=st.integers(-31, 0))
def test_requantize_is_within_one_of_exact_product(v, multiplier, shift):
    exact = Fraction(v * multiplier, 2 ** (31 - shift))
    assert abs(int(requantize(np.int64(v), multiplier, shift)) - exact) <= 1


@settings(max_examples=300, deadline=None)
@given(v=int32, exponent=st.integers(0, 31))
def test_rounding_divide_rounds_half_away_from_zero(v, exponent):
    q = Fraction(v, 2**exponent)
    floor = q.numerator // q.denominator
    frac = q - floor
    expected = floor + 1 if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and v > 0) else floor
    assert int(rounding_divide_by_pot(np.int64(v), exponent)) == expected


def test_requantize_wraps_the_left_shift_like_a_32_bit_register():
    # 2^30 << 1 overflows int32 to -2^31; times 2^30 * 2^-31 that is -2^30.
    assert int(requantize(np.int64(2**30), 2**30, 1)) == -(2**30)


def test_activations_follow_the_functions_they_tabulate():
    x = np.arange(-32768, 32768, dtype=np.int64)
    sig = sigmoid_q15(x)
    expected_sig = np.array([32768 / (1 + exp(-v / 4096)) for v in x])
    assert np.max(np.abs(sig - np.minimum(expected_sig, 32767))) <= 3
    th = tanh_q15(x)
    expected_tanh = np.array([32768 * tanh(v / 4096) for v in x])
    assert np.max(np.abs(th - np.clip(expected_tanh, -32768, 32767))) <= 6
    assert sig.min() >= 0 and sig.max() <= 32767 and th.min() >= -32768 and th.max() <= 32767
    assert np.all(np.diff(sig) >= 0) and np.all(np.diff(th) >= 0)


@pytest.mark.parametrize("cell_scale_power", [-15, -14, -11, -10])
def test_cell_tanh_scales_by_the_cell_power(cell_scale_power):
    c = np.arange(-32768, 32768, 7, dtype=np.int64)
    got = tanh_q15(c, cell_scale_power + 12)
    expected = 32768 * np.tanh(c * 2.0**cell_scale_power)
    assert np.max(np.abs(got - np.clip(expected, -32768, 32767))) <= 8
