"""The quantized model: what the integer reference and the device compute from.

On disk it is one ``.npz`` file (format described in docs/model-format.md): a JSON document under the key
``__meta__`` with the scalars, and one integer array per parameter, named ``layers.<n>.<field>`` or
``head.<field>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "tinylstm-qmodel"
FORMAT_VERSION = 1
GATES = ("input", "forget", "cell", "output")  # gate order of every [4, ...] array
MAX_LAYERS = 3


class ModelFormatError(ValueError):
    """A model file that is corrupt, of another version, or internally inconsistent."""


@dataclass
class InputSpec:
    """How a raw sensor sample becomes the int8 input of the first layer.

    ``x_norm = (x - norm_offset) / norm_scale`` per feature, then ``q = clamp(round(x_norm / scale) + zero_point)``.
    """

    features: int
    window: int
    scale: float
    zero_point: int
    norm_kind: str = "none"  # "none", "zscore" or "minmax"
    norm_offset: list[float] = field(default_factory=list)
    norm_scale: list[float] = field(default_factory=list)


@dataclass
class LSTMLayer:
    """One int8 LSTM layer with the TFLite-Micro / CMSIS-NN 8x8->16 arithmetic (see docs/quantization.md).

    Gate arrays are ordered (input, forget, cell, output). Multipliers and shifts are per gate, shape [4]
    (per-tensor), or per gate row, shape [4, hidden] (per-channel).
    """

    input_size: int
    hidden_size: int
    input_zero_point: int  # int8 zero point of this layer's input
    output_zero_point: int  # int8 zero point of h
    input_scale: float
    output_scale: float  # scale of h
    cell_scale_power: int  # the cell state's scale is 2**cell_scale_power
    cell_clip: int  # |c| <= cell_clip; 0 means the int16 range
    input_weights: np.ndarray  # int8 [4, H, I]
    hidden_weights: np.ndarray  # int8 [4, H, H]
    bias: np.ndarray  # int32 [4, H]
    input_multiplier: np.ndarray  # int32 [4] or [4, H]
    input_shift: np.ndarray  # int32, same shape
    hidden_multiplier: np.ndarray
    hidden_shift: np.ndarray
    forget_to_cell_multiplier: int
    forget_to_cell_shift: int
    input_to_cell_multiplier: int
    input_to_cell_shift: int
    output_multiplier: int  # o * tanh(c) -> h
    output_shift: int

    @property
    def per_channel(self) -> bool:
        return self.input_multiplier.ndim == 2


@dataclass
class DenseHead:
    """An int8 fully connected layer on the last hidden state: TFLite FULLY_CONNECTED arithmetic."""

    input_size: int
    output_size: int
    input_zero_point: int
    output_zero_point: int
    output_scale: float
    weights: np.ndarray  # int8 [O, H]
    bias: np.ndarray  # int32 [O]
    multiplier: np.ndarray  # int32 [1] or [O]
    shift: np.ndarray  # int32, same shape


@dataclass
class QuantizedModel:
    input: InputSpec
    layers: list[LSTMLayer]
    head: DenseHead | None = None
    name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)  # task, classes, units, metrics: not used by the kernel

    @property
    def output_size(self) -> int:
        return self.head.output_size if self.head else self.layers[-1].hidden_size

    @property
    def output_scale(self) -> float:
        return self.head.output_scale if self.head else self.layers[-1].output_scale

    @property
    def output_zero_point(self) -> int:
        return self.head.output_zero_point if self.head else self.layers[-1].output_zero_point

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, dtype=np.float64) - self.output_zero_point) * self.output_scale

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Normalise raw samples [..., F] and quantize them to the int8 input of the first layer."""
        x = np.asarray(x, dtype=np.float64)
        if self.input.norm_kind != "none":
            x = (x - np.asarray(self.input.norm_offset)) / np.asarray(self.input.norm_scale)
        q = np.round(x / self.input.scale) + self.input.zero_point
        return np.clip(q, -128, 127).astype(np.int8)

    def digest(self) -> str:
        """A short content hash of everything the device computes with; identifies the model on a board."""
        h = hashlib.sha256()
        meta, arrays = _to_records(self)
        meta = {k: v for k, v in meta.items() if k not in ("meta", "name")}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for key in sorted(arrays):
            h.update(key.encode())
            h.update(np.ascontiguousarray(arrays[key]).tobytes())
        return h.hexdigest()[:16]

    def validate(self) -> None:
        validate(self)


