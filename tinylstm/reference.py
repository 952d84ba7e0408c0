"""The integer reference: numpy, integers only. It defines, bit for bit, what the device computes.

The arithmetic is the TFLite-Micro / CMSIS-NN int8 LSTM (int8 activations and weights, int16 gates in Q3.12
before the activation, Q0.15 after, an int16 cell state with a power-of-two scale); docs/quantization.md
describes every rounding rule. Every value is held in int64 numpy arrays and wrapped or clamped exactly where
the C kernel wraps or clamps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylstm.qmodel import DenseHead, LSTMLayer, QuantizedModel

# sigmoid(i / 24) in unsigned Q0.16 for i = 0..255: the shared TFLite-Micro / CMSIS-NN table.
SIGMOID_TABLE = np.array([
    32768, 33451, 34133, 34813, 35493, 36169, 36843, 37513, 38180, 38841, 39498, 40149, 40794, 41432, 42064, 42688,
    43304, 43912, 44511, 45102, 45683, 46255, 46817, 47369, 47911, 48443, 48964, 49475, 49975, 50464, 50942, 51409,
    51865, 52311, 52745, 53169, 53581, 53983, 54374, 54755, 55125, 55485, 55834, 56174, 56503, 56823, 57133, 57433,
    57724, 58007, 58280, 58544, 58800, 59048, 59288, 59519, 59743, 59959, 60168, 60370, 60565, 60753, 60935, 61110,
    61279, 61441, 61599, 61750, 61896, 62036, 62172, 62302, 62428, 62549, 62666, 62778, 62886, 62990, 63090, 63186,
    63279, 63368, 63454, 63536, 63615, 63691, 63765, 63835, 63903, 63968, 64030, 64090, 64148, 64204, 64257, 64308,
    64357, 64405, 64450, 64494, 64536, 64576, 64614, 64652, 64687, 64721, 64754, 64786, 64816, 64845, 64873, 64900,
    64926, 64950, 64974, 64997, 65019, 65039, 65060, 65079, 65097, 65115, 65132, 65149, 65164, 65179, 65194, 65208,
    65221, 65234, 65246, 65258, 65269, 65280, 65291, 65301, 65310, 65319, 65328, 65337, 65345, 65352, 65360, 65367,
    65374, 65381, 65387, 65393, 65399, 65404, 65410, 65415, 65420, 65425, 65429, 65433, 65438, 65442, 65445, 65449,
    65453, 65456, 65459, 65462, 65465, 65468, 65471, 65474, 65476, 65479, 65481, 65483, 65485, 65488, 65489, 65491,
    65493, 65495, 65497, 65498, 65500, 65501, 65503, 65504, 65505, 65507, 65508, 65509, 65510, 65511, 65512, 65513,
    65514, 65515, 65516, 65517, 65517, 65518, 65519, 65520, 65520, 65521, 65522, 65522, 65523, 65523, 65524, 65524,
    65525, 65525, 65526, 65526, 65526, 65527, 65527, 65528, 65528, 65528, 65529, 65529, 65529, 65529, 65530, 65530,
    65530, 65530, 65531, 65531, 65531, 65531, 65531, 65532, 65532, 65532, 65532, 65532, 65532, 65533, 65533, 65533,
    65533, 65533, 65533, 65533, 65533, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65535,
], dtype=np.int64)

INT16_MIN, INT16_MAX = -32768, 32767


def cell_bounds(cell_clip: int) -> tuple[int, int]:
    """The cell state's (lower, upper) bounds: (-cell_clip, cell_clip), or the int16 range when cell_clip is 0
    (no clipping), as CMSIS-NN's arm_elementwise_mul_acc_s16 and TFLite Micro saturate it."""
    return (-cell_clip, cell_clip) if cell_clip > 0 else (INT16_MIN, INT16_MAX)


def wrap_int32(v: np.ndarray) -> np.ndarray:
    """Two's-complement wrap to int32, as a 32-bit register does."""
    return ((np.asarray(v, dtype=np.int64) + 2**31) & 0xFFFFFFFF) - 2**31


