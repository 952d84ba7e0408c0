"""The hardware-in-the-loop benchmark: latency from the device's own counter, outputs checked bit for bit.

``run_bench`` benchmarks quantized models on a board. An emulated board without a port is built and started
here; a real board (or an emulator already running) is reached by its serial URL, optionally flashed first.
For every window the device's output is compared with ``tinylstm.reference``; the counts come from the
device's counter (cycles, QEMU instructions, or µs); models trained by tinylstm also get the end-to-end
metric on a sample of their held-out windows (tinylstm.sampling: stratified by class and seeded by default),
computed from the device's outputs next to the host's integer reference.
The report is a dict (schema: docs/bench-report.schema.json) that ``markdown`` and ``plot`` render.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinylstm import __version__, firmware, hil, reference
from tinylstm.boards import Board, load_board
from tinylstm.qmodel import QuantizedModel
from tinylstm.report import bit_exact, device_figure, headline, sample_text
from tinylstm.sampling import SAMPLES, sample_indices, seeded, take

SCHEMA_ID = "tinylstm-bench-report/1"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "bench-report.schema.json"
DEFAULT_SEED = 1
BATCH_SECONDS = 1.0  # wall time one BENCH request should take, so progress stays visible and timeouts tight
SOURCES = ("auto", "data", "seed")

Progress = Callable[[int], None]  # called with the number of windows just finished


class BenchError(RuntimeError):
    """A benchmark that cannot run: no port for a real board, a model the device does not hold, bad input."""


# ---------------------------------------------------------------------------------------------- statistics


def summary(values: Sequence[float]) -> dict[str, float]:
    """min, median, p99 (linear interpolation), max and mean."""
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "p99": float(np.percentile(v, 99)),
            "max": float(v.max()), "mean": float(v.mean())}


def _unit_note(info: hil.DeviceInfo) -> str:
    if info.counter_kind == "qemu-icount":
        return "QEMU models no cycles: these are instructions retired (-icount shift=0), not cycles or time"
    if info.counter_kind == "cycles":
        return f"CPU cycles from the device's cycle counter at {info.cpu_hz / 1e6:g} MHz"
    if info.counter_kind == "micros":
        return "microseconds from the board's micros() clock (no cycle counter on this core)"
    return f"counter ticks of an unknown kind ({info.counter_kind})"


def latency(counts: np.ndarray, info: hil.DeviceInfo, steps: int) -> dict[str, Any]:
    """Per-window and per-step statistics in the counter's unit (cycles, instructions or µs), and µs at the
    board's clock when the counter counts cycles."""
    per_window = np.array([info.counts_to_unit(int(c)) for c in counts], dtype=np.float64)
    out: dict[str, Any] = {"unit": info.unit, "note": _unit_note(info), "per_window": summary(per_window),
                           "per_step": summary(per_window / steps), "us_per_window": None, "us_per_step": None}
    if info.counter_kind == "cycles":
        out["us_per_window"] = summary(per_window * 1e6 / info.cpu_hz)
        out["us_per_step"] = summary(per_window * 1e6 / info.cpu_hz / steps)
    elif info.counter_kind == "micros":
        out["us_per_window"], out["us_per_step"] = out["per_window"], out["per_step"]
    return out


# ------------------------------------------------------------------------------------------------- windows


@dataclass
class HeldOut:
    """A sample of a trained model's test split, raw and as the device's int8 input."""

    dataset: Any  # tinylstm.data.Dataset
    split: Any  # tinylstm.data.Split, the sampled test windows
    int8: np.ndarray
    indices: np.ndarray  # their positions in the test split, sorted
    sample: str  # how they were drawn: one of SAMPLES
    seed: int


def _dataset(model: QuantizedModel) -> Any:
    """The model's dataset, rebuilt from the data spec in its meta; None without one (not trained by tinylstm)."""
    spec = model.meta.get("data_spec")
    if not spec:
        return None
    from tinylstm.data import DataError, DataSpec, load_dataset

    try:
        return load_dataset(DataSpec.from_dict(spec))
    except (DataError, TypeError) as e:
        raise BenchError(f"model {model.name}: cannot rebuild its held-out data: {e}") from None


