"""Latency cost model: cycles (or instructions) per LSTM time step as a function of the model's shape.

It is calibrated on the kernel benchmark suite's measurements, one fit per board and kernel variant. A
measurement is a record ``{"board", "variant", "input", "hidden", "layers", "per_step"}`` with an optional
``"unit"`` (``per_step``: the device's counts for one time step of the whole stack, in the board's unit: simavr
"cycles", QEMU "instructions"; cycles when not given). ``layers`` may be left out for one layer, as the kernel
benchmark suite (``tinylstm.perf.run_suite``) writes its records.

The model: ``per_step = a * MACs + b * hidden units + c * layers``, where MACs = sum over layers of
4 H (K + H) (K is the layer's input width). ``a`` is the inner-loop cost per multiply-accumulate, ``b`` the
per-unit work (requantization, activations, the cell update) and ``c`` the per-layer call overhead. The
coefficients are fitted by non-negative least squares on relative error, so small and large shapes count alike.
The head runs once per window and is costed as ``outputs * H`` MACs at ``a``.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinylstm.boards import Board
from tinylstm.export import ModelShape, default_variant

FEATURES = ("macs", "units", "layers")
# The kernel benchmark suite's results (docs/performance.md): the calibration the planner and the search use.
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "docs" / "performance.json"
REQUIRED_KEYS = ("board", "variant", "input", "hidden", "per_step")
# How far the HIL firmware's longest sample period (step, head and the reset after them, built as the firmware is)
# measured above the fit of DEFAULT_CALIBRATION, per board and kernel: written by hil/deadline_vs_device.py --write.
DEFAULT_ALLOWANCE = Path(__file__).resolve().parents[1] / "docs" / "deadline-allowance.json"


class CostModelError(ValueError):
    """Calibration data that cannot be read or fitted, or a board the model has no data for."""


@dataclass(frozen=True)
class Measurement:
    board: str
    variant: str
    input: int
    hidden: int
    layers: int
    per_step: float
    unit: str = "cycles"

    @property
    def shape(self) -> ModelShape:
        return ModelShape(input_size=self.input, hidden_sizes=(self.hidden,) * self.layers, window=1, outputs=None)


def features(shape: ModelShape) -> np.ndarray:
    """The per-step cost drivers of a shape: MACs, hidden units and layers (FEATURES)."""
    widths = (shape.input_size, *shape.hidden_sizes[:-1])
    macs = sum(4 * h * (k + h) for k, h in zip(widths, shape.hidden_sizes, strict=True))
    return np.array([macs, sum(shape.hidden_sizes), len(shape.hidden_sizes)], dtype=np.float64)


def parse_measurements(records: Iterable[dict[str, Any]], where: str = "calibration data") -> list[Measurement]:
    """Check and convert measurement records; the error names the record and the field at fault."""
    out = []
    for n, r in enumerate(records):
        if not isinstance(r, dict):
            raise CostModelError(f"{where}: record {n} is not an object")
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise CostModelError(f"{where}: record {n} lacks {', '.join(missing)}")
        try:
            m = Measurement(str(r["board"]), str(r["variant"]), int(r["input"]), int(r["hidden"]),
                            int(r.get("layers", 1)), float(r["per_step"]), str(r.get("unit", "cycles")))
        except (TypeError, ValueError):
            raise CostModelError(f"{where}: record {n} has a non-numeric size or per_step") from None
        if min(m.input, m.hidden, m.layers) < 1 or not np.isfinite(m.per_step) or m.per_step <= 0:
            raise CostModelError(f"{where}: record {n} has a size below 1 or a per_step that is not positive")
        out.append(m)
    return out


def load_measurements(path: str | Path) -> list[Measurement]:
    """Read measurements from JSON: a list of records, or an object holding them under "records" (the kernel
    benchmark suite's file) or "measurements"."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CostModelError(f"{path}: no such calibration file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CostModelError(f"{path}: not readable JSON ({e})") from None
    records = doc.get("records", doc.get("measurements")) if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise CostModelError(f"{path}: expected a list of measurements (or an object with \"records\")")
    return parse_measurements(records, str(path))


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best non-negative solution over column subsets."""
    best_residual, best = np.inf, np.zeros(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            residual = float(np.sum((x[:, cols] @ coef - y) ** 2))
            if residual < best_residual * (1 - 1e-12):  # a smaller subset wins ties
                best_residual, best = residual, np.zeros(x.shape[1])
                best[list(cols)] = coef
    return best


def fit_coefficients(measurements: Sequence[Measurement]) -> np.ndarray:
    """Coefficients (a, b, c) minimising the squared relative error over the measurements."""
    if not measurements:
        raise CostModelError("no measurements to fit")
    x = np.stack([features(m.shape) for m in measurements])
    y = np.array([m.per_step for m in measurements])
    return nnls(x / y[:, None], np.ones(len(y)))


@dataclass(frozen=True)
class Fit:
    """One board and variant: the coefficients, and how well they predict measurements left out of the fit."""

    board: str
    variant: str
    unit: str
    coefficients: tuple[float, float, float]
    points: int
    loo_errors: tuple[float, ...]  # relative error (predicted / measured - 1) of each point, fitted without it

    def per_step(self, shape: ModelShape) -> float:
        return float(features(shape) @ np.array(self.coefficients))

    @property
    def loo_mean(self) -> float | None:
        return float(np.mean(np.abs(self.loo_errors))) if self.loo_errors else None

    @property
    def loo_max(self) -> float | None:
        return float(np.max(np.abs(self.loo_errors))) if self.loo_errors else None

    def to_dict(self) -> dict[str, Any]:
        return {"board": self.board, "variant": self.variant, "unit": self.unit,
                "coefficients": dict(zip(FEATURES, self.coefficients, strict=True)),
                "points": self.points, "loo_errors": list(self.loo_errors), "loo_mean_abs": self.loo_mean,
                "loo_max_abs": self.loo_max}


def _shape_key(m: Measurement) -> tuple[int, int, int]:
    return (m.input, m.hidden, m.layers)


def fit_group(measurements: Sequence[Measurement]) -> Fit:
    """Fit one board/variant group, with leave-one-out errors when it has at least three distinct shapes.

    Leave-one-out leaves out a whole shape (every measurement of it), so a repeated shape cannot predict itself.
    """
    coef = fit_coefficients(measurements)
    loo: list[float] = []
    if len({_shape_key(m) for m in measurements}) >= 3:
        for m in measurements:
            rest = [o for o in measurements if _shape_key(o) != _shape_key(m)]
            loo.append(float(features(m.shape) @ fit_coefficients(rest)) / m.per_step - 1.0)
    first = measurements[0]
    if len({m.unit for m in measurements}) > 1:
        raise CostModelError(f"{first.board}/{first.variant}: measurements in more than one unit")
    return Fit(first.board, first.variant, first.unit, tuple(float(c) for c in coef), len(measurements), tuple(loo))


@dataclass(frozen=True)
class Allowance:
    """What the planner adds to the cost model's longest step on one board and kernel to bound the device's longest
    sample: a share of the prediction, plus fixed counts per sample and per output of the head."""

    board: str
    variant: str
    share: float  # 0.1: 10% of the cost model's step and head
    per_sample: float  # counts
    per_output: float  # counts per output of the dense head
    command: str = ""  # the command that measured it

    def fixed(self, shape: ModelShape) -> float:
        """The fixed part for ``shape``: per sample, and per output of its head."""
        return self.per_sample + self.per_output * (shape.outputs or 0)

    def bound(self, shape: ModelShape, predicted: float) -> float:
        """The upper bound of the longest sample, from the cost model's longest step ``predicted``."""
        return predicted * (1 + self.share) + self.fixed(shape)

    def text(self) -> str:
        return f"+ {self.share:.0%} + {self.per_sample:,.0f} per sample + {self.per_output:,.0f} per output"


ALLOWANCE_KEYS = ("board", "variant", "unit", "models", "max_ratio", "share", "per_sample", "per_output")


def load_allowances(path: str | Path = DEFAULT_ALLOWANCE) -> dict[tuple[str, str], Allowance]:
    """The allowances of a file hil/deadline_vs_device.py wrote, by (board, variant)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return {(a["board"], a["variant"]): Allowance(str(a["board"]), str(a["variant"]), float(a["share"]),
                                                      float(a["per_sample"]), float(a["per_output"]),
                                                      str(doc["command"]))
                for a in doc["allowances"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CostModelError(f"{path}: not an allowance file of hil/deadline_vs_device.py ({e!r}); "
                             "rewrite it with that script's --write") from None


def write_allowances(rows: Sequence[dict[str, Any]], command: str, path: Path = DEFAULT_ALLOWANCE) -> None:
    """Store hil/deadline_vs_device.py's summary rows (ALLOWANCE_KEYS) atomically."""
    doc = {"command": command, "calibration": DEFAULT_CALIBRATION.name,
           "allowances": [{k: row[k] for k in ALLOWANCE_KEYS} for row in rows]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


@dataclass(frozen=True)
class Estimate:
    per_step: float
    per_window: float
    head: float  # the dense head, once per window after the last step
    variant: str
    fit: Fit


class CostModel:
    """Fits per (board, variant), latency estimates for model shapes, and the device allowances that turn an
    estimate of the longest step into an upper bound (``allowances``, by (board, variant))."""

    def __init__(self, measurements: Sequence[Measurement], source: str = "",
                 allowances: dict[tuple[str, str], Allowance] | None = None) -> None:
        groups: dict[tuple[str, str], list[Measurement]] = {}
        for m in measurements:
            groups.setdefault((m.board, m.variant), []).append(m)
        self.fits = {key: fit_group(group) for key, group in sorted(groups.items())}
        self.source = source
        self.allowances = allowances or {}

    @classmethod
    def from_files(cls, paths: Sequence[str | Path]) -> CostModel:
        """One model over the measurements of every file (the suite's results and extra calibrations). The fit of
        DEFAULT_CALIBRATION alone gets the allowances of DEFAULT_ALLOWANCE, which were measured against it."""
        default = [Path(p).resolve() for p in paths] == [DEFAULT_CALIBRATION]
        allowances = load_allowances() if default and DEFAULT_ALLOWANCE.is_file() else None
        return cls([m for path in paths for m in load_measurements(path)], ", ".join(map(str, paths)), allowances)

    def boards(self) -> list[str]:
        return sorted({board for board, _ in self.fits})

    def variant_for(self, board: Board, shape: ModelShape) -> str:
        """The firmware's default variant for the board when it was measured, else the fastest measured one."""
        measured = [variant for b, variant in self.fits if b == board.name]
        if not measured:
            raise CostModelError(f"no latency measurements for board {board.name} "
                                 f"(calibrated: {', '.join(self.boards()) or 'none'})")
        preferred = default_variant(board.arch, board.dsp)
        if preferred in measured:
            return preferred
        return min(measured, key=lambda v: self.fits[(board.name, v)].per_step(shape))

    def estimate(self, board: Board, shape: ModelShape, variant: str | None = None) -> Estimate:
        """Counts per time step and per window (window steps plus the dense head) on ``board``."""
        variant = variant or self.variant_for(board, shape)
        fit = self.fits.get((board.name, variant))
        if fit is None:
            raise CostModelError(f"no latency measurements for board {board.name} with the {variant} kernel")
        step = fit.per_step(shape)
        head = fit.coefficients[0] * (shape.outputs or 0) * shape.hidden_sizes[-1]
        return Estimate(step, step * shape.window + head, head, variant, fit)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": "per_step = a*MACs + b*units + c*layers",
                "fits": [f.to_dict() for f in self.fits.values()]}


@functools.lru_cache(maxsize=1)
def default_model() -> CostModel | None:
    """The cost model over DEFAULT_CALIBRATION, fitted once; None when the file is absent."""
    return CostModel.from_files([DEFAULT_CALIBRATION]) if DEFAULT_CALIBRATION.is_file() else None


# Shapes (input, hidden, layers) that ``calibrate`` measures beside the benchmark suite's: the small and stacked
# models a search on a small board tries.
CALIBRATION_SHAPES = ((6, 4, 1), (6, 8, 1), (3, 16, 1), (6, 16, 1), (12, 24, 1), (6, 32, 1), (6, 48, 1), (6, 8, 2),
                      (6, 16, 2), (6, 8, 3))


def calibrate(board: Board, variant: str, shapes: Sequence[tuple[int, int, int]], work: Path, cache: Path,
              log: Any = print) -> list[dict[str, Any]]:
    """Measure per-step counts of ``shapes`` on an emulated board with the kernel benchmark firmware
    (``tinylstm.perf.measure``, outputs checked against the integer reference); records in the documented format."""
    from tests.random_models import random_model, random_windows
    from tinylstm import perf

    records = []
    for input_size, hidden, layers in shapes:
        model = random_model(7, input_size=input_size, hidden_sizes=(hidden,) * layers, outputs=None,
                             window=perf.SUITE_WINDOW, per_channel=False, extreme=0.0)
        window = random_windows(3, model, 1)[0]
        result = perf.measure(model, variant, board, window, work / f"{input_size}x{hidden}x{layers}", cache)
        perf.check(model, window, result)
        records.append({"board": board.name, "variant": variant, "input": input_size, "hidden": hidden,
                        "layers": layers, "per_step": result.steady_step, "unit": result.unit,
                        "compiler": result.compiler, "flags": " ".join(result.flags)})
        log(f"{board.name} {variant} {input_size}x{hidden}x{layers}: {result.steady_step:,} {result.unit}/step")
    return records


def _main(argv: Sequence[str] | None = None) -> int:
    """python -m tinylstm.costmodel {fit FILE | calibrate --board B --variant V --out FILE}"""
    import argparse
    import tempfile

    from tinylstm.boards import load_board

    parser = argparse.ArgumentParser(prog="python -m tinylstm.costmodel")
    sub = parser.add_subparsers(dest="command", required=True)
    fit_cmd = sub.add_parser("fit", help="fit measurements and print the leave-one-out errors")
    fit_cmd.add_argument("files", type=Path, nargs="+")
    cal = sub.add_parser("calibrate", help="measure CALIBRATION_SHAPES on an emulated board")
    cal.add_argument("--board", required=True)
    cal.add_argument("--variant", default="reference")
    cal.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        with tempfile.TemporaryDirectory(prefix="tinylstm-calibrate-") as work:
            records = calibrate(load_board(args.board), args.variant, CALIBRATION_SHAPES, Path(work),
                                Path(work) / "cache")
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"records": records}, indent=2) + "\n")
        tmp.replace(args.out)
        paths = [args.out]
    else:
        paths = args.files
    model = CostModel.from_files(paths)
    print(json.dumps(model.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
