"""Seeded random, valid quantized models and int8 input windows, for differential tests of the generated C.

Most parameters are realistic (multipliers chosen so the gates see values of order one); a share of them is
extreme (largest multipliers and shifts, int32 biases near the wrap, clipped cells) so that every saturation
and wrap path of the arithmetic is exercised. A share of the layers is unclipped (cell_clip = 0) with gates that
drive cells to both ends of the int16 range and hold them there (``drive_cells_to_rails``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tinylstm.qmodel import DenseHead, InputSpec, LSTMLayer, QuantizedModel

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_INT8_STD = 74.0  # standard deviation of a uniform int8


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(multiplier, shift) with real = multiplier * 2**(shift - 31), multiplier in [2^30, 2^31), as TFLite does."""
    if real <= 0:
        return 0, 0
    fraction, exponent = math.frexp(real)
    multiplier = round(fraction * 2**31)
    if multiplier == 2**31:
        multiplier, exponent = multiplier // 2, exponent + 1
    if exponent < -31:  # below the smallest representable scale: shift the multiplier down instead
        multiplier, exponent = multiplier >> (-31 - exponent), -31
    if exponent > 30:
        return INT32_MAX, 30
    return multiplier, exponent


def _requant(rng: np.random.Generator, real: float, extreme: float) -> tuple[int, int]:
    """A realistic multiplier around ``real`` or, with probability ``extreme``, an extreme one."""
    if rng.random() < extreme:
        choices = [(INT32_MAX, 30), (INT32_MAX, 0), (INT32_MAX, 10), (1, -31), (0, 0), (2**30, -31),
                   (int(rng.integers(0, 2**31)), int(rng.integers(-31, 31)))]
        return choices[rng.integers(len(choices))]
    return quantize_multiplier(real * float(rng.uniform(0.5, 2.0)))


def _requant_array(rng: np.random.Generator, real: float, shape: tuple[int, ...], extreme: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_requant(rng, real, extreme) for _ in range(math.prod(shape))]
    multiplier = np.array([m for m, _ in pairs], dtype=np.int32).reshape(shape)
    shift = np.array([s for _, s in pairs], dtype=np.int32).reshape(shape)
    return multiplier, shift


def _int8_weights(rng: np.random.Generator, shape: tuple[int, ...], extreme: float) -> np.ndarray:
    kind = rng.random()
    if kind < extreme / 2:
        return rng.choice(np.array([-128, 127], dtype=np.int8), size=shape)
    if kind < extreme:
        return rng.integers(-8, 9, size=shape, dtype=np.int8)
    return rng.integers(-128, 128, size=shape, dtype=np.int8)


def _bias(rng: np.random.Generator, shape: tuple[int, ...], typical: float, extreme: float) -> np.ndarray:
    if rng.random() < extreme:  # anywhere in int32, edges included: the accumulator wraps
        b = rng.integers(INT32_MIN, INT32_MAX, size=shape, endpoint=True, dtype=np.int64)
        b.flat[rng.integers(b.size)] = rng.choice([INT32_MIN, INT32_MAX])
        return b.astype(np.int32)
    return np.clip(np.round(rng.normal(0.0, typical, size=shape)), INT32_MIN, INT32_MAX).astype(np.int32)


def _zero_point(rng: np.random.Generator) -> int:
    return int(rng.choice([-128, 127, 0])) if rng.random() < 0.2 else int(rng.integers(-128, 128))


