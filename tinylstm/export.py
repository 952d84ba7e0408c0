"""Export a quantized model as C sources: a per-model header and source, plus the shared static kernel.

Every object the generated source defines comes from one layout (``_objects``): ``memory_layout`` sizes it for
a target, and ``render_c`` fills it with the model's values, so the planner's figures and the emitted C cannot
drift apart. Generated symbols are ``<prefix>_<buffer name>`` (static) and ``<prefix>_<api function>``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from tinylstm.qmodel import LSTMLayer, QuantizedModel
from tinylstm.reference import SIGMOID_TABLE, LayerKernel, cell_bounds, wrap_int32

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "firmware_templates"
KERNEL_FILES = ("tinylstm_kernel.h", "tinylstm_kernel.c")
ARCHS = ("avr", "arm", "host")
# Kernel variants: the readable reference, and the optimized kernels beside it (same API, same output bytes).
VARIANTS = ("reference", "arm_dsp", "avr")
VARIANT_FILES = {
    "reference": KERNEL_FILES,
    "arm_dsp": (*KERNEL_FILES, "tinylstm_kernel_arm_dsp.h", "tinylstm_kernel_arm_dsp.c"),
    "avr": (*KERNEL_FILES, "tinylstm_kernel_avr.h"),
}

# (size, alignment) of each C type the generated objects use, per target: AVR (avr-gcc: 16-bit pointers, no
# alignment), Arm EABI (32-bit), host x86-64 (LP64).
_TYPES: dict[str, dict[str, tuple[int, int]]] = {
    "avr": {"int8_t": (1, 1), "uint8_t": (1, 1), "int16_t": (2, 1), "uint16_t": (2, 1), "int32_t": (4, 1),
            "uint32_t": (4, 1), "ptr": (2, 1)},
    "arm": {"int8_t": (1, 1), "uint8_t": (1, 1), "int16_t": (2, 2), "uint16_t": (2, 2), "int32_t": (4, 4),
            "uint32_t": (4, 4), "ptr": (4, 4)},
    "host": {"int8_t": (1, 1), "uint8_t": (1, 1), "int16_t": (2, 2), "uint16_t": (2, 2), "int32_t": (4, 4),
             "uint32_t": (4, 4), "ptr": (8, 8)},
}

# The parameter structs of tinylstm_kernel.h, field by field in declaration order ("ptr" is any data pointer).
_STRUCTS: dict[str, tuple[tuple[str, str], ...]] = {
    "tinylstm_lstm_params": (
        ("input_weights", "ptr"), ("hidden_weights", "ptr"), ("input_bias", "ptr"), ("hidden_bias", "ptr"),
        ("input_multiplier", "ptr"), ("input_shift", "ptr"), ("hidden_multiplier", "ptr"), ("hidden_shift", "ptr"),
        ("forget_to_cell_multiplier", "int32_t"), ("input_to_cell_multiplier", "int32_t"),
        ("output_multiplier", "int32_t"), ("input_size", "uint16_t"), ("hidden_size", "uint16_t"),
        ("cell_min", "int16_t"), ("cell_max", "int16_t"), ("forget_to_cell_shift", "int8_t"),
        ("input_to_cell_shift", "int8_t"),
        ("output_shift", "int8_t"), ("cell_tanh_shift", "int8_t"), ("output_zero_point", "int8_t"),
        ("per_channel", "uint8_t"),
    ),
    "tinylstm_avr_layer_params": (
        ("weights", "ptr"), ("bias", "ptr"), ("multiplier", "ptr"), ("shift", "ptr"),
        ("forget_to_cell_multiplier", "int32_t"), ("input_to_cell_multiplier", "int32_t"),
        ("output_multiplier", "int32_t"), ("input_size", "uint16_t"), ("hidden_size", "uint16_t"),
        ("cell_min", "int16_t"), ("cell_max", "int16_t"), ("forget_to_cell_shift", "int8_t"),
        ("input_to_cell_shift", "int8_t"),
        ("output_shift", "int8_t"), ("cell_tanh_shift", "int8_t"), ("output_zero_point", "int8_t"),
        ("gate_step", "uint8_t"),
    ),
    "tinylstm_dense_params": (
        ("weights", "ptr"), ("bias", "ptr"), ("multiplier", "ptr"), ("shift", "ptr"),
        ("input_size", "uint16_t"), ("output_size", "uint16_t"), ("output_zero_point", "int8_t"),
        ("per_channel", "uint8_t"),
    ),
}

_PREFIX_RE = re.compile(r"[a-z][a-z0-9_]*")
_KERNEL_SYMBOLS = frozenset({
    "tinylstm_sigmoid_table", "tinylstm_lstm_params", "tinylstm_dense_params", "tinylstm_lstm_reset",
    "tinylstm_lstm_step", "tinylstm_dense", "tinylstm_requantize", "tinylstm_sigmoid", "tinylstm_tanh",
    "tinylstm_kernel",
})
_API_FUNCTIONS = ("reset", "step", "output", "run", "hidden", "cell")
# "<prefix>.h" must not shadow a standard header.
_STANDARD_HEADERS = frozenset({
    "assert", "complex", "ctype", "errno", "fenv", "float", "inttypes", "iso646", "limits", "locale", "math",
    "setjmp", "signal", "stdarg", "stdbool", "stddef", "stdint", "stdio", "stdlib", "string", "tgmath", "time",
    "wchar", "wctype",
})


class ExportError(Exception):
    """The export cannot be done as asked (bad prefix, occupied output directory)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide the generated objects and their sizes."""

    input_size: int
    hidden_sizes: tuple[int, ...]
    window: int
    outputs: int | None  # None: no dense head
    per_channel: bool = False  # per gate row (layers) and per output (head) multipliers
    layer_per_channel: tuple[bool, ...] | None = None  # overrides per_channel for each layer
    head_per_channel: bool | None = None  # overrides per_channel for the head

    @classmethod
    def from_model(cls, model: QuantizedModel) -> ModelShape:
        layers = tuple(layer.per_channel for layer in model.layers)
        head = model.head is not None and model.head.multiplier.shape[0] > 1
        return cls(
            input_size=model.input.features,
            hidden_sizes=tuple(layer.hidden_size for layer in model.layers),
            window=model.input.window,
            outputs=model.head.output_size if model.head else None,
            per_channel=layers[0],
            layer_per_channel=None if all(pc == layers[0] for pc in layers) else layers,
            head_per_channel=None if model.head is None or head == layers[0] else head,
        )

    def layer_is_per_channel(self, n: int) -> bool:
        return self.layer_per_channel[n] if self.layer_per_channel is not None else self.per_channel

    @property
    def head_is_per_channel(self) -> bool:
        return self.head_per_channel if self.head_per_channel is not None else self.per_channel

    @property
    def output_size(self) -> int:
        return self.outputs if self.outputs is not None else self.hidden_sizes[-1]


@dataclass(frozen=True)
class Buffer:
    """One object of the generated source: the symbol ``<prefix>_<name>``, where it lives, and its size."""

    name: str
    region: str  # "flash" or "ram"
    nbytes: int


@dataclass(frozen=True)
class _Object:
    name: str
    ctype: str  # element type, or a struct type of _STRUCTS
    count: int  # elements (1 for a struct)
    region: str


def _groups(n: int) -> int:
    """Groups of four inputs (the Arm DSP layout pads every row to a multiple of four)."""
    return -(-n // 4)


# Groups of four inputs per pass of the Arm DSP kernel (TL_DSP_PASS_GROUPS): each pass of a unit's half is stored
# as two biases, four words per group, two biases.
_DSP_PASS_GROUPS = 126


def _dsp_half_words(n: int) -> int:
    """32-bit words of one unit's half of n inputs in the Arm DSP layout: the words and each pass's four biases."""
    return 4 * _groups(n) + 4 * -(-_groups(n) // _DSP_PASS_GROUPS)


def _objects(shape: ModelShape, variant: str = "reference") -> list[_Object]:
    """Every object the generated source defines for ``variant``, in emission order."""
    if variant == "reference":
        return _reference_objects(shape)
    objs: list[_Object] = []
    previous = shape.input_size
    scratch = 0
    for n, hidden in enumerate(shape.hidden_sizes):
        if variant == "arm_dsp":  # per unit and half: four biases, then the packed words (tinylstm_kernel_arm_dsp.h)
            objs.append(_Object(f"l{n}_weights", "uint32_t",
                                hidden * (_dsp_half_words(previous) + _dsp_half_words(hidden)), "flash"))
            scratch = max(scratch, 2 * (_groups(previous) + _groups(hidden)))
        else:  # avr: per unit and input, the four gate weights offset by 128 (tinylstm_kernel_avr.h)
            objs.append(_Object(f"l{n}_weights", "uint8_t", hidden * 4 * (previous + hidden), "flash"))
            scratch = max(scratch, previous + hidden)
            objs.append(_Object(f"l{n}_bias", "int32_t", 8 * hidden, "flash"))
        if variant == "arm_dsp":  # sizes and requantization words (tl_dsp_layer)
            units = hidden if shape.layer_is_per_channel(n) else 1
            objs.append(_Object(f"l{n}_constants", "int32_t", _DSP_GATES + _DSP_UNIT_WORDS * units, "flash"))
        else:  # avr: gate multipliers and shifts per unit (per channel) or once for all units
            units = hidden if shape.layer_is_per_channel(n) else 1
            objs.append(_Object(f"l{n}_multiplier", "int32_t", 8 * units, "flash"))
            objs.append(_Object(f"l{n}_shift", "int8_t", 8 * units, "flash"))
            objs.append(_Object(f"l{n}_layer", "tinylstm_avr_layer_params", 1, "flash"))
        previous = hidden
    objs += [o for o in _reference_objects(shape) if o.name.startswith("head_") or o.name.startswith("state_")]
    objs.append(_Object("scratch", "uint32_t" if variant == "arm_dsp" else "uint8_t", scratch, "ram"))
    return objs


def _reference_objects(shape: ModelShape) -> list[_Object]:
    objs: list[_Object] = []
    previous = shape.input_size
    for n, hidden in enumerate(shape.hidden_sizes):
        rows = 4 * hidden
        q = rows if shape.layer_is_per_channel(n) else 4
        objs += [
            _Object(f"l{n}_input_weights", "int8_t", rows * previous, "flash"),
            _Object(f"l{n}_hidden_weights", "int8_t", rows * hidden, "flash"),
            _Object(f"l{n}_input_bias", "int32_t", rows, "flash"),
            _Object(f"l{n}_hidden_bias", "int32_t", rows, "flash"),
            _Object(f"l{n}_input_multiplier", "int32_t", q, "flash"),
            _Object(f"l{n}_input_shift", "int8_t", q, "flash"),
            _Object(f"l{n}_hidden_multiplier", "int32_t", q, "flash"),
            _Object(f"l{n}_hidden_shift", "int8_t", q, "flash"),
            _Object(f"l{n}_params", "tinylstm_lstm_params", 1, "flash"),
        ]
        previous = hidden
    if shape.outputs is not None:
        q = shape.outputs if shape.head_is_per_channel else 1
        objs += [
            _Object("head_weights", "int8_t", shape.outputs * previous, "flash"),
            _Object("head_bias", "int32_t", shape.outputs, "flash"),
            _Object("head_multiplier", "int32_t", q, "flash"),
            _Object("head_shift", "int8_t", q, "flash"),
            _Object("head_params", "tinylstm_dense_params", 1, "flash"),
        ]
    # The state of every layer, one after the other: layer n starts at sum(hidden_sizes[:n]).
    objs.append(_Object("state_hidden", "int8_t", sum(shape.hidden_sizes), "ram"))
    objs.append(_Object("state_cell", "int16_t", sum(shape.hidden_sizes), "ram"))
    objs.append(_Object("scratch", "int8_t", max(shape.hidden_sizes), "ram"))
    return objs


def _sizeof(ctype: str, arch: str) -> int:
    types = _TYPES[arch]
    if ctype in types:
        return types[ctype][0]
    offset, align = 0, 1
    for _, field_type in _STRUCTS[ctype]:
        size, field_align = types[field_type]
        offset = -(-offset // field_align) * field_align + size
        align = max(align, field_align)
    return -(-offset // align) * align


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ExportError(f"unknown kernel variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def default_variant(arch: str, dsp: bool) -> str:
    """The fastest kernel variant for a code-generation family: avr, arm_dsp on Arm with DSP, else reference."""
    if arch == "avr":
        return "avr"
    return "arm_dsp" if arch == "arm" and dsp else "reference"


def memory_layout(shape: ModelShape, arch: str, variant: str = "reference") -> list[Buffer]:
    """Every object of one generated model with its exact size on ``arch`` ("avr", "arm" or "host").

    The shared kernel's objects (stored once per firmware) are listed by ``kernel_layout``; code is not included.
    """
    if arch not in _TYPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    check_variant(variant)
    return [Buffer(o.name, o.region, o.count * _sizeof(o.ctype, arch)) for o in _objects(shape, variant)]


def kernel_layout(arch: str, variant: str = "reference") -> list[Buffer]:
    """The shared kernel's objects (full symbol names) that ``variant`` links: stored once per firmware, whatever
    the number of models. arm_dsp links its own activation table (tinylstm_kernel_arm_dsp.c), not the sigmoid
    table."""
    if arch not in _TYPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    check_variant(variant)
    if variant == "arm_dsp":  # per index of the sigmoid table, two int32 words
        return [Buffer("tinylstm_dsp_activation_table", "flash", 2 * len(SIGMOID_TABLE) * _sizeof("int32_t", arch))]
    return [Buffer("tinylstm_sigmoid_table", "flash", 256 * 2)]


def _layer_scalars(layer: LSTMLayer) -> dict[str, int]:
    """The scalar fields a layer's parameter struct holds, in every kernel: sizes and the cell constants."""
    cell_min, cell_max = cell_bounds(layer.cell_clip)
    return {
        "forget_to_cell_multiplier": layer.forget_to_cell_multiplier,
        "input_to_cell_multiplier": layer.input_to_cell_multiplier,
        "output_multiplier": layer.output_multiplier,
        "input_size": layer.input_size,
        "hidden_size": layer.hidden_size,
        "cell_min": cell_min,
        "cell_max": cell_max,
        "forget_to_cell_shift": layer.forget_to_cell_shift,
        "input_to_cell_shift": layer.input_to_cell_shift,
        "output_shift": layer.output_shift,
        "cell_tanh_shift": layer.cell_scale_power + 12,
        "output_zero_point": layer.output_zero_point,
    }


