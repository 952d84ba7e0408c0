"""Export a quantized model as an Arduino library: a zip the Arduino IDE installs (Sketch > Include Library >
Add .ZIP Library).

The zip holds one folder, ``<library>/``, with ``library.properties``, ``src/`` (the generated model source and
header, and the static kernel) and ``examples/StreamSamples/StreamSamples.ino``, a sketch that reads sensor
samples from the serial port, quantizes them with the model's own input specification, and streams them
through ``<prefix>_step``. ``src/`` holds the kernel variant of the board's firmware (``firmware.board_variant``),
generated exactly as ``tinylstm firmware`` generates it, so the sketch runs the code the benchmark measured.
"""

from __future__ import annotations

import functools
import io
import re
import zipfile
from pathlib import Path

import jinja2

from tinylstm import __version__, export
from tinylstm.export import ModelShape
from tinylstm.qmodel import QuantizedModel

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "firmware_templates" / "arduino"
SKETCH = "StreamSamples"
SERIAL_BAUD = 115200
_LIBRARY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ArduinoError(ValueError):
    """A library that cannot be written as asked (bad name, existing file)."""


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def default_library_name(model: QuantizedModel) -> str:
    """``tinylstm_<model name>``, reduced to the characters Arduino allows in a library name."""
    return "tinylstm_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name).strip("_.-") or "model")


def _float(v: float) -> str:
    """A C float literal that keeps the value (float has 24 bits; 9 significant digits round-trip)."""
    text = f"{float(v):.9g}"
    return text + ("f" if any(c in text for c in ".e") else ".0f")


def _sketch_context(model: QuantizedModel, prefix: str) -> dict[str, object]:
    meta = model.meta
    task = meta.get("task", "forecasting")
    spec = model.input
    features = meta.get("features") or [f"x{i}" for i in range(spec.features)]
    offset = spec.norm_offset if spec.norm_kind != "none" else [0.0] * spec.features
    norm_scale = spec.norm_scale if spec.norm_kind != "none" else [1.0] * spec.features
    outputs = model.output_size
    context: dict[str, object] = {
        "sketch": SKETCH, "model_name": model.name, "task": task, "prefix": prefix, "PREFIX": prefix.upper(),
        "baud": SERIAL_BAUD, "window": spec.window, "features": features,
        "line_length": min(250, 24 * spec.features + 8),
        "input_offset": [_float(o) for o in offset],
        "input_scale": [_float(s * spec.scale) for s in norm_scale],
        "input_zero_point": spec.zero_point,
        "output_zero_point": model.output_zero_point, "output_scale": _float(model.output_scale),
    }
    if task == "classification":
        classes = meta.get("classes") or [str(i) for i in range(outputs)]
        context["classes"] = [c.replace("\\", "\\\\").replace('"', '\\"') for c in classes]
    else:
        norm = meta.get("target_norm") or {"offset": [0.0], "scale": [1.0]}
        context["target_offset"] = [_float(norm["offset"][i % len(norm["offset"])]) for i in range(outputs)]
        context["target_scale"] = [_float(norm["scale"][i % len(norm["scale"])]) for i in range(outputs)]
    if task == "anomaly":
        targets = meta.get("targets") or []
        if meta.get("anomaly_threshold") is None or not targets or targets[0] not in features:
            raise ArduinoError("the anomaly example needs the model's threshold and its target among the input "
                               "features (quantize it with tinylstm quantize)")
        context["threshold"] = _float(meta["anomaly_threshold"])
        context["target_feature"] = features.index(targets[0])
    return context


def render_library(model: QuantizedModel, variant: str, library: str | None = None,
                   prefix: str = "tinylstm_model") -> dict[str, str]:
    """The library's files by their path inside the zip, ``<library>/...``, with the ``variant`` kernel."""
    library = library or default_library_name(model)
    if not _LIBRARY_NAME_RE.fullmatch(library):
        raise ArduinoError(f"library name {library!r} must start with a letter or digit and hold only letters, "
                           "digits, '_', '.' and '-'")
    try:
        sources = {**export.render_c(model, prefix, variant), **export.kernel_sources(variant)}
    except export.ExportError as e:
        raise ArduinoError(str(e)) from None
    env = _environment()
    properties = env.get_template("library.properties.j2").render(
        library=library, version=__version__, model_name=model.name, task=model.meta.get("task", "model"),
        shape=ModelShape.from_model(model), prefix=prefix, digest=model.digest(), variant=variant)
    sketch = env.get_template(f"{SKETCH}.ino.j2").render(_sketch_context(model, prefix))
    files = {f"{library}/library.properties": properties,
             f"{library}/examples/{SKETCH}/{SKETCH}.ino": sketch}
    files.update({f"{library}/src/{name}": text for name, text in sources.items()})
    return files


def export_arduino(model: QuantizedModel, out: str | Path, *, variant: str, library: str | None = None,
                   prefix: str = "tinylstm_model", force: bool = False) -> Path:
    """Write the library zip with the ``variant`` kernel: ``out`` itself if it ends in .zip, else
    ``out/<library>.zip``. Atomic."""
    library = library or default_library_name(model)
    files = render_library(model, variant, library, prefix)
    out = Path(out)
    path = out if out.suffix.lower() == ".zip" else out / f"{library}.zip"
    if path.exists() and not force:
        raise ArduinoError(f"{path} exists; use --force to overwrite it")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in sorted(files.items()):
            zf.writestr(name, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path