def random_layer(rng: np.random.Generator, input_size: int, hidden_size: int, input_zero_point: int, *,
                 per_channel: bool, extreme: float = 0.1) -> LSTMLayer:
    H, In = hidden_size, input_size
    acc_x = _INT8_STD * _INT8_STD * math.sqrt(In)  # typical size of the input half's accumulator
    acc_h = _INT8_STD * _INT8_STD * math.sqrt(H)
    q_shape = (4, H) if per_channel else (4,)
    mx, sx = _requant_array(rng, 4096 / acc_x, q_shape, extreme)  # gates of order one in Q3.12
    mh, sh = _requant_array(rng, 4096 / acc_h, q_shape, extreme)
    cell_scale_power = int(rng.integers(-20, 0)) if rng.random() < extreme else int(rng.integers(-15, -9))
    output_scale = 1 / 128
    ftc = _requant(rng, 2.0**-15, extreme)  # forget (Q0.15) * cell -> cell
    itc = _requant(rng, 2.0 ** (-30 - cell_scale_power), extreme)  # input (Q0.15) * candidate (Q0.15) -> cell
    out = _requant(rng, 2.0**-30 / output_scale, extreme)  # output (Q0.15) * tanh (Q0.15) -> h
    return LSTMLayer(
        input_size=In, hidden_size=H,
        input_zero_point=input_zero_point, output_zero_point=_zero_point(rng),
        input_scale=1 / 64, output_scale=output_scale,
        cell_scale_power=cell_scale_power,
        cell_clip=0 if rng.random() < 0.5 else int(rng.integers(1, 32768)),
        input_weights=_int8_weights(rng, (4, H, In), extreme),
        hidden_weights=_int8_weights(rng, (4, H, H), extreme),
        bias=_bias(rng, (4, H), acc_x, extreme),
        input_multiplier=mx, input_shift=sx, hidden_multiplier=mh, hidden_shift=sh,
        forget_to_cell_multiplier=ftc[0], forget_to_cell_shift=ftc[1],
        input_to_cell_multiplier=itc[0], input_to_cell_shift=itc[1],
        output_multiplier=out[0], output_shift=out[1],
    )


def drive_cells_to_rails(layer: LSTMLayer, rng: np.random.Generator) -> LSTMLayer:
    """``layer`` unclipped (cell_clip = 0), with gates that push its cells to -32768 and 32767 and keep them there:
    input and forget gates near 1 (a large bias on their input half), a forget_to_cell of exactly 2^-15 (TFLite's
    power-of-two cell scale), a cell scale of 2^-15 to 2^-13 (a few steps from 0 to a rail), and per unit a
    candidate held near +1 or -1 by a large bias, or following its inputs through a 16 times larger multiplier
    (the cell then jumps from rail to rail). h, fed back through the hidden weights, carries the saturated cells
    into the next step."""
    H, In = layer.hidden_size, layer.input_size
    acc_x = _INT8_STD * _INT8_STD * math.sqrt(In)
    acc_h = _INT8_STD * _INT8_STD * math.sqrt(H)
    q_shape = layer.input_multiplier.shape
    mx, sx = _requant_array(rng, 4096 / acc_x, q_shape, 0.0)
    mx[2], sx[2] = _requant_array(rng, 16 * 4096 / acc_x, q_shape[1:], 0.0)
    mh, sh = _requant_array(rng, 4096 / acc_h, q_shape, 0.0)
    large = round(64 * acc_x)  # the input half saturates to 8.0 in Q3.12 whatever the inputs
    bias = layer.bias.copy()
    bias[0] = bias[1] = large
    bias[2] = rng.choice([-large, 0, large], size=H)
    cell_scale_power = int(rng.integers(-15, -12))
    ftc = quantize_multiplier(2.0**-15)
    itc = quantize_multiplier(2.0 ** (-30 - cell_scale_power))
    return dataclasses.replace(
        layer, cell_clip=0, cell_scale_power=cell_scale_power, bias=bias,
        input_multiplier=mx, input_shift=sx, hidden_multiplier=mh, hidden_shift=sh,
        forget_to_cell_multiplier=ftc[0], forget_to_cell_shift=ftc[1],
        input_to_cell_multiplier=itc[0], input_to_cell_shift=itc[1],
    )