def _values(model: QuantizedModel) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int | str]]]:
    """The contents of the objects of ``_objects``: flat integer arrays, and struct fields (ints, or the names
    of the arrays a pointer field points to)."""
    arrays: dict[str, np.ndarray] = {}
    structs: dict[str, dict[str, int | str]] = {}
    for n, layer in enumerate(model.layers):
        kernel = LayerKernel(layer)
        p = f"l{n}_"
        layer_arrays = {
            "input_weights": layer.input_weights, "hidden_weights": layer.hidden_weights,
            "input_bias": wrap_int32(kernel.input_bias), "hidden_bias": wrap_int32(kernel.hidden_bias),
            "input_multiplier": layer.input_multiplier, "input_shift": layer.input_shift,
            "hidden_multiplier": layer.hidden_multiplier, "hidden_shift": layer.hidden_shift,
        }
        arrays.update({p + k: np.asarray(v).ravel() for k, v in layer_arrays.items()})
        structs[p + "params"] = {
            **{k: p + k for k in layer_arrays},
            **_layer_scalars(layer),
            "per_channel": int(layer.per_channel),
        }
    head = model.head
    if head is not None:
        w = head.weights.astype(np.int64)
        head_arrays = {
            "weights": head.weights,
            "bias": wrap_int32(head.bias.astype(np.int64) - head.input_zero_point * w.sum(axis=1)),
            "multiplier": head.multiplier, "shift": head.shift,
        }
        arrays.update({"head_" + k: np.asarray(v).ravel() for k, v in head_arrays.items()})
        structs["head_params"] = {
            **{k: "head_" + k for k in head_arrays},
            "input_size": head.input_size,
            "output_size": head.output_size,
            "output_zero_point": head.output_zero_point,
            "per_channel": int(head.multiplier.shape[0] > 1),
        }
    return arrays, structs


