"""Full-size training and quantization runs on the bundled datasets; writes the figures to JSON and Markdown.

    python hil/benchmark_training.py [--out DIR]

1. BasicMotions: an LSTM that fits uno_sim by the planner; FP32 and INT8 (integer reference) test accuracy.
2. taylor_demand, walk-forward: FP32 and INT8 RMSE against the naive last-value forecast.
3. kdd_tsad_135: the labelled anomaly flagged, and the false alarms.

Post-training quantization first; quantization-aware fine-tuning only when the INT8 model falls short of the
target (the gap is reported either way).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tinylstm import qmodel
from tinylstm.data import DataSpec, load_dataset
from tinylstm.quantize import QuantConfig, quantize_checkpoint
from tinylstm.train import TrainConfig, check_budget, save_checkpoint, train_model

RUNS = {
    "basic_motions": {
        "spec": {}, "hidden": [32], "board": "uno_sim",
        "train": TrainConfig(epochs=400, lr=1e-2, batch_size=32, schedule="cosine", optimizer="adamw",
                             weight_decay=0.1),  # the demo's recipe (tinylstm.pipeline.DEMOS)
        "quant": QuantConfig(calibration="percentile"),
    },
    "taylor_demand": {
        "spec": {"window": 48}, "hidden": [16], "board": "uno_sim",
        "train": TrainConfig(epochs=150, lr=1e-2, batch_size=64, patience=25, lr_patience=8),
        "quant": QuantConfig(calibration="minmax"),
    },
    "kdd_tsad_135": {
        "spec": {"window": 32}, "hidden": [16], "board": "uno_sim", "margin": 2.0,
        "train": TrainConfig(epochs=150, lr=1e-2, batch_size=64, patience=25, lr_patience=8),
        "quant": QuantConfig(calibration="minmax"),
    },
}


def good_enough(task, comparison):
    f, q = comparison.fp32, comparison.int8
    if task == "classification":
        return q["accuracy"] >= f["accuracy"] - 0.01
    if task == "forecasting":
        return q["rmse"] <= 1.03 * f["rmse"]
    return q.get("anomalies_detected", 0) == len(q.get("anomalies", [])) and q.get("false_alarms", 0) <= 3


def run(name, cfg, out_dir):
    start = time.monotonic()
    dataset = load_dataset(DataSpec.for_dataset(name, **cfg["spec"]))
    checkpoint, result = train_model(dataset, cfg["hidden"], cfg["train"],
                                     threshold_margin=cfg.get("margin", 1.5))
    plan = check_budget(cfg["board"], checkpoint.config, cfg["quant"].per_channel)
    train_s = time.monotonic() - start
    quant = quantize_checkpoint(checkpoint, cfg["quant"], dataset=dataset, name=name)
    qat_used = False
    if not good_enough(dataset.task, quant.comparison):
        quant = quantize_checkpoint(checkpoint, cfg["quant"], dataset=dataset, name=name, qat_epochs=10, qat_lr=3e-4)
        qat_used = True
        checkpoint.model = quant.float_model
    save_checkpoint(checkpoint, out_dir / f"{name}.pt")
    qmodel.save(quant.qmodel, out_dir / f"{name}.npz")
    return {
        "dataset": name, "task": dataset.task, "hidden": cfg["hidden"], "window": dataset.window,
        "features": dataset.features, "windows": {"train": len(dataset.train), "val": len(dataset.val),
                                                  "test": len(dataset.test)},
        "epochs_run": len(result.history), "best_epoch": result.best_epoch, "qat": qat_used,
        "quantization": {"calibration": cfg["quant"].calibration, "per_channel": cfg["quant"].per_channel},
        "board": {"name": cfg["board"], "verdict": plan.verdict, "ram": plan.ram.total,
                  "ram_capacity": plan.ram.capacity, "flash": plan.flash.total, "flash_capacity": plan.flash.capacity,
                  "model_flash": plan.flash.model, "model_ram": plan.ram.model},
        "parameters": sum(p.numel() for p in checkpoint.model.parameters()),
        "fp32": quant.comparison.fp32, "int8": quant.comparison.int8, "gap": quant.comparison.gap,
        "meets_target": good_enough(dataset.task, quant.comparison),
        "seconds": {"train": round(train_s, 1), "total": round(time.monotonic() - start, 1)},
    }


def markdown(results, total_s):
    lines = ["# Training and INT8 quantization benchmark", "",
             f"All runs on CPU, torch threads 1, seeds 0; total {total_s:.0f} s. INT8 = tinylstm.reference.", ""]
    for r in results:
        f, q, b = r["fp32"], r["int8"], r["board"]
        lines.append(f"## {r['dataset']} ({r['task']})")
        lines.append(f"- model: hidden {r['hidden']}, window {r['window']}, {r['features']} feature(s), "
                     f"{r['parameters']} parameters; {b['name']}: {b['verdict']} "
                     f"(RAM {b['ram']}/{b['ram_capacity']} B, flash {b['flash']}/{b['flash_capacity']} B;"
                     f" model part {b['model_flash']} B flash)")
        lines.append(f"- windows train/val/test: {r['windows']['train']}/{r['windows']['val']}/{r['windows']['test']};"
                     f" epochs {r['epochs_run']} (best {r['best_epoch']}); QAT: {'yes' if r['qat'] else 'no'};"
                     f" {r['seconds']['total']} s")
        if r["task"] == "classification":
            lines.append(f"- test accuracy FP32 {f['accuracy']:.2%}, INT8 {q['accuracy']:.2%} "
                         f"(gap {100 * r['gap']:+.2f} pp); macro-F1 {f['macro_f1']:.3f} / {q['macro_f1']:.3f}")
        elif r["task"] == "forecasting":
            lines.append(f"- test RMSE FP32 {f['rmse']:.1f}, INT8 {q['rmse']:.1f} ({r['gap'] / f['rmse']:+.2%}); "
                         f"naive last value {f['naive_rmse']:.1f}; MAE {f['mae']:.1f} / {q['mae']:.1f}")
        else:
            for side, m in (("FP32", f), ("INT8", q)):
                lines.append(f"- {side}: threshold {m['threshold']:.3f}, anomalies detected {m['anomalies_detected']}/"
                             f"{len(m['anomalies'])}, false alarms {m['false_alarms']}, flagged points "
                             f"{m['flagged_points']}/{m['points']}, point precision {m['precision']:.2f} recall "
                             f"{m['recall']:.2f} F1 {m['f1']:.2f}; events {m['events']}")
        lines.append(f"- meets the target: {'yes' if r['meets_target'] else 'NO'}")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmark-training"), help="output directory")
    parser.add_argument("--only", choices=list(RUNS), action="append", help="run only these datasets")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results = []
    for name in args.only or RUNS:
        results.append(run(name, RUNS[name], args.out))
        print(json.dumps({k: results[-1][k] for k in ("dataset", "gap", "meets_target", "seconds")}), flush=True)
    total = time.monotonic() - start
    (args.out / "figures.json").write_text(json.dumps({"total_seconds": round(total, 1), "runs": results}, indent=2))
    (args.out / "figures.md").write_text(markdown(results, total) + "\n")
    print(markdown(results, total))


if __name__ == "__main__":
    main()