def random_head(rng: np.random.Generator, input_size: int, output_size: int, input_zero_point: int, *,
                per_channel: bool, extreme: float = 0.1) -> DenseHead:
    acc = _INT8_STD * _INT8_STD * math.sqrt(input_size)
    m, s = _requant_array(rng, 40 / acc, (output_size if per_channel else 1,), extreme)
    return DenseHead(
        input_size=input_size, output_size=output_size,
        input_zero_point=input_zero_point, output_zero_point=_zero_point(rng), output_scale=1 / 16,
        weights=_int8_weights(rng, (output_size, input_size), extreme),
        bias=_bias(rng, (output_size,), acc, extreme),
        multiplier=m, shift=s,
    )


def _size(rng: np.random.Generator, largest: int, big: float) -> int:
    """Mostly small sizes (fast to compile and run), the largest ones with probability ``big``."""
    if rng.random() < big:
        return int(rng.integers(largest // 2, largest + 1))
    return int(rng.integers(1, min(largest, 24) + 1))


def random_model(seed: int, *, layers: int | None = None, input_size: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None, outputs: int | None | bool = True,
                 window: int | None = None, per_channel: bool | None = None,
                 head_per_channel: bool | None = None, extreme: float = 0.1, big: float = 0.08,
                 rails: float = 0.2) -> QuantizedModel:
    """A valid random model; every argument left out is drawn from the seed.

    outputs: an int for a dense head of that size, None for no head, True to draw it (or its absence).
    rails: the share of layers whose cells are driven to the int16 rails (drive_cells_to_rails); like the other
    extreme parameters, none with extreme = 0 (realistic models). Those draws come from a second generator, so
    the other parameters of a seed's model do not depend on them.
    """
    rng = np.random.default_rng(seed)
    rail_rng = np.random.default_rng([seed, 1])
    rail_share = rails if extreme > 0 else 0.0
    if hidden_sizes is None:
        n = layers if layers is not None else int(rng.integers(1, 4))
        hidden_sizes = tuple(_size(rng, 128, big) for _ in range(n))
    if input_size is None:
        input_size = 32 if rng.random() < 0.1 else _size(rng, 32, big)
    if window is None:
        window = int(rng.integers(100, 201)) if rng.random() < big else int(rng.integers(1, 41))
    if per_channel is None:
        per_channel = bool(rng.random() < 0.4)
    input_zero_point = _zero_point(rng)
    stack = []
    previous, zero_point = input_size, input_zero_point
    for hidden in hidden_sizes:
        layer = random_layer(rng, previous, hidden, zero_point, per_channel=per_channel, extreme=extreme)
        stack.append(drive_cells_to_rails(layer, rail_rng) if rail_rng.random() < rail_share else layer)
        previous, zero_point = hidden, stack[-1].output_zero_point
    if outputs is True:
        outputs = int(rng.integers(1, 17)) if rng.random() < 0.7 else None
    head = None
    if outputs is not None:
        if head_per_channel is None:
            head_per_channel = per_channel if rng.random() < 0.8 else not per_channel
        head = random_head(rng, previous, int(outputs), zero_point, per_channel=head_per_channel, extreme=extreme)
    model = QuantizedModel(
        input=InputSpec(features=input_size, window=window, scale=1 / 64, zero_point=input_zero_point),
        layers=stack, head=head, name=f"random_{seed}",
    )
    model.validate()
    return model


def random_windows(seed: int, model: QuantizedModel, count: int) -> np.ndarray:
    """int8 windows [count, window, features]: uniform, some with -128/127 sprinkled in, some all extremes."""
    rng = np.random.default_rng(seed)
    shape = (model.input.window, model.input.features)
    windows = rng.integers(-128, 128, size=(count, *shape), dtype=np.int8)
    for w in windows:
        kind = rng.random()
        if kind < 0.25:  # every sample at a rail
            w[...] = rng.choice(np.array([-128, 127], dtype=np.int8), size=shape)
        elif kind < 0.35:  # constant at one rail
            w[...] = rng.choice([-128, 127])
        elif kind < 0.7:  # a fifth of the samples at a rail
            mask = rng.random(shape) < 0.2
            w[mask] = rng.choice(np.array([-128, 127], dtype=np.int8), size=int(mask.sum()))
    return windows