def rounding_divide_by_pot(v: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """v / 2**exponent, rounded to nearest with ties away from zero (gemmlowp RoundingDivideByPOT)."""
    v = np.asarray(v, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = v & mask
    result = v >> exponent
    threshold = (mask >> 1) + (result < 0)
    return result + (remainder > threshold)


def requantize(v: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """int32 value times multiplier * 2**(shift - 31), rounded twice as TFLite's MultiplyByQuantizedMultiplier.

    1. left shift by max(shift, 0), wrapping to int32;
    2. rounding doubling high multiply: (v * multiplier + 2**30) >> 31 (ties up, never saturates);
    3. rounding right shift by max(-shift, 0), ties away from zero.
    """
    shift = np.asarray(shift, dtype=np.int64)
    shifted = wrap_int32(np.asarray(v, dtype=np.int64) << np.maximum(shift, 0))
    high = (shifted * np.asarray(multiplier, dtype=np.int64) + (1 << 30)) >> 31
    return rounding_divide_by_pot(high, np.maximum(-shift, 0))


def _activation(x: np.ndarray, left_shift: int, tanh: bool) -> np.ndarray:
    """int16 -> int16 sigmoid (Q0.15) or tanh (Q0.15) through the 256-entry table with linear interpolation.

    The input is first multiplied by 3 * 2**left_shift, or, for a negative left_shift, multiplied by 3 and
    divided by 2**-left_shift rounding half up. Sigmoid then indexes the table in steps of 2**9, tanh in steps
    of 2**8 (tanh(x) = 2 * sigmoid(2x) - 1).
    """
    x = np.asarray(x, dtype=np.int64)
    if left_shift >= 0:
        v = x * (3 << left_shift)
    else:
        v = (x * 3 + (1 << (-left_shift - 1))) >> -left_shift
    a = np.abs(v)
    step = 8 if tanh else 9
    idx = a >> step
    inside = idx < 255
    i = np.minimum(idx, 254)
    lo, hi = SIGMOID_TABLE[i], SIGMOID_TABLE[i + 1]
    frac = a & ((1 << step) - 1)
    saturated = (0xFFFF << 8) if tanh else (0x7FFF << 10)
    r = np.where(inside, (lo << step) + frac * (hi - lo), saturated)
    if tanh:
        out = np.where(v >= 0, (r - (1 << 23) + (1 << 7)) >> 8, ((1 << 23) - r + (1 << 7) - 1) >> 8)
    else:
        out = np.where(v >= 0, (r + (1 << 9)) >> 10, ((1 << 25) - r + (1 << 9) - 1) >> 10)
    return out


def sigmoid_q15(x: np.ndarray) -> np.ndarray:
    """sigmoid of a Q3.12 int16 value, as Q0.15."""
    return _activation(x, 0, tanh=False)


def tanh_q15(x: np.ndarray, left_shift: int = 0) -> np.ndarray:
    """tanh of an int16 value scaled by 2**(left_shift - 12), as Q0.15."""
    return _activation(x, left_shift, tanh=True)


@dataclass
class LayerState:
    """h (int8 values) and c (int16 values) of one layer, as int64 columns [H, N]: one column per sequence."""

    h: np.ndarray
    c: np.ndarray


class LayerKernel:
    """One layer with its zero-point terms folded into effective biases, as the device stores them."""

    def __init__(self, layer: LSTMLayer) -> None:
        self.layer = layer
        self.wx = layer.input_weights.astype(np.int64)
        self.wh = layer.hidden_weights.astype(np.int64)
        # The input half adds bias + input_offset * rowsum(W_x), with input_offset = -input_zero_point.
        self.input_bias = layer.bias.astype(np.int64) - layer.input_zero_point * self.wx.sum(axis=2)
        # The hidden half folds the zero point of h: -output_zero_point * rowsum(W_h).
        self.hidden_bias = -layer.output_zero_point * self.wh.sum(axis=2)
        self.mx, self.sx = _per_row(layer.input_multiplier), _per_row(layer.input_shift)
        self.mh, self.sh = _per_row(layer.hidden_multiplier), _per_row(layer.hidden_shift)
        self.cell_min, self.cell_max = cell_bounds(layer.cell_clip)

    def initial_state(self, columns: int = 1) -> LayerState:
        H = self.layer.hidden_size
        return LayerState(h=np.full((H, columns), self.layer.output_zero_point, np.int64),
                          c=np.zeros((H, columns), np.int64))

    def gates(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """The four gate pre-activations [4, H, N], int16 Q3.12, for inputs x [I, N] and hidden states h [H, N]."""
        acc_x = wrap_int32(self.input_bias[:, :, None] + np.einsum("ghi,in->ghn", self.wx, x))
        acc_h = wrap_int32(self.hidden_bias[:, :, None] + np.einsum("ghj,jn->ghn", self.wh, h))
        g = np.clip(requantize(acc_x, self.mx, self.sx), INT16_MIN, INT16_MAX)
        return np.clip(requantize(acc_h, self.mh, self.sh) + g, INT16_MIN, INT16_MAX)

    def update_cell(self, i: np.ndarray, f: np.ndarray, g: np.ndarray, c: np.ndarray) -> np.ndarray:
        """The new cell state from the input, forget and cell gates (Q0.15) and the previous cell state:
        clamp16(f * c requantized) + (i * g requantized), clamped to the cell's bounds (``cell_bounds``)."""
        layer = self.layer
        fc = np.clip(requantize(f * c, layer.forget_to_cell_multiplier, layer.forget_to_cell_shift),
                     INT16_MIN, INT16_MAX)
        ig = requantize(i * g, layer.input_to_cell_multiplier, layer.input_to_cell_shift)
        return np.clip(fc + ig, self.cell_min, self.cell_max)

    def step(self, x: np.ndarray, state: LayerState) -> LayerState:
        """One time step for inputs x [I, N] (int8 values); returns the new state."""
        layer = self.layer
        pre = self.gates(np.asarray(x, dtype=np.int64), state.h)
        i, f, o = sigmoid_q15(pre[0]), sigmoid_q15(pre[1]), sigmoid_q15(pre[3])
        c = self.update_cell(i, f, tanh_q15(pre[2]), state.c)
        t = tanh_q15(c, layer.cell_scale_power + 12)
        h = requantize(o * t, layer.output_multiplier, layer.output_shift) + layer.output_zero_point
        return LayerState(h=np.clip(h, -128, 127), c=c)


def _per_row(a: np.ndarray) -> np.ndarray:
    """Multipliers/shifts as [4, 1, 1] (per-tensor) or [4, H, 1] (per-channel), to broadcast over [4, H, N]."""
    a = np.asarray(a, dtype=np.int64)
    return a.reshape(4, -1, 1)


def dense(head: DenseHead, h: np.ndarray) -> np.ndarray:
    """int8 fully connected on columns h [H, N]: bias + sum W (h - zp_in), requantized, plus zp_out, clamped."""
    w = head.weights.astype(np.int64)
    acc = wrap_int32((head.bias.astype(np.int64) - head.input_zero_point * w.sum(axis=1))[:, None] + w @ h)
    m = head.multiplier.astype(np.int64)[:, None]
    s = head.shift.astype(np.int64)[:, None]
    return np.clip(requantize(acc, m, s) + head.output_zero_point, -128, 127)


class Reference:
    """The integer model with streaming state: reset, step one sample, or run a whole window.

    It runs N independent sequences side by side (N = 1 by default); each column is computed exactly as the
    device computes its one sequence.
    """

    def __init__(self, model: QuantizedModel, columns: int = 1) -> None:
        model.validate()
        self.model = model
        self.columns = columns
        self.kernels = [LayerKernel(layer) for layer in model.layers]
        self.reset()

    def reset(self) -> None:
        self.states = [k.initial_state(self.columns) for k in self.kernels]

    def step(self, x_t: np.ndarray) -> np.ndarray:
        """One time step of int8 input [F] (or [N, F]); returns the last layer's h (int8 [H] or [N, H])."""
        x = np.asarray(x_t, dtype=np.int64)
        v = x.reshape(-1, 1) if x.ndim == 1 else x.T
        for n, kernel in enumerate(self.kernels):
            self.states[n] = kernel.step(v, self.states[n])
            v = self.states[n].h
        return self._rows(v, x.ndim)

    def output(self, _ndim: int = 1) -> np.ndarray:
        """The model's output for the current state: the head applied to the last h, or h itself."""
        h = self.states[-1].h
        return self._rows(dense(self.model.head, h) if self.model.head else h, _ndim)

    def run(self, window: np.ndarray) -> np.ndarray:
        """Reset, step through int8 inputs [T, F] (or [N, T, F]), and return the output (int8 [O] or [N, O])."""
        window = np.asarray(window)
        batched = window.ndim == 3
        if batched and window.shape[0] != self.columns:
            self.columns = window.shape[0]
        self.reset()
        steps = window.transpose(1, 0, 2) if batched else window
        for x_t in steps:
            self.step(x_t)
        return self.output(2 if batched else 1)

    @staticmethod
    def _rows(v: np.ndarray, ndim: int) -> np.ndarray:
        return (v[:, 0] if ndim == 1 else v.T).astype(np.int8)


def run_batch(model: QuantizedModel, windows: np.ndarray) -> np.ndarray:
    """Outputs (int8 [N, O]) for int8 windows [N, T, F], each from the initial state."""
    return Reference(model, columns=len(windows)).run(windows)
