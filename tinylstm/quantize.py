"""Post-training INT8 quantization (and optional quantization-aware fine-tuning) of a trained float model.

The result is a ``tinylstm.qmodel.QuantizedModel`` in the TFLite-Micro / CMSIS-NN int8 LSTM arithmetic that
``tinylstm.reference`` runs and docs/quantization.md defines: int8 x and h (asymmetric), int8 symmetric weights
(per gate, or per gate row), int32 biases at scale s_in * s_w, Q3.12 gate pre-activations, an int16 cell
state with a power-of-two scale, and a TFLite FULLY_CONNECTED head.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tinylstm import evaluate
from tinylstm.data import Dataset, Split
from tinylstm.qmodel import DenseHead, InputSpec, LSTMLayer, QuantizedModel
from tinylstm.train import Checkpoint, EpochLog, LSTMModel, TrainConfig, TrainResult, fit

GATE_FRACTION_BITS = 12  # Q3.12 gate pre-activations
CALIBRATION_METHODS = ("minmax", "percentile")


class QuantizeError(ValueError):
    """A model or setting the quantizer cannot turn into a valid integer model."""


@dataclass
class QuantConfig:
    per_channel: bool = False
    calibration: str = "minmax"  # or "percentile"
    percentile: float = 99.9  # for "percentile": keep this share of values inside the range
    calibration_windows: int = 2048  # at most this many training windows are used to calibrate


@dataclass
class Ranges:
    """Calibrated float ranges: the normalised input, and per layer h (min, max) and |c| max; the head's output."""

    x: tuple[float, float]
    h: list[tuple[float, float]] = field(default_factory=list)
    c: list[float] = field(default_factory=list)
    out: tuple[float, float] = (0.0, 0.0)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(m, s) with real = m * 2**(s - 31), m in [2^30, 2^31): TFLite's QuantizeMultiplier. 0 gives (0, 0)."""
    if real < 0:
        raise QuantizeError(f"negative rescale factor {real}")
    if real == 0:
        return 0, 0
    q, shift = math.frexp(real)  # real = q * 2**shift, q in [0.5, 1)
    m = round(q * (1 << 31))
    if m == 1 << 31:
        m //= 2
        shift += 1
    if shift < -31:  # too small to represent: the product rounds to zero anyway
        return 0, 0
    if shift > 30:
        raise QuantizeError(f"rescale factor {real:g} is too large for a 32-bit multiplier")
    return m, shift


