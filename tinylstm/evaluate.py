"""Metrics for the float model and the integer model, the FP32-vs-INT8 report, and its optional plot.

The INT8 side always runs through ``tinylstm.reference`` (the integer arithmetic the device runs), on raw
windows quantized with the model's own input specification, exactly as the device and the HIL tools do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tinylstm import reference
from tinylstm.data import Dataset, Split
from tinylstm.qmodel import QuantizedModel

if TYPE_CHECKING:
    from tinylstm.train import LSTMModel

DEFAULT_THRESHOLD_MARGIN = 1.5
REFERENCE_CHUNK = 4096  # windows per reference call, to bound memory


class EvaluateError(ValueError):
    """A report that cannot be made (mismatched model and data, missing plotting library)."""


def predict(model: LSTMModel, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Float model outputs for normalised inputs [N, T, F] (class scores or normalised targets)."""
    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, model.config.outputs), np.float32)


def fp32_outputs(model: LSTMModel, dataset: Dataset, split: Split) -> np.ndarray:
    """Float model outputs: class scores, or predictions in the target's original units."""
    out = predict(model, dataset.inputs(split))
    return out if dataset.task == "classification" else dataset.to_units(out)


def int8_outputs(qmodel: QuantizedModel, dataset: Dataset, split: Split) -> np.ndarray:
    """Integer reference outputs, dequantized: class scores, or predictions in original units."""
    if qmodel.input.features != dataset.features or qmodel.input.window != dataset.window:
        raise EvaluateError(f"the model takes windows of {qmodel.input.window} x {qmodel.input.features},"
                            f" the data has {dataset.window} x {dataset.features}")
    q = [reference.run_batch(qmodel, qmodel.quantize_input(split.x[i:i + REFERENCE_CHUNK]))
         for i in range(0, len(split), REFERENCE_CHUNK)]
    out = qmodel.dequantize_output(np.concatenate(q))
    return out if dataset.task == "classification" else dataset.to_units(out)


# ------------------------------------------------------------------------------------------------- metrics


def classification_metrics(scores: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    pred = np.asarray(scores).argmax(axis=1)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    f1s = []
    for c in range(k):
        tp = confusion[c, c]
        p, r = _ratio(tp, confusion[:, c].sum()), _ratio(tp, confusion[c].sum())
        f1s.append(_ratio(2 * p * r, p + r))
    return {"accuracy": float((pred == y).mean()), "macro_f1": float(np.mean(f1s)),
            "confusion": confusion.tolist(), "windows": int(len(y))}


def forecasting_metrics(pred: np.ndarray, split: Split) -> dict[str, Any]:
    err = np.asarray(pred, dtype=np.float64) - split.y
    naive = split.naive - split.y
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "naive_mae": float(np.abs(naive).mean()), "naive_rmse": float(np.sqrt((naive**2).mean())),
            "windows": int(len(err))}


def anomaly_scores(pred: np.ndarray, split: Split) -> np.ndarray:
    """The anomaly score of each target point: |forecast - actual| in original units."""
    return np.abs(np.asarray(pred, dtype=np.float64)[:, 0] - split.y[:, 0])


def calibrate_threshold(pred: np.ndarray, split: Split, margin: float = DEFAULT_THRESHOLD_MARGIN) -> float:
    """The flagging threshold: margin times the largest score on known-normal windows."""
    return float(margin * anomaly_scores(pred, split).max())