# Field specs: (name, dtype, shape) where shape entries are attribute names or ints; None means "[4] or [4, H]".
_LAYER_SCALARS = (
    "input_size", "hidden_size", "input_zero_point", "output_zero_point", "input_scale", "output_scale",
    "cell_scale_power", "cell_clip", "forget_to_cell_multiplier", "forget_to_cell_shift",
    "input_to_cell_multiplier", "input_to_cell_shift", "output_multiplier", "output_shift",
)
_LAYER_ARRAYS = {
    "input_weights": np.int8, "hidden_weights": np.int8, "bias": np.int32,
    "input_multiplier": np.int32, "input_shift": np.int32, "hidden_multiplier": np.int32, "hidden_shift": np.int32,
}
_HEAD_SCALARS = ("input_size", "output_size", "input_zero_point", "output_zero_point", "output_scale")
_HEAD_ARRAYS = {"weights": np.int8, "bias": np.int32, "multiplier": np.int32, "shift": np.int32}


def _to_records(model: QuantizedModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    layers = []
    for n, layer in enumerate(model.layers):
        layers.append({k: _plain(getattr(layer, k)) for k in _LAYER_SCALARS})
        for k, dtype in _LAYER_ARRAYS.items():
            arrays[f"layers.{n}.{k}"] = np.asarray(getattr(layer, k), dtype=dtype)
    head = None
    if model.head is not None:
        head = {k: _plain(getattr(model.head, k)) for k in _HEAD_SCALARS}
        for k, dtype in _HEAD_ARRAYS.items():
            arrays[f"head.{k}"] = np.asarray(getattr(model.head, k), dtype=dtype)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": model.name,
        "input": {k: _plain(v) for k, v in vars(model.input).items()},
        "layers": layers,
        "head": head,
        "meta": model.meta,
    }
    return meta, arrays


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def save(model: QuantizedModel, path: str | Path) -> Path:
    """Validate and write the model atomically (a temporary file renamed into place)."""
    validate(model)
    path = Path(path)
    meta, arrays = _to_records(model)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    tmp.replace(path)
    return path