def held_out(model: QuantizedModel, count: int, sample: str = "stratified", seed: int = DEFAULT_SEED
             ) -> HeldOut | None:
    """``count`` of the model's held-out test windows drawn as ``sample`` says (tinylstm.sampling; "all": every
    one); None for a model that carries no data spec."""
    if sample not in SAMPLES:
        raise BenchError(f"unknown sample {sample!r}; choose one of {', '.join(SAMPLES)}")
    dataset = _dataset(model)
    if dataset is None:
        return None
    indices = sample_indices(dataset.test, dataset.task, count, sample, seed)
    split = take(dataset.test, indices)
    return HeldOut(dataset, split, model.quantize_input(split.x), indices, sample, seed)


def planned_windows(model: QuantizedModel, windows: int, source: str = "auto", sample: str = "stratified") -> int:
    """How many windows ``bench_model`` runs for the model: ``windows``, or fewer (or, with sample "all", more)
    when it runs the model's test split."""
    dataset = None if source == "seed" else _dataset(model)
    if dataset is None:
        return windows
    return len(dataset.test) if sample == "all" else min(windows, len(dataset.test))


def accuracy(model: QuantizedModel, data: HeldOut, device_outputs: np.ndarray) -> dict[str, Any]:
    """The quantizer's metric on the sampled windows from the device's outputs and from the host's integer
    reference (a classifier's device accuracy with its 95 % Wilson interval), and the quantizer's own INT8
    figure on the whole test split: the quality figure."""
    from tinylstm import evaluate

    task = data.dataset.task
    threshold = model.meta.get("anomaly_threshold")

    def metrics(q: np.ndarray) -> dict[str, Any]:
        out = model.dequantize_output(q)
        out = out if task == "classification" else data.dataset.to_units(out)
        return evaluate.metrics(task, out, data.dataset, data.split, threshold)

    metric = evaluate.HEADLINE[task]
    quantizer = model.meta.get("evaluation", {}).get("int8")
    device = metrics(device_outputs)
    interval = None
    if task == "classification":
        interval = list(evaluate.wilson_interval(int(np.trace(device["confusion"])), len(data.int8)))
    return {"task": task, "metric": metric, "split": "test", "windows": len(data.int8),
            "test_windows": len(data.dataset.test),
            "sample": {"method": data.sample,
                       "seed": data.seed if data.sample == "stratified" and seeded(data.dataset.test, task) else None,
                       "indices": data.indices.tolist()},
            "device": device, "device_interval": interval,
            "host_int8": metrics(reference.run_batch(model, data.int8)), "quantizer_int8": quantizer}


# ---------------------------------------------------------------------------------------------- one model