def quantize_multipliers(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = [quantize_multiplier(float(v)) for v in np.asarray(real, dtype=np.float64).ravel()]
    m = np.array([p[0] for p in pairs], dtype=np.int32).reshape(np.shape(real))
    s = np.array([p[1] for p in pairs], dtype=np.int32).reshape(np.shape(real))
    return m, s


def asymmetric_params(lo: float, hi: float) -> tuple[float, int]:
    """int8 scale and zero point for a float range, widened to include 0 so that 0 is exact."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def cell_scale_power(c_max: float) -> int:
    """The smallest power-of-two cell scale 2^p for which int16 holds +-c_max, within the kernel's [-20, -1]."""
    if c_max <= 0:
        return -15
    p = math.ceil(math.log2(c_max / 32767.0))
    return int(np.clip(p, -20, -1))


def weight_scales(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric int8 scales for gate weights [4, H, K]: per gate [4] or per gate row [4, H]."""
    amax = np.abs(w).max(axis=2) if per_channel else np.abs(w).max(axis=(1, 2))
    return np.where(amax > 0, amax / 127.0, 1.0)


def _broadcast(scales: np.ndarray, ndim: int) -> np.ndarray:
    return scales.reshape(scales.shape + (1,) * (ndim - scales.ndim))


def quantize_weights(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / _broadcast(scales, w.ndim)), -127, 127).astype(np.int8)


# --------------------------------------------------------------------------------------------- float trace


@dataclass
class FakeQuant:
    """Fixed quantization grids for quantization-aware fine-tuning (straight-through rounding)."""

    x: tuple[float, int]
    h: list[tuple[float, int]]
    cell_powers: list[int]
    out: tuple[float, int]
    per_channel: bool


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def _fq_affine(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    q = (torch.clamp(torch.round(x / scale) + zp, -128, 127) - zp) * scale
    return _ste(x, q)


def _fq_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """w [4, H, K] on its symmetric int8 grid."""
    amax = w.detach().abs().amax(dim=2, keepdim=True) if per_channel else w.detach().abs().amax(dim=(1, 2),
                                                                                                keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return _ste(w, torch.clamp(torch.round(w / scale), -127, 127) * scale)


def _fq_fixed(x: torch.Tensor, step: float, limit: float) -> torch.Tensor:
    return _ste(x, torch.clamp(torch.round(x / step), -limit, limit) * step)


def unrolled_forward(model: LSTMModel, x: torch.Tensor, fq: FakeQuant | None = None,
                     trace: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """The model step by step with PyTorch's LSTM equations; with ``fq``, every value on its integer grid.

    ``trace`` (if given) receives, per layer, the h and c sequences [N, T, H].
    """
    if fq is not None:
        x = _fq_affine(x, *fq.x)
    for n, lstm in enumerate(model.lstms):
        H = lstm.hidden_size
        w_ih = lstm.weight_ih_l0.reshape(4, H, -1)
        w_hh = lstm.weight_hh_l0.reshape(4, H, H)
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).reshape(4 * H)
        if fq is not None:
            w_ih, w_hh = _fq_weight(w_ih, fq.per_channel), _fq_weight(w_hh, fq.per_channel)
        w_ih, w_hh = w_ih.reshape(4 * H, -1), w_hh.reshape(4 * H, H)
        h = torch.zeros(x.shape[0], H)
        c = torch.zeros(x.shape[0], H)
        x_proj = x @ w_ih.T + bias
        hs, cs = [], []
        for t in range(x.shape[1]):
            pre = x_proj[:, t] + h @ w_hh.T
            if fq is not None:  # Q3.12 gate pre-activations
                pre = _fq_fixed(pre, 2.0**-GATE_FRACTION_BITS, 32767)
            i, f, g, o = pre.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if fq is not None:
                c = _fq_fixed(c, 2.0 ** fq.cell_powers[n], 32767)
            h = torch.sigmoid(o) * torch.tanh(c)
            if fq is not None:
                h = _fq_affine(h, *fq.h[n])
            hs.append(h)
            cs.append(c)
        x = torch.stack(hs, 1)
        if trace is not None:
            trace.append((x, torch.stack(cs, 1)))
    w = model.head.weight
    if fq is not None:
        w = _fq_weight(w[None], fq.per_channel)[0]
    out = x[:, -1] @ w.T + model.head.bias
    return _fq_affine(out, *fq.out) if fq is not None else out


# --------------------------------------------------------------------------------------------- calibration


def _range(values: torch.Tensor, config: QuantConfig) -> tuple[float, float]:
    v = values.detach().reshape(-1).double().numpy()
    if config.calibration == "percentile":
        tail = (100.0 - config.percentile) / 2
        return float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail))
    return float(v.min()), float(v.max())


def calibrate(model: LSTMModel, x: np.ndarray, config: QuantConfig) -> Ranges:
    """Float ranges of the input, each layer's h and c, and the head's output, on normalised windows x."""
    if config.calibration not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration {config.calibration!r}; choose minmax or percentile")
    if len(x) == 0:
        raise QuantizeError("no calibration windows")
    if len(x) > config.calibration_windows:
        idx = np.random.default_rng(0).choice(len(x), config.calibration_windows, replace=False)
        x = x[np.sort(idx)]
    xt = torch.from_numpy(np.ascontiguousarray(x))
    trace: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        out = unrolled_forward(model, xt, trace=trace)
    ranges = Ranges(x=_range(xt, config))
    for h, c in trace:
        ranges.h.append(_range(h, config))
        lo, hi = _range(c, config)
        ranges.c.append(max(abs(lo), abs(hi)))
    # The head always uses min/max: a clipped class score could tie with another one.
    ranges.out = _range(out, QuantConfig(calibration="minmax"))
    return ranges


# ---------------------------------------------------------------------------------------------- conversion


def convert(model: LSTMModel, ranges: Ranges, input_spec: InputSpec, per_channel: bool = False,
            name: str = "model") -> QuantizedModel:
    """The integer model for a float model and its calibrated ranges (input_spec: features, window, norm)."""
    s_in, zp_in = asymmetric_params(*ranges.x)
    spec = InputSpec(features=input_spec.features, window=input_spec.window, scale=s_in, zero_point=zp_in,
                     norm_kind=input_spec.norm_kind, norm_offset=list(input_spec.norm_offset),
                     norm_scale=list(input_spec.norm_scale))
    layers = []
    for n, lstm in enumerate(model.lstms):
        H = lstm.hidden_size
        w_ih = lstm.weight_ih_l0.detach().double().numpy().reshape(4, H, -1)
        w_hh = lstm.weight_hh_l0.detach().double().numpy().reshape(4, H, H)
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().double().numpy().reshape(4, H)
        s_h, zp_h = asymmetric_params(*ranges.h[n])
        sx, sh = weight_scales(w_ih, per_channel), weight_scales(w_hh, per_channel)
        acc_scale = s_in * (sx if per_channel else sx[:, None])  # [4, H]
        q_bias = np.round(bias / acc_scale)
        if np.abs(q_bias).max() >= 2**31:
            raise QuantizeError(f"layer {n}: a bias does not fit int32 at scale s_in * s_w")
        mx, shx = quantize_multipliers(s_in * sx * 2.0**GATE_FRACTION_BITS)
        mh, shh = quantize_multipliers(s_h * sh * 2.0**GATE_FRACTION_BITS)
        p = cell_scale_power(ranges.c[n])
        m_ic, s_ic = quantize_multiplier(2.0 ** (-30 - p))
        m_out, s_out = quantize_multiplier(2.0**-30 / s_h)
        layers.append(LSTMLayer(
            input_size=w_ih.shape[2], hidden_size=H, input_zero_point=zp_in, output_zero_point=zp_h,
            input_scale=s_in, output_scale=s_h, cell_scale_power=p, cell_clip=0,
            input_weights=quantize_weights(w_ih, sx), hidden_weights=quantize_weights(w_hh, sh),
            bias=q_bias.astype(np.int32), input_multiplier=mx, input_shift=shx, hidden_multiplier=mh,
            hidden_shift=shh, forget_to_cell_multiplier=1 << 30, forget_to_cell_shift=-14,
            input_to_cell_multiplier=m_ic, input_to_cell_shift=s_ic, output_multiplier=m_out, output_shift=s_out,
        ))
        s_in, zp_in = s_h, zp_h
    w = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    s_y, zp_y = asymmetric_params(*ranges.out)
    sw = weight_scales(w[None], per_channel).reshape(-1)  # [O] per output row, or [1]
    m_y, s_y_shift = quantize_multipliers(s_in * sw / s_y)
    head = DenseHead(
        input_size=w.shape[1], output_size=w.shape[0], input_zero_point=zp_in, output_zero_point=zp_y,
        output_scale=s_y, weights=quantize_weights(w, sw),
        bias=np.round(b / (s_in * np.broadcast_to(sw, b.shape))).astype(np.int32),
        multiplier=m_y, shift=s_y_shift,
    )
    qmodel = QuantizedModel(input=spec, layers=layers, head=head, name=name)
    qmodel.validate()
    return qmodel


def input_spec_for(dataset: Dataset) -> InputSpec:
    norm = dataset.input_norm
    kind = norm.kind
    return InputSpec(features=dataset.features, window=dataset.window, scale=1.0, zero_point=0, norm_kind=kind,
                     norm_offset=[] if kind == "none" else norm.offset.tolist(),
                     norm_scale=[] if kind == "none" else norm.scale.tolist())


def post_training_quantize(model: LSTMModel, dataset: Dataset, config: QuantConfig,
                           name: str = "model") -> QuantizedModel:
    """Calibrate on the training windows and convert."""
    ranges = calibrate(model, dataset.inputs(dataset.train), config)
    return convert(model, ranges, input_spec_for(dataset), config.per_channel, name)


def fake_quant_for(qmodel: QuantizedModel, per_channel: bool) -> FakeQuant:
    return FakeQuant(
        x=(qmodel.input.scale, qmodel.input.zero_point),
        h=[(layer.output_scale, layer.output_zero_point) for layer in qmodel.layers],
        cell_powers=[layer.cell_scale_power for layer in qmodel.layers],
        out=(qmodel.output_scale, qmodel.output_zero_point),
        per_channel=per_channel,
    )


def quantization_aware_finetune(model: LSTMModel, dataset: Dataset, config: QuantConfig, train_config: TrainConfig,
                                on_epoch: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """A few epochs of fine-tuning through the fake-quant forward, on grids from a first calibration."""
    grids = fake_quant_for(post_training_quantize(model, dataset, config), config.per_channel)
    return fit(model, dataset, train_config, on_epoch=on_epoch, forward=lambda x: unrolled_forward(model, x, grids))


@dataclass
class QuantizeResult:
    qmodel: QuantizedModel
    comparison: evaluate.Comparison  # FP32 (float_model) against INT8 (integer reference) on the evaluated split
    float_model: LSTMModel  # the checkpoint's model, or its fine-tuned copy after QAT
    qat: TrainResult | None = None


def quantize_checkpoint(checkpoint: Checkpoint, config: QuantConfig, *, qat_epochs: int = 0, qat_lr: float = 1e-3,
                        dataset: Dataset | None = None, name: str = "model",
                        on_epoch: Callable[[EpochLog], None] | None = None, split: Split | None = None
                        ) -> QuantizeResult:
    """Quantize a trained model (after ``qat_epochs`` of fake-quant fine-tuning, if any) and evaluate FP32 vs INT8
    on ``split`` (default: the test split; the model search evaluates its trials on the validation split).

    The INT8 side runs through the integer reference. An anomaly model's INT8 threshold is calibrated, like the
    float one, on the known-normal validation windows. The gap and everything a device or HIL tool needs to
    interpret the output (task, classes, target normalisation, threshold) go into the model's ``meta``.
    """
    if not all(torch.isfinite(p).all() for p in checkpoint.model.parameters()):
        raise QuantizeError("the checkpoint's weights are not finite numbers: its training diverged; train again "
                            "with a lower learning rate (--lr) or a smaller --clip-norm")
    dataset = dataset or checkpoint.dataset()
    model = checkpoint.model
    qat = None
    if qat_epochs > 0:
        model = copy.deepcopy(model)
        tc = checkpoint.train_config
        qat = quantization_aware_finetune(
            model, dataset, config, TrainConfig(epochs=qat_epochs, lr=qat_lr, batch_size=tc.batch_size,
                                                patience=qat_epochs, clip_norm=tc.clip_norm, seed=tc.seed,
                                                threads=tc.threads, optimizer=tc.optimizer,
                                                schedule=tc.schedule, class_weight=tc.class_weight), on_epoch)
    qmodel = post_training_quantize(model, dataset, config, name)
    fp32_threshold = int8_threshold = None
    if dataset.task == "anomaly":
        margin = checkpoint.extra.get("threshold_margin", evaluate.DEFAULT_THRESHOLD_MARGIN)
        fp32_threshold = evaluate.calibrate_threshold(evaluate.fp32_outputs(model, dataset, dataset.val),
                                                      dataset.val, margin)
        int8_threshold = evaluate.calibrate_threshold(evaluate.int8_outputs(qmodel, dataset, dataset.val),
                                                      dataset.val, margin)
    comparison = evaluate.compare(model, qmodel, dataset, dataset.test if split is None else split, fp32_threshold,
                                  int8_threshold)
    qmodel.meta = model_meta(dataset, config, qat_epochs, comparison, int8_threshold, fp32_threshold)
    return QuantizeResult(qmodel, comparison, model, qat)


def model_meta(dataset: Dataset, config: QuantConfig, qat_epochs: int, comparison: evaluate.Comparison,
               int8_threshold: float | None, fp32_threshold: float | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "task": dataset.task,
        "classes": dataset.classes,
        "features": dataset.feature_names,
        "targets": dataset.target_names,
        "horizon": dataset.spec.horizon if dataset.task == "forecasting" else None,
        "target_norm": dataset.target_norm.to_dict() if dataset.target_norm else None,
        "data_spec": dataset.spec.to_dict(),
        "quantization": {**asdict(config), "qat_epochs": qat_epochs},
        "evaluation": comparison.to_dict(),
        "accuracy_gap": comparison.gap,
    }
    if dataset.task == "anomaly":
        meta["anomaly_threshold"] = int8_threshold
        meta["fp32_anomaly_threshold"] = fp32_threshold
    return meta
