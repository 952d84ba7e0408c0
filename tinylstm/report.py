"""The HTML report of a pipeline run: one self-contained file (inline CSS and SVG, no script, no network).

``write_report(out_dir)`` reads the artefacts the stages left in ``out_dir`` (see tinylstm.pipeline) and renders
templates/report.html.j2: training curves, FP32 vs INT8 (confusion matrices or a forecast plot), the memory plan
against the board, the device's latency histogram, the bit-exactness check and the commands that reproduce it.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from tinylstm import __version__

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "report.html.j2"
# Series colours (colour-blind safe), and the neutral greys of axes and grid.
BLUE, ORANGE, GREEN, PURPLE, RED = "#2b6cb0", "#dd6b20", "#2f855a", "#6b46c1", "#c53030"
AXIS, GRID, TEXT = "#718096", "#e2e8f0", "#2d3748"


class ReportError(ValueError):
    """A directory without the artefacts of a pipeline run."""


# -------------------------------------------------------------------------------------------------- charts


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart; whole numbers if ``integer``)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 0.5:
        ticks.append(round(v, 12))
        v += step
    return ticks


def fmt_number(v: float) -> str:
    """A short label: 1.2M, 35k, 0.25, 12."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


class _Plot:
    """A rectangular plot area with linear axes, drawn into an SVG string."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_range: tuple[float, float],
                 margin: tuple[int, int, int, int] = (16, 16, 44, 56), integer_x: bool = False) -> None:
        self.width, self.height = width, height
        self.top, self.right, self.bottom, self.left = margin
        self.x_ticks = nice_ticks(*x_range, integer=integer_x)
        self.y_ticks = nice_ticks(*y_range)
        self.x0, self.x1 = min(self.x_ticks[0], x_range[0]), max(self.x_ticks[-1], x_range[1])
        self.y0, self.y1 = min(self.y_ticks[0], y_range[0]), max(self.y_ticks[-1], y_range[1])
        self.parts: list[str] = []

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (v - self.x0) / span * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.bottom - (v - self.y0) / span * (self.height - self.top - self.bottom)

    def axes(self, x_label: str, y_label: str, x_fmt: Any = fmt_number) -> None:
        p = self.parts
        for t in self.y_ticks:
            p.append(f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{self.y(t):.1f}" y2="{self.y(t):.1f}"'
                     f' stroke="{GRID}"/>')
            p.append(f'<text x="{self.left - 6}" y="{self.y(t) + 4:.1f}" text-anchor="end">{fmt_number(t)}</text>')
        base = self.height - self.bottom
        for t in self.x_ticks:
            p.append(f'<line x1="{self.x(t):.1f}" x2="{self.x(t):.1f}" y1="{base}" y2="{base + 4}" stroke="{AXIS}"/>')
            p.append(f'<text x="{self.x(t):.1f}" y="{base + 17}" text-anchor="middle">{x_fmt(t)}</text>')
        p.append(f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{base}" y2="{base}" stroke="{AXIS}"/>')
        p.append(f'<text x="{(self.left + self.width - self.right) / 2:.0f}" y="{self.height - 6}" '
                 f'text-anchor="middle" class="label">{escape(x_label)}</text>')
        p.append(f'<text transform="translate(14 {(self.top + base) / 2:.0f}) rotate(-90)" text-anchor="middle" '
                 f'class="label">{escape(y_label)}</text>')

    def polyline(self, xs: list[float], ys: list[float], color: str, width: float = 2.0, dash: str = "") -> None:
        points = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in zip(xs, ys, strict=True))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="{width}"'
                          f' stroke-linejoin="round"{dash_attr}/>')

    def svg(self, title: str) -> Markup:
        return Markup(f'<svg viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{escape(title)}" '
                      f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{"".join(self.parts)}</svg>')


def legend(items: list[tuple[str, str]]) -> Markup:
    """An HTML legend: (label, colour) pairs."""
    return Markup("".join(f'<span class="key"><i style="background:{c}"></i>{escape(label)}</span>'
                          for label, c in items))


def training_chart(history: list[dict[str, Any]], qat: list[dict[str, Any]]) -> Markup:
    """Training and validation loss per epoch; QAT epochs continue after the float training, shaded."""
    epochs = [h["epoch"] for h in history]
    n = len(epochs)
    qat_epochs = [n + h["epoch"] for h in qat]
    train = [h["train_loss"] for h in history] + [h["train_loss"] for h in qat]
    val = [h["val_loss"] for h in history] + [h["val_loss"] for h in qat]
    values = [v for v in train + val if math.isfinite(v)]
    top = sorted(values)[int(0.98 * (len(values) - 1))] if values else 1.0  # keep a first-epoch spike in scale
    plot = _Plot(720, 280, (1, max(2, n + len(qat))), (0, top), integer_x=True)
    if qat:
        x0, x1 = plot.x(n + 0.5), plot.x(n + len(qat))
        plot.parts.append(f'<rect x="{x0:.1f}" y="{plot.top}" width="{x1 - x0:.1f}"'
                          f' height="{plot.height - plot.top - plot.bottom}" fill="#faf5ff"/>')
        plot.parts.append(f'<text x="{plot.x(n + 0.5) + 4:.1f}" y="{plot.top + 12}" fill="{PURPLE}">QAT</text>')
    plot.axes("epoch", "loss")
    xs = epochs + qat_epochs
    plot.polyline(xs, [min(v, plot.y1) for v in train], BLUE)
    plot.polyline(xs, [min(v, plot.y1) for v in val], ORANGE)
    return plot.svg("training and validation loss per epoch")


def confusion_chart(matrix: list[list[int]], classes: list[str], title: str) -> Markup:
    """A confusion matrix as a heat map: rows are the true class, columns the predicted one."""
    k = len(classes)
    cell, left, top = 44, 96, 28
    size_w, size_h = left + k * cell + 48, top + k * cell + 78
    peak = max((max(row) for row in matrix), default=1) or 1
    parts = [f'<text x="{left + k * cell / 2:.0f}" y="16" text-anchor="middle" class="label">{escape(title)}</text>']
    for i, row in enumerate(matrix):
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.0f}" text-anchor="end">'
                     f'{escape(classes[i])}</text>')
        for j, v in enumerate(row):
            share = v / peak
            fill = f"rgba(43,108,176,{0.08 + 0.85 * share:.2f})" if v else "#f7fafc"
            ink = "#fff" if share > 0.55 else TEXT
            x, y = left + j * cell, top + i * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" rx="3" fill="{fill}"/>')
            parts.append(f'<text x="{x + cell / 2 - 1:.0f}" y="{y + cell / 2 + 4:.0f}" text-anchor="middle" '
                         f'fill="{ink}">{v}</text>')
    for j, name in enumerate(classes):
        x = left + j * cell + cell / 2
        parts.append(f'<text transform="translate({x:.0f} {top + k * cell + 8}) rotate(40)">{escape(name)}</text>')
    parts.append(f'<text x="{left + k * cell / 2:.0f}" y="{size_h - 4}" text-anchor="middle" class="label">'
                 f'predicted</text>')
    return Markup(f'<svg viewBox="0 0 {size_w} {size_h}" role="img" aria-label="{escape(title)}" '
                  f'xmlns="http://www.w3.org/2000/svg" class="confusion"><title>{escape(title)}</title>'
                  f'{"".join(parts)}</svg>')


LABELLED = "#fed7d7"  # the shading of a labelled anomaly


def forecast_chart(series: dict[str, Any], anomalies: list[list[int]] | None = None,
                   threshold: float | None = None) -> Markup:
    """Truth, FP32 and INT8 predictions over the plotted test points; each labelled anomaly (first and last row)
    shaded, and with the INT8 ``threshold`` a red tick under every point the INT8 model flags."""
    rows, truth, fp32, int8 = series["row"], series["truth"], series["fp32"], series["int8"]
    values = [v for v in truth + fp32 + int8 if math.isfinite(v)]
    plot = _Plot(880, 300, (min(rows), max(rows)), (min(values), max(values)))
    for lo, hi in anomalies or []:
        if hi >= rows[0] and lo <= rows[-1]:
            x0, x1 = plot.x(max(lo, rows[0])), plot.x(min(hi, rows[-1]))
            plot.parts.append(f'<rect class="labelled" x="{x0:.1f}" y="{plot.top}" width="{max(2.0, x1 - x0):.1f}" '
                              f'height="{plot.height - plot.top - plot.bottom}" fill="{LABELLED}">'
                              f'<title>labelled anomaly, rows {lo} to {hi}</title></rect>')
    plot.axes("row of the series", series["target"])
    plot.polyline(rows, truth, TEXT, 1.6)
    plot.polyline(rows, fp32, BLUE, 1.4)
    plot.polyline(rows, int8, ORANGE, 1.4, "5 3")
    if threshold is not None:
        base = plot.height - plot.bottom
        plot.parts.extend(f'<line class="flag" x1="{plot.x(r):.1f}" x2="{plot.x(r):.1f}" y1="{base - 8}" '
                          f'y2="{base}" stroke="{RED}" stroke-width="1.5"/>'
                          for r, t, q in zip(rows, truth, int8, strict=True) if abs(q - t) > threshold)
    return plot.svg("forecast against the truth on the test split")


def histogram_chart(values: list[int], unit: str) -> Markup:
    """The device's counts per window as a histogram."""
    lo, hi = min(values), max(values)
    bins = max(1, min(30, len(set(values))))
    width = (hi - lo) / bins if hi > lo else max(1.0, abs(hi) * 0.001)
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    plot = _Plot(720, 260, (lo, lo + bins * width), (0, max(counts)))
    plot.axes(f"{unit} per window", "windows")
    for i, c in enumerate(counts):
        x0, x1 = plot.x(lo + i * width), plot.x(lo + (i + 1) * width)
        plot.parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{plot.y(c):.1f}" width="{max(1.0, x1 - x0 - 1):.1f}" '
                          f'height="{plot.y(0) - plot.y(c):.1f}" fill="{GREEN}"><title>{c} windows</title></rect>')
    return plot.svg(f"{unit} per window on the device")