def bench_model(client: hil.HILClient, model: QuantizedModel, *, windows: int = 50, source: str = "auto",
                seed: int = DEFAULT_SEED, sample: str = "stratified", on_progress: Progress | None = None
                ) -> dict[str, Any]:
    """Benchmark the model on a connected device (selecting it by hash) and return its report entry.

    ``source``: "data" runs held-out test windows (accuracy included), ``windows`` of them drawn as ``sample``
    says (tinylstm.sampling; seeded by ``seed``); "seed" runs windows the device generates itself from ``seed``
    (no input transfer); "auto" is "data" for a model that carries its data spec, else "seed". Windows go in
    BENCH requests when they fit a frame, else one RUN per window.
    """
    if source not in SOURCES:
        raise BenchError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if windows < 1:
        raise BenchError("--windows must be at least 1")
    digest = model.digest()
    if client.info.model_hash != digest:
        try:
            client.select(digest)
        except hil.DeviceError as e:
            if e.code != 4:
                raise
            raise BenchError(f"the device on {client.url} does not hold model {model.name} ({digest}); "
                             "flash it first (tinylstm flash, or bench --flash)") from None
    info = client.info
    data = held_out(model, windows, sample, seed) if source in ("auto", "data") else None
    if source == "data" and data is None:
        raise BenchError(f"model {model.name} carries no data spec (not trained by tinylstm): use --source seed")
    if data is not None:
        inputs, method = data.int8, "uploaded"
    else:
        inputs, method = hil.seeded_windows(seed, 0, windows, info.window, info.input_size), "seeded"
    capacity = client.bench_capacity(uploaded=method == "uploaded")
    if capacity == 0:
        method = "run"
    expected = reference.run_batch(model, inputs)
    outputs = np.empty_like(expected)
    counts = np.empty(len(inputs), dtype=np.int64)
    done, seconds_per_window = 0, 0.0
    while done < len(inputs):
        # One window first; then batches of about BATCH_SECONDS, each with a timeout from the measured pace.
        n = 1 if done == 0 else max(1, min(capacity, len(inputs) - done,
                                           int(BATCH_SECONDS / max(seconds_per_window, 1e-6))))
        start = time.monotonic()
        timeout = client.timeout + 4 * n * seconds_per_window
        if method == "seeded":
            result = client.bench_seeded(n, seed, done, timeout=timeout)
            counts[done:done + n], outputs[done:done + n] = result.counts, result.outputs
        elif method == "uploaded":
            result = client.bench_windows(inputs[done:done + n], timeout=timeout)
            counts[done:done + n], outputs[done:done + n] = result.counts, result.outputs
        else:
            run = client.run(inputs[done])
            counts[done], outputs[done] = run.counts, run.output
        seconds_per_window = max(seconds_per_window, (time.monotonic() - start) / n)
        done += n
        if on_progress is not None:
            on_progress(n)

    wrong = np.flatnonzero(np.any(outputs != expected, axis=1))
    first = None
    if len(wrong):
        i = int(wrong[0])
        first = {"window": i, "input": inputs[i].tolist(), "expected": expected[i].tolist(),
                 "device": outputs[i].tolist(), "differs_at": np.flatnonzero(outputs[i] != expected[i]).tolist()}
    return {
        "name": model.name, "hash": digest, "input_size": model.input.features, "window": model.input.window,
        "hidden_sizes": [layer.hidden_size for layer in model.layers], "output_size": model.output_size,
        "source": "data" if data is not None else "seed", "seed": None if data is not None else seed,
        "method": {"seeded": "BENCH seeded", "uploaded": "BENCH uploaded", "run": "RUN"}[method],
        "windows": len(inputs), "mismatches": len(wrong), "first_mismatch": first,
        "latency": latency(counts, info, model.input.window),
        "counts": [info.counts_to_unit(int(c)) for c in counts],
        "accuracy": accuracy(model, data, outputs) if data is not None else None,
    }


# --------------------------------------------------------------------------------------------- the session


def _board_entry(board: Board, info: hil.DeviceInfo, url: str) -> dict[str, Any]:
    return {"name": board.name, "device_board": info.board, "emulated": board.emulator is not None,
            "emulator": board.emulator.kind if board.emulator else None, "url": url, "cpu_hz": info.cpu_hz,
            "counter": info.counter_kind, "counter_hz": info.counter_hz, "unit": info.unit,
            "max_payload": info.max_payload, "free_ram": info.free_ram}


def baudrate(board: Board) -> int:
    """The HIL firmware's baud rate on a board (what generate_project configures)."""
    emulated_avr = board.emulator is not None and board.emulator.kind == "simavr"
    return firmware.SIMAVR_BAUD if emulated_avr else firmware.REAL_BOARD_BAUD


def _connect(board: Board, url: str, timeout: float, ready_timeout: float, baud: int | None) -> hil.HILClient:
    if "://" not in url:
        firmware.check_port(url)
    return hil.connect(url, baudrate=baud or baudrate(board), timeout=timeout, ready_timeout=ready_timeout)


@contextlib.contextmanager
def flashed(board: Board, model: QuantizedModel, port: str | None, work_dir: Path, timeout: float,
             ready_timeout: float, baud: int | None, built: dict[str, Any], variant: str | None = None
             ) -> Iterator[hil.HILClient]:
    """A device running a firmware built for ``model`` with the kernel ``variant`` (None: firmware.board_variant):
    in the board's emulator (no port) or uploaded to the real board on ``port``. Fills ``built`` with the
    linker's sizes and the planner's prediction."""
    if board.emulator is None and port is None:
        raise BenchError(f"{board.name} is a real board: give its serial port (--port)")
    (p,) = firmware.check_fits(model, board, variant)
    project = firmware.generate_project(model, board, work_dir / model.digest(), force=True, variant=variant)
    result = firmware.build(project)
    planned_flash, planned_ram = firmware.predicted_sizes(p)
    built.update({"flash": result.sizes.flash, "ram": result.sizes.ram, "compiler": result.compiler,
                  "planned_flash": planned_flash, "planned_ram": planned_ram})
    with contextlib.ExitStack() as stack:
        if port is None:
            url = stack.enter_context(firmware.start_emulator(board, result.elf)).url
        else:
            firmware.upload(project, port)
            url = port
        yield stack.enter_context(_connect(board, url, timeout, ready_timeout, baud))


