"""The integer reference against the published CMSIS-NN vectors and against exact arithmetic."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from math import exp, tanh

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cmsis_vectors import VECTOR_FILES, load_case
from tests.random_models import random_model
from tests.regression_vectors import REGRESSION_FILES, load_regression
from tinylstm.reference import LayerKernel, Reference, requantize, rounding_divide_by_pot, sigmoid_q15, tanh_q15


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


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=lambda p: p.stem)
def test_reference_reproduces_regression_vector(path):
    """h after every step, and the final h and cell state, as the integer model of CMSIS-NN gave them."""
    regression = load_regression(path)
    case = regression.case
    ref = Reference(case.model, columns=case.inputs.shape[0])
    hidden = np.stack([ref.step(case.inputs[:, t, :]) for t in range(case.inputs.shape[1])], axis=1)
    np.testing.assert_array_equal(hidden, case.expected)
    np.testing.assert_array_equal(ref.states[0].h.T, regression.final_h)
    np.testing.assert_array_equal(ref.states[0].c.T, regression.final_cell)


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


# ---- the cell update against a model written from CMSIS-NN's semantics ------------------------------------------

def _cmsis_requantize(value: int, multiplier: int, shift: int) -> int:
    """arm_nn_requantize in Python integers: value * 2^max(shift, 0) as an int32, the doubling high multiply
    (value * multiplier + 2^30) >> 31, then arm_nn_divide_by_power_of_two by max(-shift, 0)."""
    value = ((value << max(shift, 0)) + 2**31) % 2**32 - 2**31
    high = (value * multiplier + 2**30) >> 31
    exponent = max(-shift, 0)
    mask = (1 << exponent) - 1
    result = high >> exponent
    threshold = (mask >> 1) + (1 if result < 0 else 0)
    return result + (1 if high & mask > threshold else 0)


def _cmsis_cell(i: int, f: int, g: int, c: int, layer) -> int:
    """The cell update of arm_nn_lstm_step_s8: arm_elementwise_mul_s16 (forget * cell, saturated to int16), then
    arm_elementwise_mul_acc_s16 with the activation bounds (-cell_clip, cell_clip), which become
    (NN_Q15_MIN, NN_Q15_MAX) when the upper bound is not positive."""
    kept = min(max(_cmsis_requantize(f * c, layer.forget_to_cell_multiplier, layer.forget_to_cell_shift),
                   -32768), 32767)
    total = _cmsis_requantize(i * g, layer.input_to_cell_multiplier, layer.input_to_cell_shift) + kept
    upper, lower = layer.cell_clip, -layer.cell_clip
    if upper <= 0:
        upper, lower = 32767, -32768
    return min(max(total, lower), upper)


_CELL_LAYER = random_model(5, input_size=1, hidden_sizes=(1,), outputs=None, window=1).layers[0]
# Gates near 1 and cells near the rails half of the time, so that the bounds are reached often.
q15 = st.one_of(st.integers(0, 32767), st.integers(32000, 32767))
int16_near_rails = st.one_of(st.integers(-32768, 32767), st.integers(-32768, -32000), st.integers(32000, 32767))


@settings(max_examples=600, deadline=None)
@given(i=q15, f=q15, g=int16_near_rails.filter(lambda v: v > -32768), c=int16_near_rails,
       cell_clip=st.one_of(st.just(0), st.integers(1, 32767)), power=st.integers(-15, -10),
       forget=st.one_of(st.just((2**30, -14)), st.tuples(st.integers(2**30, 2**31 - 1), st.integers(-16, -13))))
def test_cell_update_matches_cmsis_nn(i, f, g, c, cell_clip, power, forget):
    layer = dataclasses.replace(_CELL_LAYER, cell_clip=cell_clip, forget_to_cell_multiplier=forget[0],
                                forget_to_cell_shift=forget[1], input_to_cell_multiplier=2**30,
                                input_to_cell_shift=-30 - power + 1)
    got = LayerKernel(layer).update_cell(np.array(i), np.array(f), np.array(g), np.array(c))
    assert int(got) == _cmsis_cell(i, f, g, c, layer)


@pytest.mark.parametrize(("cell_clip", "g", "expected"),
                         [(0, -32767, -32768), (0, 32767, 32767), (20000, -32767, -20000), (32767, -32767, -32767)])
def test_cell_saturates_to_its_bounds(cell_clip, g, expected):
    """A cell at a rail with the gates pushing it further stays at the rail: -32768 when unclipped (cell_clip = 0),
    -cell_clip otherwise. The expected values are CMSIS-NN's, from the rule in docs/quantization.md."""
    layer = dataclasses.replace(_CELL_LAYER, cell_clip=cell_clip, forget_to_cell_multiplier=2**30,
                                forget_to_cell_shift=-14, input_to_cell_multiplier=2**30, input_to_cell_shift=-14)
    c = -32768 if g < 0 else 32767
    got = LayerKernel(layer).update_cell(np.array(32767), np.array(32767), np.array(g), np.array(c))
    assert int(got) == expected == _cmsis_cell(32767, 32767, g, c, layer)