def anomaly_metrics(pred: np.ndarray, split: Split, threshold: float, window: int) -> dict[str, Any]:
    """Point-wise precision/recall/F1 of the flags, and events.

    Flags closer than one window apart form one event (a disturbance stays in the input for a window).
    An event that starts inside a labelled anomaly or within one window after it is a detection;
    any other event is a false alarm.
    """
    score = anomaly_scores(pred, split)
    flag = score > threshold
    out: dict[str, Any] = {"threshold": threshold, "flagged_points": int(flag.sum()), "points": int(len(flag))}
    rows = split.row
    events = _runs(rows[flag], window)
    out["events"] = [[int(a), int(b)] for a, b in events]
    if split.truth is None:
        return out
    truth = split.truth.astype(bool)
    tp = int((flag & truth).sum())
    p, r = _ratio(tp, flag.sum()), _ratio(tp, truth.sum())
    labelled = _runs(rows[truth], 1)
    hits = [any(lo <= a <= hi + window for a, _ in events) for lo, hi in labelled]
    false_alarms = [e for e in events if not any(lo <= e[0] <= hi + window for lo, hi in labelled)]
    out.update({"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r),
                "anomalies": [[int(a), int(b)] for a, b in labelled], "anomalies_detected": int(sum(hits)),
                "false_alarms": len(false_alarms)})
    return out


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default): sound for small n and for 0 or n successes."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1 (got {successes} of {n})")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _runs(rows: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Group sorted row indices into (first, last) runs of members at most `max_gap` apart."""
    runs: list[tuple[int, int]] = []
    for r in np.asarray(rows).tolist():
        if runs and r - runs[-1][1] <= max_gap:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return runs


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def metrics(task: str, outputs: np.ndarray, dataset: Dataset, split: Split,
            threshold: float | None = None) -> dict[str, Any]:
    if task == "classification":
        assert dataset.classes is not None
        return classification_metrics(outputs, split.y, dataset.classes)
    if task == "forecasting":
        return forecasting_metrics(outputs, split)
    if threshold is None:
        raise EvaluateError("an anomaly model needs its calibrated threshold")
    return anomaly_metrics(outputs, split, threshold, dataset.window)


HEADLINE = {"classification": "accuracy", "forecasting": "rmse", "anomaly": "f1"}


@dataclass
class Comparison:
    task: str
    fp32: dict[str, Any]
    int8: dict[str, Any]

    @property
    def headline(self) -> str:
        return HEADLINE[self.task]

    @property
    def gap(self) -> float:
        """INT8 minus FP32 on the headline metric (accuracy and F1: in points of 1.0; RMSE: in units)."""
        return float(self.int8[self.headline] - self.fp32[self.headline])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.task, "metric": self.headline, "fp32": self.fp32, "int8": self.int8,
                             "gap": self.gap}
        if self.task == "forecasting" and self.fp32["rmse"] > 0:
            d["relative_gap"] = self.gap / self.fp32["rmse"]
        return d

    def summary(self) -> str:
        f, q, m = self.fp32[self.headline], self.int8[self.headline], self.headline
        if self.task == "forecasting":
            rel = self.gap / f if f else 0.0
            return (f"RMSE FP32 {f:.4g}  INT8 {q:.4g}  (gap {rel:+.2%}; naive last value {self.fp32['naive_rmse']:.4g})"
                    f"  MAE FP32 {self.fp32['mae']:.4g}  INT8 {self.int8['mae']:.4g}")
        line = f"{m} FP32 {f:.2%}  INT8 {q:.2%}  (gap {100 * self.gap:+.2f} pp)"
        if self.task == "classification":
            line += f"  macro-F1 FP32 {self.fp32['macro_f1']:.3f}  INT8 {self.int8['macro_f1']:.3f}"
        else:
            for side in ("fp32", "int8"):
                r = getattr(self, side)
                line += (f"\n  {side.upper()}: threshold {r['threshold']:.4g}, {r['flagged_points']} points flagged,"
                         f" {r.get('anomalies_detected', 0)}/{len(r.get('anomalies', []))} anomalies detected,"
                         f" {r.get('false_alarms', 0)} false alarms")
        return line


def check_pair(model: LSTMModel, qmodel: QuantizedModel) -> None:
    """Raise EvaluateError unless ``qmodel`` has the shape of ``model`` (was quantized from such a checkpoint)."""
    config = model.config
    float_shape = (config.input_size, list(config.hidden_sizes), config.outputs, config.window)
    int_shape = (qmodel.input.features, [layer.hidden_size for layer in qmodel.layers], qmodel.output_size,
                 qmodel.input.window)
    if float_shape != int_shape:
        def describe(shape: tuple) -> str:
            return f"input {shape[0]}, hidden {shape[1]}, outputs {shape[2]}, window {shape[3]}"
        raise EvaluateError(f"the quantized model ({describe(int_shape)}) was not made from this checkpoint "
                            f"({describe(float_shape)})")


def compare(model: LSTMModel, qmodel: QuantizedModel, dataset: Dataset, split: Split,
            fp32_threshold: float | None = None, int8_threshold: float | None = None) -> Comparison:
    """FP32 (PyTorch) against INT8 (integer reference) on one split."""
    check_pair(model, qmodel)
    f = metrics(dataset.task, fp32_outputs(model, dataset, split), dataset, split, fp32_threshold)
    q = metrics(dataset.task, int8_outputs(qmodel, dataset, split), dataset, split, int8_threshold)
    return Comparison(dataset.task, f, q)


# ---------------------------------------------------------------------------------------------------- plot


def plot(comparison: Comparison, dataset: Dataset, model: LSTMModel, qmodel: QuantizedModel,
         path: str | Path) -> Path:
    """A PNG: confusion matrices (classification), or forecast vs truth (forecasting, anomaly). Atomic write."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluateError("--plot needs matplotlib: pip install matplotlib") from None
    path = Path(path)
    split = dataset.test
    if dataset.task == "classification":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, side in zip(axes, ("fp32", "int8"), strict=True):
            cm = np.array(getattr(comparison, side)["confusion"])
            ax.imshow(cm, cmap="Blues")
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center")
            ticks = range(len(dataset.classes or []))
            ax.set_xticks(ticks, dataset.classes, rotation=45)
            ax.set_yticks(ticks, dataset.classes)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{side.upper()}: accuracy {getattr(comparison, side)['accuracy']:.1%}")
    else:
        fig, ax = plt.subplots(figsize=(12, 4.5))
        n = min(len(split), 2000) if dataset.task == "forecasting" else len(split)
        rows = split.row[:n]
        ax.plot(rows, split.y[:n, 0], label="truth", color="black", linewidth=1)
        ax.plot(rows, fp32_outputs(model, dataset, split)[:n, 0], label="FP32", linewidth=0.8)
        ax.plot(rows, int8_outputs(qmodel, dataset, split)[:n, 0], label="INT8 (reference)", linewidth=0.8)
        if dataset.task == "anomaly" and split.truth is not None:
            for lo, hi in comparison.int8.get("anomalies", []):
                ax.axvspan(lo, hi, color="red", alpha=0.2)
        ax.set_xlabel("row")
        ax.set_ylabel(dataset.target_names[0])
        ax.legend()
        ax.set_title(comparison.summary().splitlines()[0])
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a JSON report atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path