def memory_bars(plan: dict[str, Any], build: dict[str, Any] | None) -> Markup:
    """Flash and RAM of the board as bars: the model, the kernel, the firmware overhead and the stack reserve
    (planner), with the linker's measured figure marked."""
    colours = {"model": BLUE, "kernel": PURPLE, "firmware": GREEN, "overhead": "#a0aec0", "stack": "#cbd5e0"}
    width, left, bar_h = 880, 64, 30
    rows = []
    for n, region in enumerate(("flash", "ram")):
        capacity = plan[region]["capacity"]
        parts: dict[str, int] = {"model": 0, "kernel": 0, "firmware": 0}
        for item in plan["items"]:
            if item["region"] == region:
                parts[item["part"]] += item["bytes"]
        overhead = dict(plan["overhead"][region])
        stack = overhead.pop("stack", 0)
        parts["overhead"] = sum(overhead.values())
        if stack:
            parts["stack"] = stack
        y = 22 + n * 74
        scale = (width - left - 20) / max(capacity, plan[region]["total"])
        rows.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 5:.0f}" text-anchor="end" class="label">'
                    f'{region.upper() if region == "ram" else "Flash"}</text>')
        rows.append(f'<rect x="{left}" y="{y}" width="{capacity * scale:.1f}" height="{bar_h}" rx="4" '
                    f'fill="#f7fafc" stroke="{AXIS}"/>')
        x = float(left)
        for name, nbytes in parts.items():
            if nbytes:
                rows.append(f'<rect x="{x:.1f}" y="{y}" width="{nbytes * scale:.1f}" height="{bar_h}" '
                            f'fill="{colours[name]}"><title>{name}: {nbytes:,} bytes</title></rect>')
                x += nbytes * scale
        total = plan[region]["total"]
        rows.append(f'<text x="{left}" y="{y + bar_h + 16}">planned {total:,} of {capacity:,} bytes '
                    f'({total / capacity:.1%}), {plan[region]["status"]}</text>')
        if build and build.get("linker"):
            measured = build["linker"][region]
            lx = left + measured * scale
            rows.append(f'<line x1="{lx:.1f}" x2="{lx:.1f}" y1="{y - 6}" y2="{y + bar_h + 4}" stroke="{RED}" '
                        f'stroke-width="2.5"/>')
            label = "linker .data+.bss" if region == "ram" else "linker .text+.data"
            rows.append(f'<text x="{lx + 5:.1f}" y="{y - 1}" fill="{RED}">{label}: {measured:,}</text>')
    height = 22 + 2 * 74
    return Markup(f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="memory plan" '
                  f'xmlns="http://www.w3.org/2000/svg"><title>memory plan against the board</title>'
                  f'{"".join(rows)}</svg>')