def load(path: str | Path) -> QuantizedModel:
    """Read and validate a model file; raise ModelFormatError naming what is wrong."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ModelFormatError(f"{path}: not a tinylstm model file ({e})") from None
    if "__meta__" not in files:
        raise ModelFormatError(f"{path}: not a tinylstm model file (no __meta__ record)")
    try:
        meta = json.loads(files.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: corrupt metadata ({e})") from None
    try:
        return from_records(meta, files)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None


def from_records(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> QuantizedModel:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFormatError("not a tinylstm model file (format tag missing)")
    if meta.get("version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"model format version {meta.get('version')!r} is not supported (this tinylstm reads {FORMAT_VERSION})"
        )
    try:
        spec = InputSpec(**_typed("input", meta["input"], InputSpec, tuple(meta["input"])))
        layers = []
        for n, rec in enumerate(meta["layers"]):
            kw = _typed(f"layers.{n}", rec, LSTMLayer, _LAYER_SCALARS)
            kw.update({k: _array(arrays, f"layers.{n}.{k}", dt) for k, dt in _LAYER_ARRAYS.items()})
            layers.append(LSTMLayer(**kw))
        head = None
        if meta.get("head") is not None:
            kw = _typed("head", meta["head"], DenseHead, _HEAD_SCALARS)
            kw.update({k: _array(arrays, f"head.{k}", dt) for k, dt in _HEAD_ARRAYS.items()})
            head = DenseHead(**kw)
    except (KeyError, TypeError) as e:
        raise ModelFormatError(f"missing or malformed field {e}") from None
    model = QuantizedModel(input=spec, layers=layers, head=head, name=meta.get("name", "model"),
                           meta=meta.get("meta") or {})
    validate(model)
    return model


# What a record's scalar of each annotated type may be in the JSON metadata.
_SCALAR_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[float]": (lambda v: isinstance(v, list) and all(_SCALAR_TYPES["float"][0](x) for x in v),
                    "a list of finite numbers"),
}


def _typed(where: str, record: Any, cls: type, keys: tuple[str, ...]) -> dict[str, Any]:
    """``keys`` of a metadata record, each checked against the type ``cls`` declares for it."""
    if not isinstance(record, dict):
        raise ModelFormatError(f"{where} must be a record, not {type(record).__name__}")
    kinds = {f.name: f.type for f in fields(cls)}
    values = {}
    for key in keys:
        if key not in kinds:
            raise ModelFormatError(f"{where}.{key} is not a field of the model format")
        value = record[key]
        test, must_be = _SCALAR_TYPES[kinds[key]]
        if not test(value):
            raise ModelFormatError(f"{where}.{key} = {value!r} must be {must_be}")
        values[key] = value
    return values


def _array(arrays: dict[str, np.ndarray], key: str, dtype: type) -> np.ndarray:
    if key not in arrays:
        raise ModelFormatError(f"array {key!r} is missing")
    a = arrays[key]
    if a.dtype != np.dtype(dtype):
        raise ModelFormatError(f"array {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    return a


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ModelFormatError(message)


def _check_shape(name: str, a: np.ndarray, *shapes: tuple[int, ...]) -> None:
    expected = " or ".join(str(list(s)) for s in shapes)
    _check(a.shape in shapes, f"{name} has shape {list(a.shape)}, expected {expected}")


def _check_int8(name: str, v: int) -> None:
    _check(isinstance(v, int) and -128 <= v <= 127, f"{name} = {v!r} is not an int8 zero point")


def _check_requant(name: str, mult: np.ndarray | int, shift: np.ndarray | int) -> None:
    m, s = np.asarray(mult), np.asarray(shift)
    _check(bool(np.all((m >= 0) & (m < 2**31))), f"{name} multiplier out of range [0, 2^31)")
    _check(bool(np.all((s >= -31) & (s <= 30))), f"{name} shift out of range [-31, 30]")


def validate(model: QuantizedModel) -> None:
    """Check every shape, range and link between layers; raise ModelFormatError on the first fault."""
    spec = model.input
    _check(isinstance(spec.features, int) and spec.features >= 1, f"input.features = {spec.features!r} must be >= 1")
    _check(isinstance(spec.window, int) and spec.window >= 1, f"input.window = {spec.window!r} must be >= 1")
    _check(spec.scale > 0, f"input.scale = {spec.scale!r} must be > 0")
    _check_int8("input.zero_point", spec.zero_point)
    _check(spec.norm_kind in ("none", "zscore", "minmax"), f"input.norm_kind {spec.norm_kind!r} is unknown")
    if spec.norm_kind != "none":
        _check(len(spec.norm_offset) == spec.features and len(spec.norm_scale) == spec.features,
               f"input normalisation needs {spec.features} offsets and scales")
        _check(all(s > 0 for s in spec.norm_scale), "input.norm_scale must be > 0")
    _check(1 <= len(model.layers) <= MAX_LAYERS, f"{len(model.layers)} LSTM layers; 1 to {MAX_LAYERS} are supported")
    prev_size, prev_zp = spec.features, spec.zero_point
    for n, layer in enumerate(model.layers):
        p = f"layers.{n}"
        H, In = layer.hidden_size, layer.input_size
        _check(isinstance(H, int) and H >= 1, f"{p}.hidden_size = {H!r} must be >= 1")
        _check(In == prev_size, f"{p}.input_size = {In} but the previous stage gives {prev_size}")
        _check(layer.input_zero_point == prev_zp,
               f"{p}.input_zero_point = {layer.input_zero_point} "
               f"but the previous stage's output zero point is {prev_zp}")
        _check_int8(f"{p}.output_zero_point", layer.output_zero_point)
        _check_shape(f"{p}.input_weights", layer.input_weights, (4, H, In))
        _check_shape(f"{p}.hidden_weights", layer.hidden_weights, (4, H, H))
        _check_shape(f"{p}.bias", layer.bias, (4, H))
        for half in ("input", "hidden"):
            m, s = getattr(layer, f"{half}_multiplier"), getattr(layer, f"{half}_shift")
            _check_shape(f"{p}.{half}_multiplier", m, (4,), (4, H))
            _check_shape(f"{p}.{half}_shift", s, m.shape)
            _check_requant(f"{p}.{half}", m, s)
        _check(layer.input_multiplier.shape == layer.hidden_multiplier.shape,
               f"{p}: input and hidden multipliers must both be per-tensor or both per-channel")
        _check(-20 <= layer.cell_scale_power <= -1, f"{p}.cell_scale_power = {layer.cell_scale_power} out of [-20, -1]")
        _check(0 <= layer.cell_clip <= 32767, f"{p}.cell_clip = {layer.cell_clip} out of [0, 32767]")
        for q in ("forget_to_cell", "input_to_cell", "output"):
            _check_requant(f"{p}.{q}", getattr(layer, f"{q}_multiplier"), getattr(layer, f"{q}_shift"))
        prev_size, prev_zp = H, layer.output_zero_point
    if model.head is not None:
        head = model.head
        _check(head.input_size == prev_size,
               f"head.input_size = {head.input_size} but the last layer gives {prev_size}")
        _check(head.input_zero_point == prev_zp,
               f"head.input_zero_point = {head.input_zero_point} but the last layer's is {prev_zp}")
        _check(isinstance(head.output_size, int) and head.output_size >= 1, "head.output_size must be >= 1")
        _check_int8("head.output_zero_point", head.output_zero_point)
        _check_shape("head.weights", head.weights, (head.output_size, head.input_size))
        _check_shape("head.bias", head.bias, (head.output_size,))
        _check_shape("head.multiplier", head.multiplier, (1,), (head.output_size,))
        _check_shape("head.shift", head.shift, head.multiplier.shape)
        _check_requant("head", head.multiplier, head.shift)