def run_bench(models: Sequence[QuantizedModel], board: Board | str, *, port: str | None = None, flash: bool = False,
              windows: int = 50, source: str = "auto", seed: int = DEFAULT_SEED, sample: str = "stratified",
              timeout: float = 30.0,
              ready_timeout: float = 15.0, baud: int | None = None, work_dir: Path | None = None,
              model_paths: Sequence[str] | None = None,
              on_progress: Progress | None = None, variant: str | None = None) -> dict[str, Any]:
    """Benchmark each model on the board and return the report (docs/bench-report.schema.json).

    Without ``port`` an emulated board gets one firmware per model, built and run in its emulator (stopped
    afterwards). With ``port`` the device there is used as it is (each model selected by hash), or, with
    ``flash``, each model is built and uploaded to it first. ``baud`` overrides the board's HIL baud rate.
    ``on_progress(n)`` is called after each batch of n windows. ``variant``: the kernel of the firmwares built
    here (export.VARIANTS; None: firmware.board_variant). ``sample`` and ``seed``: see ``bench_model``.
    """
    board = load_board(board) if isinstance(board, str) else board
    if not models:
        raise BenchError("give at least one model")
    if windows < 1:
        raise BenchError("--windows must be at least 1")
    entries, board_entry = [], None
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tinylstm-bench-")))
        shared = None
        if port is not None and not flash:
            shared = stack.enter_context(_connect(board, port, timeout, ready_timeout, baud))
        for n, model in enumerate(models):
            built: dict[str, Any] = {}
            with contextlib.ExitStack() as per_model:
                client = shared or per_model.enter_context(
                    flashed(board, model, port, Path(work_dir), timeout, ready_timeout, baud, built,
                             variant))
                entry = bench_model(client, model, windows=windows, source=source, seed=seed, sample=sample,
                                    on_progress=on_progress)
                board_entry = board_entry or _board_entry(board, client.info, client.url)
            entry["path"] = model_paths[n] if model_paths else None
            entry["firmware"] = built or None
            entries.append(entry)
    return {"schema": SCHEMA_ID, "tinylstm": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "board": board_entry, "models": entries}