MEMORY_KEYS = [("model (weights, state, scratch)", BLUE), ("kernel (code, tables)", PURPLE),
               ("firmware buffers", GREEN), ("framework + HIL overhead", "#a0aec0"), ("stack reserve", "#cbd5e0"),
               ("linker, measured", RED)]


# ---------------------------------------------------------------------------------------------------- data


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _versions(compiler: str | None) -> dict[str, str]:
    versions = {"tinylstm": __version__, "python": platform.python_version()}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    if compiler:
        versions["firmware compiler"] = compiler
    return versions


def _git_revision(directory: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def metric_rows(task: str, fp32: dict[str, Any], int8: dict[str, Any], device: dict[str, Any] | None,
                host_same: dict[str, Any] | None, interval: list[float] | None = None) -> list[dict[str, str]]:
    """The FP32 / INT8 host / INT8 device table: one row per metric; the device's accuracy with its 95 %
    ``interval``."""
    names = {"classification": [("accuracy", "pct"), ("macro_f1", "f3")],
             "forecasting": [("rmse", "g4"), ("mae", "g4"), ("naive_rmse", "g4")],
             "anomaly": [("f1", "f3"), ("precision", "f3"), ("recall", "f3"), ("anomalies_detected", "int"),
                         ("false_alarms", "int"), ("flagged_points", "int")]}[task]

    def show(d: dict[str, Any] | None, key: str, kind: str) -> str:
        if d is None or key not in d:
            return "–"
        v = d[key]
        return {"pct": f"{v:.1%}", "f3": f"{v:.3f}", "g4": f"{v:.4g}", "int": f"{v}"}[kind]

    rows = [{"metric": key.replace("_", " "), "fp32": show(fp32, key, kind), "int8": show(int8, key, kind),
             "host_same": show(host_same, key, kind), "device": show(device, key, kind)} for key, kind in names]
    if interval is not None:
        rows[0]["device"] += f" ({_span(interval)})"
    return rows


def build_label(build: dict[str, Any] | None) -> str:
    """"; <kernel> kernel, <compiler>" for the firmware a figure was measured on, or "" when not built."""
    if build and build.get("kernel") and build.get("compiler"):
        return f"; {build['kernel']} kernel, {build['compiler']}"
    return ""


def headline(task: str, metrics: dict[str, Any], *, with_name: bool = False) -> str:
    """The task's main figure as text: accuracy, RMSE (prefixed by its name on request), or for anomaly
    detection the events: labelled ones detected, false alarms and point-F1 (without labels: events flagged)."""
    if task == "classification":
        return f"{metrics['accuracy']:.1%}"
    if task == "forecasting":
        return f"RMSE {metrics['rmse']:.4g}" if with_name else f"{metrics['rmse']:.4g}"
    if "anomalies" not in metrics:
        return _count(len(metrics["events"]), "event") + " flagged"
    return (f"{metrics['anomalies_detected']}/{_count(len(metrics['anomalies']), 'event')}, "
            f"{_count(metrics['false_alarms'], 'false alarm')}, point-F1 {metrics['f1']:.2f}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _span(interval: list[float] | None) -> str:
    assert interval is not None, "an accuracy comes with its interval"
    return f"95% CI {interval[0]:.1%}–{interval[1]:.1%}"


def bit_exact(windows: int, mismatches: int) -> str:
    """"N/N windows bit-exact on the device"."""
    return f"{windows - mismatches}/{windows} windows bit-exact on the device"


def device_figure(task: str, metrics: dict[str, Any], windows: int, interval: list[float] | None) -> str:
    """The device's own figure on its sample, always with the sample size; an accuracy also with its 95 %
    (Wilson) interval."""
    on = f"on {_count(windows, 'window')}"
    if task == "classification":
        return f"device accuracy {metrics['accuracy']:.1%} {on} ({_span(interval)})"
    if task == "forecasting":
        return f"device RMSE {metrics['rmse']:.4g} {on}"
    # An anomaly sample is rich in labelled anomalies by design, so a point-F1 on it says little: give counts.
    flagged = f"device flagged {metrics['flagged_points']} of {_count(windows, 'window')}"
    if "f1" not in metrics:
        return flagged
    inside = round(metrics["precision"] * metrics["flagged_points"])
    return f"{flagged}, {inside} of them inside labelled anomalies"


def sample_text(sample: dict[str, Any], windows: int, test_windows: int) -> str:
    """Which test windows the device ran; ``sample``: how they were drawn ({"method", "seed"}; a stratified
    sample without a seed is evenly spaced)."""
    if windows == test_windows:
        return f"all {test_windows} test windows"
    if sample["method"] == "first":
        return f"the first {windows} of {test_windows} test windows"
    if sample["seed"] is None:
        return f"{windows} of {test_windows} test windows, evenly spaced"
    return f"a stratified sample of {windows} of {test_windows} test windows, seed {sample['seed']}"


def summary_cards(task: str, evaluation: dict[str, Any] | None, bench: dict[str, Any] | None,
                  plan: dict[str, Any] | None, build: dict[str, Any] | None, test_windows: int) -> list[dict[str, Any]]:
    """The figures at the top: quality (FP32 and INT8 host on the whole test split), latency, memory, and the
    device: windows bit-exact, and its own figure with the sample size."""
    cards = []
    if evaluation:
        c = evaluation["comparison"]
        detail = f"all {test_windows} test windows; INT8 host is the integer reference, the device's arithmetic"
        int8 = c["int8"]
        if task == "anomaly" and "anomalies" in int8:
            values = [("detected", f"{int8['anomalies_detected']} / {len(int8['anomalies'])}"),
                      ("false alarms", f"{int8['false_alarms']}"), ("point-F1", f"{int8['f1']:.2f}")]
            cards.append({"title": "labelled events, INT8 host", "values": values,
                          "detail": f"{detail}. FP32: {headline(task, c['fp32'])}", "ok": None})
        else:
            title = {"classification": "accuracy", "forecasting": "RMSE", "anomaly": "events flagged"}[task]
            values = [("FP32", headline(task, c["fp32"])), ("INT8 host", headline(task, int8))]
            cards.append({"title": title, "values": values, "detail": detail, "ok": None})
    if bench:
        stats, unit = bench["stats"], bench["unit"]
        detail = f"{stats['per_step_median']:,.0f} per time step"
        if unit == "cycles":
            detail += f"; {stats['median'] / bench['cpu_hz'] * 1e3:,.1f} ms at {bench['cpu_hz'] / 1e6:g} MHz"
        elif unit == "instructions":
            detail += "; QEMU counts instructions, not cycles"
        detail += build_label(build)
        cards.append({"title": f"{unit} per inference", "values": [("median", f"{stats['median']:,.0f}")],
                      "detail": detail, "ok": None})
    if plan:
        linker = (build or {}).get("linker")
        ram = linker["ram"] if linker else plan["ram"]["total"]
        flash = linker["flash"] if linker else plan["flash"]["total"]
        source = "linker" if linker else "planner"
        cards.append({"title": f"memory on {plan['board']}",
                      "values": [("RAM", f"{ram:,} / {plan['ram']['capacity']:,} B"),
                                 ("flash", f"{flash:,} / {plan['flash']['capacity']:,} B")],
                      "detail": f"{source}; planner verdict: {plan['verdict']}",
                      "ok": plan["verdict"] != "does not fit"})
    timing = real_time_card(plan, bench)
    if timing:
        cards.append(timing)
    if bench:
        exact = bench["mismatches"] == 0
        detail = (f"{device_figure(task, bench['device'], bench['windows'], bench['device_interval'])}; "
                  f"{sample_text(bench['sample'], bench['windows'], bench['test_windows'])}")
        exact_windows = f"{bench['windows'] - bench['mismatches']} / {bench['windows']}"
        cards.append({"title": f"on {bench['board']}", "values": [("windows bit-exact", exact_windows)],
                      "detail": detail if exact else f"{bench['mismatches']} windows differ; {detail}", "ok": exact})
    return cards


def real_time_card(plan: dict[str, Any] | None, bench: dict[str, Any] | None) -> dict[str, Any] | None:
    """The step time against the sample period: measured on the device when benchmarked, and as planned."""
    from tinylstm.budget import DOES_NOT_FIT, Deadline, duration

    planned = Deadline.from_dict(plan["deadline"]) if plan and plan.get("deadline") else None
    measured = Deadline.from_dict(bench["deadline"]) if bench and bench.get("deadline") else None
    shown = measured or planned
    if shown is None:
        return None
    values = [("period", duration(shown.period))]
    if measured:
        values.append(("measured mean step", duration(measured.step_seconds)))
    if planned and planned.step_seconds is not None:
        values.append(("step bound" if planned.upper_bound else "predicted step", duration(planned.step_seconds)))
    if shown.step_seconds is None:
        return {"title": f"real time at {shown.sample_rate_hz:g} Hz", "values": values,
                "detail": f"not checked: {shown.note}", "ok": None}
    return {"title": f"real time at {shown.sample_rate_hz:g} Hz", "values": values,
            "detail": f"{'device' if measured else 'planner'}: {shown.margin()}; {shown.note}",
            "ok": shown.status != DOES_NOT_FIT}


def build_context(out_dir: str | Path) -> dict[str, Any]:
    """Everything the template shows, from the artefacts in ``out_dir``."""
    out_dir = Path(out_dir)
    manifest = _read(out_dir / "pipeline.json")
    data = _read(out_dir / "data" / "summary.json")
    if manifest is None or data is None:
        raise ReportError(f"{out_dir} holds no pipeline run (no pipeline.json or data/summary.json); "
                          "run tinylstm demo or tinylstm run first")
    plan = _read(out_dir / "plan" / "plan.json")
    training = _read(out_dir / "train" / "training.json")
    evaluation = _read(out_dir / "quantize" / "evaluation.json")
    build = _read(out_dir / "firmware" / "build.json")
    bench = _read(out_dir / "bench" / "bench.json")
    config_path = out_dir / "config.toml"
    board = plan["board"] if plan else (build or {}).get("board")
    task = data["task"]
    ctx: dict[str, Any] = {
        "out_dir": str(out_dir.resolve()), "manifest": manifest, "data": data, "plan": plan, "training": training,
        "evaluation": evaluation, "build": build, "bench": bench, "task": task, "board": board,
        "name": (evaluation or {}).get("name") or data["spec"].get("dataset") or Path(data["source"]).stem,
        "config_text": config_path.read_text() if config_path.is_file() else "",
        "stages": [{"name": name, **{k: record.get(k) for k in ("status", "line", "seconds")}}
                   for name, record in manifest["stages"].items()],
        "commands": [manifest.get("command", ""), f"tinylstm run {out_dir / 'config.toml'}",
                     f"tinylstm report {out_dir}"],
        "versions": _versions((build or {}).get("compiler")), "git": _git_revision(Path(__file__).parent),
        "memory_keys": legend(MEMORY_KEYS if (build or {}).get("linker") else MEMORY_KEYS[:-1]),
    }
    if training:
        ctx["training_chart"] = training_chart(training["history"], (evaluation or {}).get("qat_history", []))
        ctx["training_keys"] = legend([("training loss", BLUE), ("validation loss", ORANGE)])
    if evaluation:
        comparison = evaluation["comparison"]
        ctx["metrics"] = metric_rows(task, comparison["fp32"], comparison["int8"],
                                     bench["device"] if bench else None, bench["host_int8"] if bench else None,
                                     bench["device_interval"] if bench else None)
        if task == "classification":
            classes = data["classes"]
            ctx["confusions"] = [confusion_chart(comparison["fp32"]["confusion"], classes, "FP32 (PyTorch)"),
                                 confusion_chart(comparison["int8"]["confusion"], classes,
                                                 "INT8 (integer reference)")]
            if bench:
                ctx["confusions"].append(confusion_chart(bench["device"]["confusion"], classes,
                                                         f"INT8 on {bench['board']}, {bench['windows']} windows"))
        elif evaluation.get("series"):
            int8 = comparison["int8"]
            ctx["forecast_chart"] = forecast_chart(evaluation["series"], int8.get("anomalies"), int8.get("threshold"))
            ctx["forecast_keys"] = legend([("truth", TEXT), ("FP32", BLUE), ("INT8 (reference)", ORANGE)]
                                          + ([("labelled anomaly", LABELLED)] if int8.get("anomalies") else [])
                                          + ([("flagged by INT8", RED)] if task == "anomaly" else []))
    ctx["cards"] = summary_cards(task, evaluation, bench, plan, build, data["windows"]["test"])
    if bench:
        ctx["sample_text"] = sample_text(bench["sample"], bench["windows"], bench["test_windows"])
    if plan:
        ctx["memory_chart"] = memory_bars(plan, build)
    if bench:
        ctx["latency_chart"] = histogram_chart(bench["counts"], bench["unit"])
    return ctx


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: f"{v:,.0f}"
    env.filters["pct"] = lambda v: f"{v:.1%}"
    return env


def render(out_dir: str | Path) -> str:
    return _environment().get_template(TEMPLATE).render(build_context(out_dir))


def write_report(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Render the report of the run in ``out_dir`` to ``path`` (default ``out_dir/report.html``), atomically."""
    path = Path(path) if path is not None else Path(out_dir) / "report.html"
    html = render(out_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(path)
    return path