def _c_int(v: int) -> str:
    return "INT32_MIN" if v == -(2**31) else str(v)


def _array_initializer(values: np.ndarray, per_line: int = 16, unsigned: bool = False) -> str:
    items = [f"0x{int(v):08x}u" if unsigned else _c_int(int(v)) for v in values]
    lines = (", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line))
    return "\n    " + ",\n    ".join(lines) + ",\n"


def check_prefix(prefix: str) -> None:
    """Raise ExportError unless ``prefix`` makes valid C names that collide with nothing in the kernel."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ExportError(f"prefix {prefix!r} must be a lower-case C identifier: [a-z][a-z0-9_]*")
    if prefix in _STANDARD_HEADERS:
        raise ExportError(f"prefix {prefix!r} would make {prefix}.h shadow the standard header; choose another")
    names = {prefix} | {f"{prefix}_{f}" for f in _API_FUNCTIONS}
    if names & _KERNEL_SYMBOLS or prefix.startswith(("tinylstm_lstm", "tinylstm_dense", "tinylstm_kernel")):
        raise ExportError(f"prefix {prefix!r} collides with the kernel's names (tinylstm_*); choose another")


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_c(model: QuantizedModel, prefix: str = "tinylstm_model", variant: str = "reference") -> dict[str, str]:
    """The model's generated sources, ``{"<prefix>.h": ..., "<prefix>.c": ...}`` (the kernel: ``kernel_sources``).

    ``variant`` picks the kernel (VARIANTS); every variant computes the same bytes through the same API.
    """
    check_prefix(prefix)
    check_variant(variant)
    model.validate()
    shape = ModelShape.from_model(model)
    arrays, structs = _values(model)
    layer_steps = []
    if variant != "reference":
        arrays.update(_variant_arrays(model, variant))
        if variant == "avr":
            structs.update(_avr_layer_structs(model))
        step_c = _layer_step_arm_dsp if variant == "arm_dsp" else _layer_step_avr
        layer_steps = [step_c(prefix, n, layer) for n, layer in enumerate(model.layers)]
    definitions = []
    for obj in _objects(shape, variant):
        d = {"ctype": obj.ctype, "symbol": f"{prefix}_{obj.name}", "count": obj.count, "flash": obj.region == "flash"}
        if obj.ctype in _STRUCTS:
            fields = structs[obj.name]
            d["count"] = None
            d["fields"] = {name: (f"{prefix}_{fields[name]}" if kind == "ptr" else _c_int(int(fields[name])))
                           for name, kind in _STRUCTS[obj.ctype]}
        elif obj.region == "flash":
            if arrays[obj.name].size != obj.count:
                raise AssertionError(f"{obj.name}: {arrays[obj.name].size} values for {obj.count} elements")
            d["init"] = _array_initializer(arrays[obj.name], unsigned=obj.ctype == "uint32_t")
        definitions.append(d)
    context = {
        "prefix": prefix,
        "PREFIX": prefix.upper(),
        "model": model,
        "name": re.sub(r"[^A-Za-z0-9_.+-]", "_", model.name),
        "shape": shape,
        "digest": model.digest(),
        "definitions": definitions,
        "state_offsets": [sum(shape.hidden_sizes[:n]) for n in range(len(shape.hidden_sizes))],
        "input_zero_point": model.input.zero_point,
        "variant": variant,
        "layer_steps": layer_steps,
    }
    env = _environment()
    return {
        f"{prefix}.h": env.get_template("model.h.j2").render(context),
        f"{prefix}.c": env.get_template("model.c.j2").render(context),
    }


def kernel_sources(variant: str = "reference") -> dict[str, str]:
    """The static kernel files of ``variant`` (one copy per firmware, shared by every model)."""
    check_variant(variant)
    return {name: (TEMPLATE_DIR / name).read_text() for name in VARIANT_FILES[variant]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_c(
    model: QuantizedModel, out_dir: Path, *, prefix: str = "tinylstm_model", force: bool = False,
    variant: str = "reference",
) -> list[Path]:
    """Write the model's sources and the kernel into ``out_dir``; return the written paths.

    A non-empty ``out_dir`` is refused unless ``force``; then the generated files are replaced and any other
    file in it is kept. Everything is rendered into a temporary directory beside ``out_dir`` first, so an error
    leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    occupied = out_dir.is_dir() and any(out_dir.iterdir())
    if occupied and not force:
        raise ExportError(f"{out_dir} is not empty; use --force to overwrite the generated files in it")
    files = {**render_c(model, prefix, variant), **kernel_sources(variant)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        for name, text in files.items():
            (tmp / name).write_text(text)
        if occupied:
            for name in files:
                os.replace(tmp / name, out_dir / name)
        else:
            if out_dir.is_dir():
                out_dir.rmdir()
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [out_dir / name for name in files]


# ---- optimized variants: packed constants and the per-layer step functions ---------------------------------

def _pack_dsp_half(w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Gate weights [4, H, n] and biases [4, H] as the Arm DSP words [H, _dsp_half_words(n)]: per pass of at most
    126 groups, the biases of rows i and g, the packed words, the biases of rows f and o (zero after the first
    pass; see tinylstm_kernel_arm_dsp.h)."""
    _, hidden, n = w.shape
    padded = np.zeros((4, hidden, 4 * _groups(n)), dtype=np.int64)
    padded[:, :, :n] = w
    low = (padded + 128) & 0xFF  # rows i and g: the B accumulators
    high = padded & 0xFF  # rows f and o

    def words(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a[:, 0::2] | (b[:, 0::2] << 8) | (a[:, 1::2] << 16) | (b[:, 1::2] << 24)

    packed = np.stack([words(low[0], high[1]), words(low[2], high[3])], axis=2).reshape(hidden, -1)
    bias = np.asarray(bias, dtype=np.int64).reshape(4, hidden) & 0xFFFFFFFF
    passes = []
    for start in range(0, packed.shape[1], 4 * _DSP_PASS_GROUPS):
        first = start == 0
        passes += [bias[[0, 2]].T * first, packed[:, start:start + 4 * _DSP_PASS_GROUPS], bias[[1, 3]].T * first]
    return np.concatenate(passes, axis=1)


def _pack_avr_half(w: np.ndarray) -> np.ndarray:
    """Gate weights [4, H, n] as [H, n * 4] bytes (w + 128), the four gates of one input side by side."""
    return (w.astype(np.int64) + 128).transpose(1, 2, 0).reshape(w.shape[1], -1)


def _unit_table(input_half: np.ndarray, hidden_half: np.ndarray) -> np.ndarray:
    """Per-gate arrays [4, H] of both halves as [H * 8]: per unit (x: i f g o, h: i f g o)."""
    return np.concatenate([np.asarray(input_half).reshape(4, -1), np.asarray(hidden_half).reshape(4, -1)]
                          ).T.ravel()


def _variant_arrays(model: QuantizedModel, variant: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for n, layer in enumerate(model.layers):
        kernel = LayerKernel(layer)
        wx, wh = layer.input_weights.astype(np.int64), layer.hidden_weights.astype(np.int64)
        if variant == "arm_dsp":
            arrays[f"l{n}_weights"] = np.concatenate([_pack_dsp_half(wx, kernel.input_bias),
                                                      _pack_dsp_half(wh, kernel.hidden_bias)], axis=1).ravel()
            arrays[f"l{n}_constants"] = _dsp_constants(layer)
            continue  # the biases are in the weights, the multipliers and shifts in the constants
        # avr: the stored weights are w + 128, so each bias also takes off 128 * rowsum(w)
        arrays[f"l{n}_weights"] = np.concatenate([_pack_avr_half(wx), _pack_avr_half(wh)], axis=1).ravel()
        bias = _unit_table(kernel.input_bias - 128 * wx.sum(axis=2), kernel.hidden_bias - 128 * wh.sum(axis=2))
        arrays[f"l{n}_bias"] = wrap_int32(bias)
        arrays[f"l{n}_multiplier"] = _unit_table(layer.input_multiplier, layer.hidden_multiplier)
        arrays[f"l{n}_shift"] = _unit_table(layer.input_shift, layer.hidden_shift)
    return arrays


def _avr_layer_structs(model: QuantizedModel) -> dict[str, dict[str, int | str]]:
    """The tinylstm_avr_layer_params of each layer: its arrays, sizes and cell constants."""
    structs: dict[str, dict[str, int | str]] = {}
    for n, layer in enumerate(model.layers):
        structs[f"l{n}_layer"] = {
            "weights": f"l{n}_weights", "bias": f"l{n}_bias", "multiplier": f"l{n}_multiplier",
            "shift": f"l{n}_shift",
            **_layer_scalars(layer),
            "gate_step": 8 if layer.per_channel else 0,
        }
    return structs


# A layer's constant table for tl_dsp_layer (the TL_K_* offsets of tinylstm_kernel_arm_dsp.h): nine words of sizes
# and scalars, three requantizations for the cell and h, then eight gate requantizations per unit (per channel) or
# for all units; three words each.
_DSP_GATES = 18
_DSP_UNIT_WORDS = 24


def _dsp_requantization(multiplier: int, shift: int) -> list[int]:
    """tl_rq's words {left, m2, p} for tinylstm_requantize(v, multiplier, shift), before wrapping to int32."""
    right = max(-shift, 0)
    return [max(shift, 0), 2 * multiplier, 1 << (32 - right) if right else -1]


def _dsp_constants(layer: LSTMLayer) -> np.ndarray:
    """The layer's constant table (tinylstm_kernel_arm_dsp.h, TL_K_*) as int32 words."""
    words = [layer.input_size, layer.hidden_size, _DSP_UNIT_WORDS if layer.per_channel else 0,
             *cell_bounds(layer.cell_clip), layer.output_zero_point]
    # tanh(c)'s input: c * 3 * 2^left_shift, or (c * 3 + 2^(right - 1)) >> right for a negative left shift.
    left_shift = layer.cell_scale_power + 12
    right = max(-left_shift, 0)
    words += [3 << max(left_shift, 0), (1 << right) >> 1, right]
    for multiplier, shift in ((layer.forget_to_cell_multiplier, layer.forget_to_cell_shift),
                              (layer.input_to_cell_multiplier, layer.input_to_cell_shift),
                              (layer.output_multiplier, layer.output_shift)):
        words += _dsp_requantization(multiplier, shift)
    halves = [(np.asarray(m).reshape(4, -1), np.asarray(s).reshape(4, -1)) for m, s in
              ((layer.input_multiplier, layer.input_shift), (layer.hidden_multiplier, layer.hidden_shift))]
    for unit in range(halves[0][0].shape[1]):
        for g in range(4):
            for multipliers, shifts in halves:
                words += _dsp_requantization(int(multipliers[g, unit]), int(shifts[g, unit]))
    return wrap_int32(np.array(words, dtype=np.int64))


def _layer_step_arm_dsp(prefix: str, n: int, layer: LSTMLayer) -> str:
    """The arm_dsp step function of one layer: tl_dsp_layer on the layer's objects, the same code for any constants."""
    p = f"{prefix}_l{n}"
    return (f"static void {p}_step(const int8_t *x, int8_t *h, int16_t *cell)\n{{\n"
            f"    tl_dsp_layer({p}_constants, {p}_weights, x, h, cell, {prefix}_scratch);\n"
            "}\n")


def _layer_step_avr(prefix: str, n: int, layer: LSTMLayer) -> str:
    """The avr step function of one layer: tl_avr_layer on the layer's flash struct, the same code for any layer."""
    p = f"{prefix}_l{n}"
    return (f"static void {p}_step(const int8_t *x, int8_t *h, int16_t *cell)\n{{\n"
            f"    tl_avr_layer(&{p}_layer, x, h, cell, {prefix}_scratch);\n}}\n")
