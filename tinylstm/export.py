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

from tinylstm.qmodel import QuantizedModel
from tinylstm.reference import INT16_MAX, LayerKernel, wrap_int32

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "firmware_templates"
KERNEL_FILES = ("tinylstm_kernel.h", "tinylstm_kernel.c")
ARCHS = ("avr", "arm", "host")

# (size, alignment) of each C type the generated objects use, per target: AVR (avr-gcc: 16-bit pointers, no
# alignment), Arm EABI (32-bit), host x86-64 (LP64).
_TYPES: dict[str, dict[str, tuple[int, int]]] = {
    "avr": {"int8_t": (1, 1), "uint8_t": (1, 1), "int16_t": (2, 1), "uint16_t": (2, 1), "int32_t": (4, 1),
            "ptr": (2, 1)},
    "arm": {"int8_t": (1, 1), "uint8_t": (1, 1), "int16_t": (2, 2), "uint16_t": (2, 2), "int32_t": (4, 4),
            "ptr": (4, 4)},
    "host": {"int8_t": (1, 1), "uint8_t": (1, 1), "int16_t": (2, 2), "uint16_t": (2, 2), "int32_t": (4, 4),
             "ptr": (8, 8)},
}

# The parameter structs of tinylstm_kernel.h, field by field in declaration order ("ptr" is any data pointer).
_STRUCTS: dict[str, tuple[tuple[str, str], ...]] = {
    "tinylstm_lstm_params": (
        ("input_weights", "ptr"), ("hidden_weights", "ptr"), ("input_bias", "ptr"), ("hidden_bias", "ptr"),
        ("input_multiplier", "ptr"), ("input_shift", "ptr"), ("hidden_multiplier", "ptr"), ("hidden_shift", "ptr"),
        ("forget_to_cell_multiplier", "int32_t"), ("input_to_cell_multiplier", "int32_t"),
        ("output_multiplier", "int32_t"), ("input_size", "uint16_t"), ("hidden_size", "uint16_t"),
        ("cell_clip", "int16_t"), ("forget_to_cell_shift", "int8_t"), ("input_to_cell_shift", "int8_t"),
        ("output_shift", "int8_t"), ("cell_tanh_shift", "int8_t"), ("output_zero_point", "int8_t"),
        ("per_channel", "uint8_t"),
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


def _objects(shape: ModelShape) -> list[_Object]:
    """Every object the generated source defines, in emission order."""
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


def memory_layout(shape: ModelShape, arch: str) -> list[Buffer]:
    """Every object of one generated model with its exact size on ``arch`` ("avr", "arm" or "host").

    The shared kernel's objects (stored once per firmware) are listed by ``kernel_layout``; code is not included.
    """
    if arch not in _TYPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return [Buffer(o.name, o.region, o.count * _sizeof(o.ctype, arch)) for o in _objects(shape)]


def kernel_layout(arch: str) -> list[Buffer]:
    """The shared kernel's objects (full symbol names): stored once per firmware, whatever the number of models."""
    if arch not in _TYPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return [Buffer("tinylstm_sigmoid_table", "flash", 256 * 2)]


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
            "forget_to_cell_multiplier": layer.forget_to_cell_multiplier,
            "input_to_cell_multiplier": layer.input_to_cell_multiplier,
            "output_multiplier": layer.output_multiplier,
            "input_size": layer.input_size,
            "hidden_size": layer.hidden_size,
            "cell_clip": layer.cell_clip if layer.cell_clip > 0 else INT16_MAX,
            "forget_to_cell_shift": layer.forget_to_cell_shift,
            "input_to_cell_shift": layer.input_to_cell_shift,
            "output_shift": layer.output_shift,
            "cell_tanh_shift": layer.cell_scale_power + 12,
            "output_zero_point": layer.output_zero_point,
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


def _array_initializer(values: np.ndarray, per_line: int = 16) -> str:
    items = [_c_int(int(v)) for v in values]
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


def render_c(model: QuantizedModel, prefix: str = "tinylstm_model") -> dict[str, str]:
    """The model's generated sources, ``{"<prefix>.h": ..., "<prefix>.c": ...}`` (the kernel: ``kernel_sources``)."""
    check_prefix(prefix)
    model.validate()
    shape = ModelShape.from_model(model)
    arrays, structs = _values(model)
    definitions = []
    for obj in _objects(shape):
        d = {"ctype": obj.ctype, "symbol": f"{prefix}_{obj.name}", "count": obj.count, "flash": obj.region == "flash"}
        if obj.ctype in _STRUCTS:
            fields = structs[obj.name]
            d["count"] = None
            d["fields"] = {name: (f"{prefix}_{fields[name]}" if kind == "ptr" else _c_int(int(fields[name])))
                           for name, kind in _STRUCTS[obj.ctype]}
        elif obj.region == "flash":
            if arrays[obj.name].size != obj.count:
                raise AssertionError(f"{obj.name}: {arrays[obj.name].size} values for {obj.count} elements")
            d["init"] = _array_initializer(arrays[obj.name])
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
    }
    env = _environment()
    return {
        f"{prefix}.h": env.get_template("model.h.j2").render(context),
        f"{prefix}.c": env.get_template("model.c.j2").render(context),
    }


def kernel_sources() -> dict[str, str]:
    """The static kernel files (one copy per firmware, shared by every model)."""
    return {name: (TEMPLATE_DIR / name).read_text() for name in KERNEL_FILES}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_c(
    model: QuantizedModel, out_dir: Path, *, prefix: str = "tinylstm_model", force: bool = False
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
    files = {**render_c(model, prefix), **kernel_sources()}
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