# ------------------------------------------------------------------------------------------------- outputs


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """A Markdown summary: latency, bit-exactness and accuracy per model."""
    b = report["board"]
    unit = b["unit"]
    lines = [f"# HIL benchmark on {b['name']}", "",
             f"- device: {b['device_board']} at {b['url']}, {b['cpu_hz'] / 1e6:g} MHz, counter: {b['counter']}"
             + (f", {b['free_ram']:,} B RAM free" if b["free_ram"] is not None else ""),
             f"- unit: {unit} ({report['models'][0]['latency']['note']})", ""]
    lines += [f"| model | hidden | windows | source | mismatches | {unit}/window min | median | p99 | max "
              f"| {unit}/step median | µs/window median | flash | RAM |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        w, s, us, fw = m["latency"]["per_window"], m["latency"]["per_step"], m["latency"]["us_per_window"], \
            m["firmware"]
        lines.append(f"| {m['name']} | {'x'.join(map(str, m['hidden_sizes']))} | {m['windows']} | {m['source']} "
                     f"| {m['mismatches']} | {_fmt(w['min'])} | {_fmt(w['median'])} | {_fmt(w['p99'])} "
                     f"| {_fmt(w['max'])} | {_fmt(s['median'])} | {_fmt(us['median']) if us else 'n/a'} "
                     f"| {fw['flash'] if fw else 'n/a'} | {fw['ram'] if fw else 'n/a'} |")
    for m in report["models"]:
        a = m["accuracy"]
        if a is not None:
            sample = sample_text(a["sample"], a["windows"], a["test_windows"])
            quality = (f"quality (INT8 host on the whole test split, from the quantizer) "
                       f"{headline(a['task'], a['quantizer_int8'], with_name=True)}; "
                       if a["quantizer_int8"] is not None else "")
            lines += ["", f"**{m['name']}**: {quality}{bit_exact(m['windows'], m['mismatches'])} ({sample}); "
                      f"{device_figure(a['task'], a['device'], a['windows'], a['device_interval'])}"]
        f = m["first_mismatch"]
        if f is not None:
            lines += ["", f"**{m['name']}**: {m['mismatches']} of {m['windows']} windows differ from the reference."
                      f" First: window {f['window']}, expected {f['expected']}, device {f['device']}"
                      f" (indices {f['differs_at']})"]
    return "\n".join(lines) + "\n"


def mismatch_detail(entry: dict[str, Any]) -> str | None:
    """The first mismatching window of a model entry, in detail, or None if every window matched."""
    f = entry["first_mismatch"]
    if f is None:
        return None
    return (f"{entry['name']}: {entry['mismatches']} of {entry['windows']} windows differ from the integer reference;"
            f" first is window {f['window']}\n  input    {f['input']}\n  expected {f['expected']}\n"
            f"  device   {f['device']}\n  differs at output indices {f['differs_at']}")


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG: a histogram of per-window counts for each model and, with several hidden sizes, counts per step
    against hidden size. Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib") from None
    models = report["models"]
    unit = report["board"]["unit"]
    several_sizes = len({m["hidden_sizes"][-1] for m in models}) > 1
    panels = len(models) + several_sizes
    columns = min(4, panels)
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, m in zip(flat, models, strict=False):
        ax.hist(m["counts"], bins=min(30, max(5, len(m["counts"]) // 3)))
        ax.set_xlabel(f"{unit} per window")
        ax.set_ylabel("windows")
        ax.set_title(f"{m['name']} (hidden {'x'.join(map(str, m['hidden_sizes']))})", fontsize="medium")
    if several_sizes:
        ax = flat[len(models)]
        ordered = sorted(models, key=lambda m: m["hidden_sizes"][-1])
        ax.plot([m["hidden_sizes"][-1] for m in ordered], [m["latency"]["per_step"]["median"] for m in ordered],
                marker="o")
        ax.set_xlabel("hidden size (last layer)")
        ax.set_ylabel(f"median {unit} per step")
        ax.set_title(f"{unit} per step vs hidden size", fontsize="medium")
        ax.grid(True, alpha=0.3)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"{report['board']['name']}: {unit} from the device's counter")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Write a file atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    return write_text(json.dumps(report, indent=2) + "\n", path)


def synthetic_model(input_size: int, hidden_sizes: Sequence[int], window: int, outputs: int, *,
                    seed: int = 0) -> QuantizedModel:
    """A quantized model with PyTorch's random initial weights, calibrated on seeded random inputs: what a
    size costs on a board does not depend on training."""
    import torch

    from tinylstm.qmodel import InputSpec
    from tinylstm.quantize import QuantConfig, calibrate, convert
    from tinylstm.train import LSTMModel, ModelConfig

    torch.manual_seed(seed)
    model = LSTMModel(ModelConfig("classification", input_size, list(hidden_sizes), outputs, window))
    x = np.random.default_rng(seed).standard_normal((64, window, input_size)).astype(np.float32)
    config = QuantConfig()
    name = f"h{'x'.join(map(str, hidden_sizes))}"
    return convert(model, calibrate(model, x, config), InputSpec(features=input_size, window=window, scale=1.0,
                                                                 zero_point=0), name=name)


def save_outputs(report: dict[str, Any], text: str, *, json_out: str | Path | None = None,
                 markdown_out: str | Path | None = None, plot_out: str | Path | None = None) -> None:
    """Write whichever of the JSON report, the text summary and the plot were asked for."""
    if json_out:
        write_json(report, json_out)
    if markdown_out:
        write_text(text, markdown_out)
    if plot_out:
        plot(report, plot_out)


def mismatches(report: dict[str, Any]) -> str:
    """Every model's first mismatch in detail, one block per model; empty when all outputs were bit-exact."""
    return "\n".join(d for d in map(mismatch_detail, report["models"]) if d)
