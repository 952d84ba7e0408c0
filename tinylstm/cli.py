"""The tinylstm command line: a thin layer that parses, calls the library, and prints."""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from tinylstm import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinylstm")
def main() -> None:
    """tinylstm: train a small LSTM on time-series data, quantize it to int8, and run it on a microcontroller."""


@main.command()
@click.option("--format", "fmt", type=click.Choice(["c", "executorch", "arduino"]), default="c", show_default=True,
              help="What to generate: C sources (a header and source per model, plus the shared kernel), an "
                   "ExecuTorch bundle (model.pte, model.bpte, model.json; see docs/executorch.md), or an Arduino "
                   "library zip (<out>/tinylstm_<model name>.zip, with an example sketch).")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The quantized model file (.npz); for executorch, the float checkpoint from `tinylstm train`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write into; created if missing.")
@click.option("--prefix", default="tinylstm_model", show_default=True,
              help="Name prefix of every generated symbol and file (several models can share one firmware).")
@click.option("--board", help="c and arduino: the board the code is for (see `tinylstm boards`); its firmware's kernel "
                                "variant is generated: avr on AVR, arm_dsp on Cortex-M with DSP, else reference. "
                                "arduino needs --board or --variant.")
@click.option("--variant", type=click.Choice(["reference", "arm_dsp", "avr"]),
              help="c and arduino: the kernel variant, instead of the board's [c without --board: reference].")
@click.option("--force", is_flag=True, help="Overwrite the generated files in a non-empty directory.")
@click.option("--quantize", type=click.Choice(["int8"]),
              help="executorch only: an int8 program (PT2E, XNNPACKQuantizer) instead of FP32.")
def export(fmt: str, model_path: Path, out_dir: Path, prefix: str, board: str | None, variant: str | None,
           force: bool, quantize: str | None) -> None:
    """Generate device code for a quantized model, or an ExecuTorch bundle for a float checkpoint.

    The Arduino library ships the kernel the board's firmware runs (and `tinylstm bench` measures), e.g.
    `--board uno` the avr kernel.
    """
    if fmt == "executorch":
        if board or variant:
            raise click.UsageError("--board and --variant apply to --format c and arduino")
        _export_executorch(model_path, out_dir, quantize, force)
        return
    if quantize:
        raise click.UsageError("--quantize applies to --format executorch (quantize for C with `tinylstm quantize`)")
    if fmt == "arduino" and board is None and variant is None:
        raise click.UsageError("--format arduino builds a library for a board: give --board (e.g. uno; see "
                               "`tinylstm boards`), or --variant reference for the portable kernel")
    variant = _board_variant(board, variant)
    if fmt == "arduino":
        _export_arduino(model_path, out_dir, prefix, variant, force)
        return
    from tinylstm.export import ExportError, export_c
    from tinylstm.qmodel import ModelFormatError, load

    try:
        written = export_c(load(model_path), out_dir, prefix=prefix, force=force, variant=variant)
    except (ModelFormatError, ExportError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out_dir}: {e}") from None
    for path in written:
        click.echo(path)


def _board_variant(board: str | None, variant: str | None) -> str:
    """``variant``, else the kernel variant ``board``'s firmware builds, else the reference kernel."""
    if board is None:
        return variant or "reference"
    from tinylstm.boards import BoardError, load_board
    from tinylstm.firmware import board_variant

    try:
        return board_variant(load_board(board), variant)
    except BoardError as e:
        raise click.ClickException(str(e)) from None


def _export_arduino(model_path: Path, out_dir: Path, prefix: str, variant: str, force: bool) -> None:
    from tinylstm.arduino import ArduinoError, export_arduino
    from tinylstm.qmodel import ModelFormatError, load

    try:
        click.echo(export_arduino(load(model_path), out_dir, variant=variant, prefix=prefix, force=force))
    except (ModelFormatError, ArduinoError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out_dir}: {e}") from None


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by null, so that the output is valid JSON (RFC 8259)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def _emit(report: dict[str, Any], as_json: bool, text: str, quiet: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(_strict_json(report), indent=2, allow_nan=False))
    elif not quiet:
        click.echo(text)


def _epoch_bar(length: int, label: str, show: bool) -> contextlib.AbstractContextManager[Any]:
    """A per-epoch progress bar on stderr showing the losses, or a null context yielding None."""
    if not show:
        return contextlib.nullcontext(None)
    return click.progressbar(
        length=length, label=label, file=sys.stderr, show_eta=False,
        item_show_func=lambda log: f"epoch {log.epoch} loss {log.train_loss:.4f} val {log.val_loss:.4f}" if log else "",
    )


_SAMPLE_RATE_OPTION = click.option(
    "--sample-rate", type=click.FloatRange(0, min_open=True),
    help="The sensor's samples per second: the planner checks that one step per sample keeps up (a board's "
         "latency measurements permitting).")
_FILLNA_OPTION = click.option(
    "--fillna", type=click.Choice(["none", "ffill", "linear", "zero"]), default="none", show_default=True,
    help="What to do with NaN/inf values (none: refuse the data).")


def _split_options(command: Any) -> Any:
    """The options that say how recordings and groups cut and split the data, shared by train and search."""
    options = [
        click.option("--recording", help="CSV column that changes between recordings: no window crosses a change."),
        click.option("--group", help="CSV column of groups (e.g. subjects): no window crosses a change; with "
                                     "--split group (the default when given) each part holds whole groups."),
        click.option("--split", type=click.Choice(["auto", "walk-forward", "stratified", "group"]), default="auto",
                     show_default=True,
                     help="walk-forward: a series' rows in time order (train, validation, test). stratified: NPZ "
                          "windows drawn per class. group: whole groups per part (a CSV --group column or the "
                          "NPZ's groups array), every class in every part where possible. auto: group when "
                          "groups are given, else walk-forward for a CSV and stratified for an NPZ."),
        click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
                     help="Classification: balanced weights each class's loss by windows / (classes x its "
                          "windows), for imbalanced classes."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("data", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", help="A bundled demo set instead of a file: basic_motions, taylor_demand, kdd_tsad_135.")
@click.option("--task", type=click.Choice(["classification", "forecasting", "anomaly"]),
              help="What to learn (a bundled set brings its own).")
@click.option("--features", help="CSV feature columns, comma-separated (default: every column but the label).")
@click.option("--target", help="Forecasting/anomaly: the CSV column to predict.")
@click.option("--label",
              help="Classification: the CSV class column. Anomaly: the ground-truth column (evaluation only).")
@click.option("--hidden", default="32", show_default=True, help="Hidden size, or one per layer comma-separated.")
@click.option("--layers", type=click.IntRange(1, 3), help="Number of LSTM layers (with a single --hidden).")
@click.option("--window", type=int, help="Window length in time steps.")
@click.option("--stride", type=int, default=1, show_default=True, help="Steps between window starts.")
@click.option("--horizon", type=int, default=1, show_default=True, help="Forecasting: future steps to predict.")
@click.option("--norm", type=click.Choice(["zscore", "minmax", "none"]), default="zscore", show_default=True)
@_FILLNA_OPTION
@click.option("--val-fraction", type=float, default=0.15, show_default=True)
@click.option("--test-fraction", type=float, default=0.15, show_default=True)
@click.option("--normal-rows", type=int, help="Anomaly: length of the known-normal prefix (train + calibration).")
@click.option("--layout", type=click.Choice(["auto", "NTF", "NFT"]), help="NPZ window layout.")
@_split_options
@click.option("--board", help="Check the model against this board's memory (and --sample-rate) before training.")
@click.option("--per-channel", is_flag=True, help="Plan for per-channel weight scales.")
@_SAMPLE_RATE_OPTION
@click.option("--force", is_flag=True, help="Train even if the model does not fit the board or keep up.")
@click.option("--epochs", type=click.IntRange(1), default=200, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--patience", type=click.IntRange(1), default=50, show_default=True,
              help="Early stopping: epochs without a better validation loss.")
@click.option("--schedule", type=click.Choice(["plateau", "cosine"]), default="plateau", show_default=True,
              help="plateau: halve the learning rate when the validation loss stalls, stop early and restore the "
                   "best weights. cosine: decay it to 0 over --epochs and keep the last weights (for small "
                   "validation splits).")
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default="adam", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--clip-norm", type=float, default=1.0, show_default=True, help="Gradient clipping max-norm.")
@click.option("--threshold-margin", type=float, default=1.5, show_default=True,
              help="Anomaly: threshold = margin x the largest score on normal calibration data.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="torch CPU threads.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The float checkpoint to write (.pt).")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def train(data: Path | None, dataset: str | None, task: str | None, features: str | None, target: str | None,
          label: str | None, hidden: str, layers: int | None, window: int | None, stride: int, horizon: int,
          norm: str, fillna: str, val_fraction: float, test_fraction: float, normal_rows: int | None,
          layout: str | None, recording: str | None, group: str | None, split: str, class_weight: str,
          board: str | None, per_channel: bool, sample_rate: float | None, force: bool, epochs: int, lr: float,
          batch_size: int, patience: int, schedule: str, optimizer: str, weight_decay: float, clip_norm: float,
          threshold_margin: float, seed: int, threads: int, out: Path, quiet: bool, as_json: bool) -> None:
    """Train a float LSTM on a CSV/NPZ file or a bundled dataset, checking the board's budget first."""
    from tinylstm import boards, budget
    from tinylstm import train as tr
    from tinylstm.data import DataError, DataSpec, check_class_weight, load_dataset

    try:
        sizes = [int(v) for v in hidden.split(",")]
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not a size or a comma-separated list", param_hint="--hidden") from None
    if layers is not None:
        if len(sizes) != 1:
            raise click.BadParameter("give one --hidden size with --layers", param_hint="--layers")
        sizes = sizes * layers
    if sample_rate is not None and not board:
        raise click.UsageError("--sample-rate is checked against a board: give --board too")
    fields = dict(features=features.split(",") if features else None, target=target, label=label, window=window,
                  stride=stride, horizon=horizon, norm=norm, fillna=fillna, val_fraction=val_fraction,
                  test_fraction=test_fraction, normal_rows=normal_rows, layout=layout, seed=seed,
                  recording=recording, group=group, split=split)
    try:
        if (data is None) == (dataset is None):
            raise DataError("give either a data file or --dataset")
        if dataset:
            spec = DataSpec.for_dataset(dataset, task=task, **fields)
        else:
            if task is None:
                raise DataError("--task is required with a data file")
            spec = DataSpec(task=task, path=str(data.resolve()), **{k: v for k, v in fields.items() if v is not None})
        check_class_weight(spec.task, class_weight)
        ds = load_dataset(spec)
        config = tr.model_config_for(ds, sizes)
        config.validate()
        plan = None
        if board:
            try:
                plan = tr.check_budget(board, config, per_channel, sample_rate)
            except tr.TrainError:
                if not force:
                    raise
                plan = tr.plan_for(board, config, per_channel, sample_rate)
                click.echo(f"warning: {config.hidden_sizes} does not fit {board}; training anyway (--force)", err=True)
            for warning in plan.warnings:
                click.echo(f"warning: {warning}", err=True)
        train_config = tr.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                      optimizer=optimizer, clip_norm=clip_norm, patience=patience,
                                      schedule=schedule, seed=seed, threads=threads, class_weight=class_weight)
        with _epoch_bar(epochs, "training", not (quiet or as_json)) as bar:
            checkpoint, result = tr.train_model(ds, sizes, train_config, threshold_margin=threshold_margin,
                                                on_epoch=(lambda log: bar.update(1, log)) if bar else None)
        if not math.isfinite(result.best_val_loss):
            raise tr.TrainError(f"training diverged (the validation loss never became a finite number); no "
                                f"checkpoint written: lower --lr (now {lr:g}) or --clip-norm (now {clip_norm:g})")
        if plan is not None:
            checkpoint.extra["board"] = {"name": board, "verdict": plan.verdict, "per_channel": per_channel}
        tr.save_checkpoint(checkpoint, out)
    except (DataError, tr.TrainError, boards.BoardError, budget.PlanError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e}") from None
    params = sum(p.numel() for p in checkpoint.model.parameters())
    report = {"checkpoint": str(out), "task": ds.task, "model": vars(config), "parameters": params,
              "windows": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)},
              "board": checkpoint.extra.get("board"), "best_epoch": result.best_epoch,
              "epochs_run": len(result.history), "best_val_loss": result.best_val_loss,
              "fp32_test": checkpoint.extra["fp32_test"]}
    test = checkpoint.extra["fp32_test"]
    headline = {"classification": lambda: f"accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.3f}",
                "forecasting": lambda: f"RMSE {test['rmse']:.4g} (naive last value {test['naive_rmse']:.4g})",
                "anomaly": lambda: f"{test['flagged_points']} points flagged, "
                                   f"{test.get('anomalies_detected', 0)}/{len(test.get('anomalies', []))} anomalies "
                                   f"detected, {test.get('false_alarms', 0)} false alarms"}[ds.task]()
    text = (f"trained {ds.task} model, hidden {config.hidden_sizes}, {params} parameters; best epoch "
            f"{result.best_epoch}/{len(result.history)}\nFP32 test: {headline}\nwrote {out}")
    if plan is not None:
        text += f"\n{board}: {plan.verdict} (RAM {plan.ram.total}/{plan.ram.capacity} B, flash {plan.flash.total}/" \
                f"{plan.flash.capacity} B)"
    _emit(report, as_json, text, quiet)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The quantized model file to write (.npz).")
@click.option("--per-channel", is_flag=True, help="One weight scale per gate row instead of per gate.")
@click.option("--calibration", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True)
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.9, show_default=True,
              help="With --calibration percentile: the share of values kept inside each range.")
@click.option("--qat", is_flag=True, help="Quantization-aware fine-tuning before quantizing.")
@click.option("--qat-epochs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--qat-lr", type=float, default=1e-3, show_default=True)
@click.option("--save-checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="With --qat: also write the fine-tuned float checkpoint here.")
@click.option("--name", default="model", show_default=True, help="The model's name inside the file.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the FP32 vs INT8 JSON report.")
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
def quantize(checkpoint: Path, out: Path, per_channel: bool, calibration: str, percentile: float, qat: bool,
             qat_epochs: int, qat_lr: float, save_checkpoint: Path | None, name: str, report: Path | None,
             quiet: bool, as_json: bool) -> None:
    """Quantize a trained checkpoint to int8 and compare FP32 with the integer reference on held-out data."""
    from tinylstm import boards, budget, qmodel
    from tinylstm import quantize as qz
    from tinylstm import train as tr
    from tinylstm.data import DataError
    from tinylstm.evaluate import EvaluateError, write_report

    try:
        ckpt = tr.load_checkpoint(checkpoint)
        config = qz.QuantConfig(per_channel=per_channel, calibration=calibration, percentile=percentile)
        epochs = qat_epochs if qat else 0
        with _epoch_bar(epochs, "QAT", qat and not (quiet or as_json)) as bar:
            result = qz.quantize_checkpoint(ckpt, config, qat_epochs=epochs, qat_lr=qat_lr, name=name,
                                            on_epoch=(lambda log: bar.update(1, log)) if bar else None)
        board = ckpt.extra.get("board")
        plan = tr.plan_for(board["name"], ckpt.config, per_channel) if board else None
        if plan is not None:
            result.qmodel.meta["board"] = {"name": board["name"], "verdict": plan.verdict}
        qmodel.save(result.qmodel, out)
        if save_checkpoint and qat:
            ckpt.model = result.float_model
            tr.save_checkpoint(ckpt, save_checkpoint)
        full = {"model": str(out), "size": _model_size(result.qmodel), **result.qmodel.meta["evaluation"]}
        if report:
            write_report(full, report)
    except (DataError, tr.TrainError, qz.QuantizeError, EvaluateError, qmodel.ModelFormatError, boards.BoardError,
            budget.PlanError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write: {e}") from None
    text = f"{result.comparison.summary()}\nwrote {out}"
    if result.qat:  # the FP32 figures are then the fine-tuned float model's
        text = f"after {len(result.qat.history)} QAT epochs (FP32: the fine-tuned float model)\n{text}"
    if plan is not None:
        text += f"\n{board['name']}: {plan.verdict}"
    _emit(full, as_json, text, quiet)


def _model_size(model: Any) -> dict[str, int]:
    """Weight and bias counts of a QuantizedModel (the planner has the full byte budget)."""
    weights = sum(layer.input_weights.size + layer.hidden_weights.size for layer in model.layers)
    biases = sum(layer.bias.size for layer in model.layers)
    if model.head is not None:
        weights += model.head.weights.size
        biases += model.head.bias.size
    return {"int8_weights": int(weights), "int32_biases": int(biases), "weight_bytes": int(weights + 4 * biases)}


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG: confusion matrices, or forecast vs truth (needs matplotlib).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
def evaluate(checkpoint: Path, model: Path, split: str, plot: Path | None, report: Path | None,
             as_json: bool) -> None:
    """FP32 (checkpoint) against INT8 (quantized model, integer reference) on the held-out windows."""
    from tinylstm import evaluate as ev
    from tinylstm import qmodel
    from tinylstm import train as tr
    from tinylstm.data import DataError

    try:
        ckpt = tr.load_checkpoint(checkpoint)
        q = qmodel.load(model)
        ds = ckpt.dataset()
        comparison = ev.compare(ckpt.model, q, ds, getattr(ds, split), ckpt.extra.get("anomaly_threshold"),
                                q.meta.get("anomaly_threshold"))
        full = {"checkpoint": str(checkpoint), "model": str(model), "split": split, **comparison.to_dict()}
        if report:
            ev.write_report(full, report)
        if plot:
            ev.plot(comparison, ds, ckpt.model, q, plot)
    except (DataError, tr.TrainError, ev.EvaluateError, qmodel.ModelFormatError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write: {e}") from None
    _emit(full, as_json, comparison.summary(), False)


def _size(nbytes: int) -> str:
    """Bytes as B, KB or MB (1024-based), exact when the unit divides them."""
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if nbytes % scale == 0 else f"{value:.1f} {unit}"
    return f"{nbytes} B"


def _counts(emulator: Any) -> str:
    """What an emulator's latency counts are, and for QEMU the cycles per instruction that turn them into time."""
    if emulator.cycles_per_instruction is None:
        return emulator.unit
    estimate = " (estimate)" if emulator.cpi_estimate else ""
    return f"{emulator.unit}, {emulator.cycles_per_instruction:g} cycles each{estimate}"


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the board file) instead of a table.")
def boards(name: str | None, as_json: bool) -> None:
    """List the board catalogue, or show board NAME in full with the source of every figure.

    Emulated boards count latency in cycles (simavr) or instructions (QEMU); a QEMU board's file states the
    cycles per instruction that turn its counts into time for the planner's deadline check, and where that
    figure comes from.
    """
    import json

    from tinylstm.boards import BoardError, list_boards, load_board

    try:
        if name is None:
            catalogue = list_boards()
        else:
            board = load_board(name)
    except BoardError as e:
        raise click.ClickException(str(e)) from None
    if name is None:
        if as_json:
            click.echo(json.dumps([b.to_dict() for b in catalogue], indent=2))
            return
        rows = [("name", "MCU / core", "clock", "RAM", "flash", "emulated", "emulator counts")]
        rows += [(b.name, f"{b.mcu} / {b.core}", f"{b.clock_hz / 1e6:g} MHz", _size(b.ram_bytes),
                  _size(b.flash_bytes), f"{b.emulator.kind} {b.emulator.machine}" if b.emulator else "no",
                  _counts(b.emulator) if b.emulator else "")
                 for b in catalogue]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return
    if as_json:
        click.echo(json.dumps(board.to_dict(), indent=2))
        return
    click.echo(board.describe())


@main.command()
@click.option("--board", "board_name", required=True, help="Board name (see `tinylstm boards`) or board file path.")
@click.option("--input", "input_size", required=True, type=click.IntRange(1, 4096), help="Input features.")
@click.option("--hidden", type=click.IntRange(1, 4096), help="Hidden size of every LSTM layer.")
@click.option("--layers", type=click.IntRange(1, 3), default=1, show_default=True, help="LSTM layers.")
@click.option("--window", type=click.IntRange(1, 100_000), default=1, show_default=True,
              help="Time steps per window.")
@click.option("--outputs", type=click.IntRange(1, 4096), help="Outputs of the dense head (none: no head).")
@click.option("--per-channel", is_flag=True, help="Per-channel (per gate row / per output) scales.")
@click.option("--buffer-window", is_flag=True,
              help="The firmware holds the whole window in RAM (default: samples are streamed one step at a time).")
@click.option("--margin", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Headroom below this share of flash, RAM or the sample period makes the verdict 'tight'.")
@click.option("--max-hidden", is_flag=True,
              help="Print the largest hidden size that fits (and keeps up with --sample-rate) instead.")
@click.option("--variant", type=click.Choice(["reference", "arm_dsp", "avr"]), default=None,
              help="Kernel variant to plan for (default: the board's fastest, the one its firmware builds).")
@_SAMPLE_RATE_OPTION
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Latency measurements for the deadline check, repeatable [default: docs/performance.json]. "
                   "The device allowance that makes the step an upper bound (docs/deadline-allowance.json) applies "
                   "to the default only; with other files the step is an estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plan(board_name: str, input_size: int, hidden: int | None, layers: int, window: int, outputs: int | None,
         per_channel: bool, buffer_window: bool, margin: float, max_hidden: bool, variant: str | None,
         sample_rate: float | None, calibration: tuple[Path, ...], as_json: bool) -> None:
    """Check a model shape against a board's memory and deadline before training it.

    Flash and RAM are planned byte by byte; with --sample-rate, the step time is checked against the sample period.

    The device runs one LSTM step per sample, so every step (the last of a window also runs the dense head) must
    finish within 1 / --sample-rate seconds. The step time is the latency cost model's prediction for the board
    and kernel at the board's clock (QEMU boards: at the board file's cycles per instruction). A board without
    latency measurements gets a warning: its deadline is not checked.

    Exit status: 0 when it fits (or fits tightly), 1 when it does not, 2 for a usage error.
    """
    import json

    from tinylstm import budget, costmodel
    from tinylstm.boards import BoardError, load_board
    from tinylstm.export import ModelShape

    if hidden is None and not max_hidden:
        raise click.UsageError("give --hidden, or --max-hidden to find the largest hidden size that fits")
    try:
        board = load_board(board_name)
    except BoardError as e:
        raise click.BadParameter(str(e), param_hint="--board") from None
    try:
        cost = costmodel.CostModel.from_files(calibration) if calibration else None
    except costmodel.CostModelError as e:
        raise click.BadParameter(str(e), param_hint="--calibration") from None
    shape = ModelShape(input_size=input_size, hidden_sizes=(hidden or 1,) * layers, window=window,
                       outputs=outputs, per_channel=per_channel)
    timing = {"sample_rate_hz": sample_rate, "cost": cost}
    if max_hidden:
        best = budget.max_hidden(board, shape, buffer_window=buffer_window, variant=variant, **timing)
        if best:
            shape = ModelShape(input_size, (best,) * layers, window, outputs, per_channel)
    try:
        result = budget.plan(board, shape, buffer_window=buffer_window, margin=margin, variant=variant, **timing)
    except budget.PlanError as e:
        raise click.UsageError(str(e)) from None
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if max_hidden:
        if as_json:
            click.echo(json.dumps({"max_hidden": best, "plan": result.to_dict()}, indent=2))
        elif best:
            checked = result.deadline and result.deadline.step_seconds is not None
            keeps_up = f" and keeps up with {sample_rate:g} Hz" if checked else ""
            click.echo(f"largest hidden size that fits {board.name}{keeps_up}: {best}\n")
            click.echo(result.describe())
        if not best:
            raise click.ClickException(f"no hidden size fits: {result.summary()}")
        return
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.describe())
    if not result.fits:
        slow = " or a lower --sample-rate" if "time" in result.overflowing else ""
        click.echo(f"error: {result.summary()}; --max-hidden gives the largest hidden size that fits{slow}", err=True)
        raise SystemExit(1)


_VARIANT_OPTION = click.option(
    "--variant", type=click.Choice(["reference", "arm_dsp", "avr"]), default=None,
    help="Kernel variant to build (default: the board's fastest: avr on AVR, arm_dsp on Arm boards with the DSP "
         "extension, else reference).")


def _build_firmware(model_path: Path, board_name: str, out_dir: Path | None, variant: str | None,
                    port: str | None = None) -> Any:
    """Load the model and board, check the plan (and the serial port, if given), then generate and build the
    PlatformIO project while holding its lock; (project, plan, build result)."""
    from tinylstm import firmware
    from tinylstm.boards import BoardError, load_board
    from tinylstm.qmodel import ModelFormatError, load

    try:
        model = load(model_path)
        board = load_board(board_name)
        if board.emulated and port is not None:
            raise firmware.FirmwareError(f"{board.name} is emulated; it gets its own port (drop --port)")
        if port is not None:
            firmware.check_port(port)
        (plan,) = firmware.check_fits(model, board, variant)
        out_dir = out_dir or Path("tinylstm-firmware") / f"{board.name}-{model.digest()}"
        with firmware.project_lock(out_dir):
            existing = (out_dir / firmware.PROJECT_MANIFEST).is_file()
            project = firmware.generate_project(model, board, out_dir, force=existing, variant=variant)
            return project, plan, firmware.build(project)
    except (ModelFormatError, BoardError, firmware.FirmwareError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The quantized model file (.npz).")
@click.option("--board", "board_name", required=True, help="Board name (see `tinylstm boards`).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Project directory (default: tinylstm-firmware/<board>-<model hash>).")
@_VARIANT_OPTION
def build(model_path: Path, board_name: str, out_dir: Path | None, variant: str | None) -> None:
    """Generate the firmware project for a model and board, build it with PlatformIO, and show its memory use."""
    from tinylstm import firmware

    project, plan, result = _build_firmware(model_path, board_name, out_dir, variant)
    flash, ram = firmware.predicted_sizes(plan)
    click.echo(f"built {result.elf} with {result.compiler} ({project.variant} kernel)")
    click.echo(f"{'':6} {'linker':>10} {'planner':>10} {'board':>10}")
    click.echo(f"{'flash':6} {result.sizes.flash:>10,} {flash:>10,} {project.board.flash_bytes:>10,}")
    click.echo(f"{'RAM':6} {result.sizes.ram:>10,} {ram:>10,} {project.board.ram_bytes:>10,}"
               f"   (.data+.bss; the planner also reserves {project.board.overhead.ram['stack']:,} B of stack)")


@main.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The quantized model file (.npz).")
@click.option("--board", "board_name", help="Board name (see `tinylstm boards`).")
@click.option("--port", help="Serial port of a real board (default: PlatformIO's choice).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Project directory (default: tinylstm-firmware/<board>-<model hash>).")
@click.option("--stop", is_flag=True, help="Stop the emulators started by earlier flash commands (of --board only).")
@_VARIANT_OPTION
def flash(model_path: Path | None, board_name: str | None, port: str | None, out_dir: Path | None,
          stop: bool, variant: str | None) -> None:
    """Build and flash a model. An emulated board starts in the background and the serial URL is printed."""
    from tinylstm import firmware
    from tinylstm.boards import BoardError

    if stop:
        try:
            stopped = firmware.stop_emulators(board_name)
        except BoardError as e:
            raise click.ClickException(str(e)) from None
        for emulator in stopped:
            click.echo(f"stopped {emulator.board.name} (pid {emulator.pid})")
        if not stopped:
            click.echo("no emulator started by tinylstm flash is running")
        return
    if model_path is None or board_name is None:
        raise click.UsageError("--model and --board are required (or --stop)")
    project, _, result = _build_firmware(model_path, board_name, out_dir, variant, port)
    try:
        if project.board.emulated:
            running = firmware.running_firmware(project.board, result.elf)
            if running is not None:
                click.echo(f"note: {project.board.name} is already running this firmware (pid {running.pid}, "
                           f"serial port {running.url}); starting another", err=True)
            emulator = firmware.start_emulator(project.board, result.elf, detach=True)
            click.echo(f"{project.board.name} running {result.elf} (pid {emulator.pid})")
            click.echo(f"serial port: {emulator.url}")
            click.echo("stop it with: tinylstm flash --stop")
        else:
            firmware.upload(project, port)
            click.echo(f"flashed {project.board.name}" + (f" on {port}" if port else ""))
    except firmware.FirmwareError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.option("--suite", is_flag=True,
              help="Instead: the kernel benchmark suite (every kernel variant on the emulated boards over the "
                   "standard shapes); writes --json (default performance.json) and the table into --markdown "
                   "(default performance.md).")
@click.option("--cmsis-nn", "cmsis_nn", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --suite: also build CMSIS-NN's arm_lstm_unidirectional_s8 from the CMSIS-NN checkout DIR "
                   "(e.g. a clone at the commit docs/performance.md names) with the same compiler and flags, check "
                   "its outputs against the integer reference and measure it beside the tinylstm kernels. Without "
                   "it the CMSIS-NN column says \"not measured\".")
@click.option("--model", "model_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A quantized model file (.npz); repeat it to benchmark several (e.g. hidden sizes).")
@click.option("--board", "board_name", help="Board name (see `tinylstm boards`).")
@click.option("--port", help="Serial port or URL of the device (a real board, or an emulator already running). "
                             "Without it an emulated board is built and started for each model.")
@click.option("--flash", "flash_first", is_flag=True, help="With --port: build each model and upload it first.")
@click.option("--windows", type=click.IntRange(1), default=50, show_default=True, help="Windows per model.")
@click.option("--source", type=click.Choice(["auto", "data", "seed"]), default="auto", show_default=True,
              help="data: the model's held-out test windows (accuracy included); seed: windows the device "
                   "generates from --seed; auto: data if the model was trained by tinylstm, else seed.")
@click.option("--sample", type=click.Choice(["stratified", "first", "all"]), default="stratified",
              show_default=True,
              help="Which held-out test windows run on the device: stratified: --windows of them drawn with --seed, "
                   "every class in proportion (at least one each), half of an anomaly sample on the labelled "
                   "anomalies (at least one window in each), a forecaster's evenly spaced; first: the first "
                   "--windows; all: the whole test split.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=1, show_default=True,
              help="Seed of the stratified sample, and of the windows the device generates (--source seed).")
@click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds to wait for the device to answer.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report (schema: docs/bench-report.schema.json).")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the Markdown summary.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG: cycles histogram, and cycles per step vs hidden size for several models.")
@_VARIANT_OPTION
def bench(suite: bool, cmsis_nn: Path | None, model_paths: tuple[Path, ...], board_name: str | None,
          port: str | None, flash_first: bool, windows: int, source: str, sample: str, seed: int, timeout: float,
          json_out: Path | None, markdown_out: Path | None, plot_out: Path | None, variant: str | None) -> None:
    """Benchmark models on a board: latency from the device's own counter, every output checked bit for bit
    against the integer reference, and accuracy on held-out data from the device's outputs."""
    from tinylstm import bench as hil_bench
    from tinylstm import firmware, hil, qmodel
    from tinylstm.boards import BoardError, load_board

    if suite:
        if model_paths or board_name:
            raise click.UsageError("--suite measures its own models on the emulated boards: drop --model/--board")
        _bench_suite(json_out or Path("performance.json"), markdown_out or Path("performance.md"), cmsis_nn)
        return
    if cmsis_nn is not None:
        raise click.UsageError("--cmsis-nn goes with --suite")
    if not model_paths or not board_name:
        raise click.UsageError("give --model and --board (or --suite)")
    if flash_first and port is None:
        raise click.UsageError("--flash needs --port (an emulated board without --port is always built and run)")
    try:
        models = [qmodel.load(p) for p in model_paths]
        board = load_board(board_name)
        total = sum(hil_bench.planned_windows(m, windows, source, sample) for m in models)
        with click.progressbar(length=total, label=f"windows on {board.name}", file=sys.stderr) as bar:
            report = hil_bench.run_bench(models, board, port=port, flash=flash_first, windows=windows,
                                         source=source, seed=seed, sample=sample, timeout=timeout,
                                         model_paths=[str(p) for p in model_paths], on_progress=bar.update,
                                         variant=variant)
        text = hil_bench.markdown(report)
        hil_bench.save_outputs(report, text, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)
    except (hil_bench.BenchError, firmware.FirmwareError, hil.HILError, qmodel.ModelFormatError, BoardError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write: {e}") from None
    click.echo(text, nl=False)
    mismatched = hil_bench.mismatches(report)
    if mismatched:
        raise click.ClickException(mismatched)


def _bench_suite(json_out: Path, markdown_out: Path, cmsis_nn: Path | None) -> None:
    from tinylstm import firmware, perf

    with tempfile.TemporaryDirectory(prefix="tinylstm-suite-") as work:
        try:
            result = perf.run_suite(Path(work), firmware.cache_dir() / "bench",
                                    log=lambda line: click.echo(line, err=True), cmsis_nn=cmsis_nn)
            perf.write_report(result, json_out, markdown_out)
        except perf.PerfError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"cannot write: {e}") from None
    click.echo(perf.markdown_table(result))


def _run_pipeline(config: Any, out_dir: Path) -> None:
    from tinylstm import pipeline

    try:
        result = pipeline.run(config, out_dir, pipeline.ConsoleReporter())
    except pipeline.PipelineError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out_dir}: {e}") from None
    click.echo(pipeline.summary_text(result))


@main.command()
@click.option("--dataset", default="basic_motions", show_default=True,
              type=click.Choice(["basic_motions", "taylor_demand", "kdd_tsad_135"]), help="A bundled dataset.")
@click.option("--board", "board_name", default="uno_sim", show_default=True,
              help="An emulated board (uno_sim, mps2_an386, mps2_an500, netduinoplus2); see `tinylstm boards`.")
@click.option("--out", "out_dir", default="tinylstm-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output directory for every artefact.")
def demo(dataset: str, board_name: str, out_dir: Path) -> None:
    """The whole journey on a bundled dataset: plan, train, quantize, build, flash the emulator, benchmark, report."""
    from tinylstm import pipeline
    from tinylstm.boards import BoardError, load_board

    try:
        if not load_board(board_name).emulated:
            raise click.BadParameter(f"{board_name} is a real board; the demo runs on an emulated one "
                                     "(use `tinylstm run` with [bench] port for real hardware)", param_hint="--board")
        config = pipeline.demo_config(dataset, board_name, out_dir)
    except (BoardError, pipeline.PipelineError) as e:
        raise click.BadParameter(str(e), param_hint="--board") from None
    _run_pipeline(config, out_dir)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (default: tinylstm-out/<config name> beside the config).")
def run(config_path: Path, out_dir: Path | None) -> None:
    """Run a project described by a TOML config; stages whose inputs did not change are skipped."""
    from tinylstm import pipeline

    try:
        config = pipeline.load_config(config_path)
    except pipeline.PipelineError as e:
        raise click.ClickException(str(e)) from None
    _run_pipeline(config, out_dir or config_path.parent / "tinylstm-out" / config_path.stem)


@main.command()
@click.argument("path", default="tinylstm.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Your CSV or NPZ. A CSV's columns are listed, its numeric columns other than the label become "
                   "features, and columns that look like ids (subject, rec, session, user, ...; or whole numbers "
                   "constant over long runs) are left out with a warning. An NPZ's window length is written.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, data_path: Path | None, force: bool) -> None:
    """Write a commented example project config (default: tinylstm.toml)."""
    import os

    from tinylstm import pipeline
    from tinylstm.data import DataError, inspect_source

    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; use --force to overwrite it")
    source = None
    if data_path is not None and data_path.suffix.lower() in (".csv", ".npz"):
        try:
            source = inspect_source(data_path)
        except DataError as e:
            raise click.ClickException(str(e)) from None
    if source is not None and source.columns:
        roles = {**{c: "feature" for c in source.features}, **{c: "id?" for c in source.ids}}
        if source.label:
            roles[source.label] = "label"
        click.echo(f"columns in {data_path.name}: " +
                   ", ".join(f"{c} ({roles.get(c, 'not numeric')})" for c in source.columns))
        if source.ids:
            looks = "look like ids" if len(source.ids) > 1 else "looks like an id"
            click.echo(f"warning: {', '.join(source.ids)} {looks} of recordings or subjects; "
                       "left out of features: set [data] group (subjects) or recording to it, or add it to "
                       "features", err=True)
    data = os.path.relpath(data_path.resolve(), path.resolve().parent) if data_path else None
    text = pipeline.example_config(path.name, data, source)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e}") from None
    click.echo(f"wrote {path}; edit it, then: tinylstm run {path}")


@main.command()
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, exists=True, path_type=Path))
def report(out_dir: Path) -> None:
    """Write DIR/report.html from the artefacts of a `tinylstm demo` or `tinylstm run` in DIR."""
    from tinylstm.report import ReportError, write_report

    try:
        path = write_report(out_dir)
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write the report in {out_dir}: {e}") from None
    click.echo(path)


def _export_executorch(model_path: Path, out_dir: Path, quantize: str | None, force: bool) -> None:
    from tinylstm.data import DataError
    from tinylstm.executorch_export import ExecuTorchError, export_executorch, load_float_checkpoint
    from tinylstm.quantize import QuantizeError
    from tinylstm.train import TrainError

    try:
        result = export_executorch(load_float_checkpoint(model_path), out_dir, quantize=quantize, force=force,
                                   progress=lambda message: click.echo(message, err=True))
    except (ExecuTorchError, TrainError, DataError, QuantizeError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out_dir}: {e}") from None
    click.echo(result.summary())


@main.command("verify-bundle")
@click.argument("bundle_path", metavar="FILE.bpte", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance per output value.")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Relative tolerance per output value.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--unverified", is_flag=True,
              help="Load the file without checking it against the SHA-256 in the model.json beside it (for a "
                   ".bpte without its sidecar). A damaged file may then give wrong results or crash the runtime.")
def verify_bundle(bundle_path: Path, atol: float, rtol: float, as_json: bool, unverified: bool) -> None:
    """Run every test case of an ExecuTorch bundle in the ExecuTorch runtime on this host; exit 1 on a failure.

    The file is loaded only once its SHA-256 matches the one that model.json, written beside it by
    `tinylstm export --format executorch`, records: a modified or corrupted file, or one without its model.json,
    is refused with a one-line error.
    """
    import json

    from tinylstm.executorch_export import ExecuTorchError
    from tinylstm.executorch_export import verify_bundle as verify

    try:
        report = verify(bundle_path, atol=atol, rtol=rtol, unverified=unverified)
    except ExecuTorchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())
    if not report.passed:
        raise click.exceptions.Exit(1)


def _list(text: str | None, kind: type, option: str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None


@main.command()
@click.argument("data", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", help="A bundled demo set instead of a file: basic_motions, taylor_demand, kdd_tsad_135.")
@click.option("--task", type=click.Choice(["classification", "forecasting", "anomaly"]),
              help="Required with a data file.")
@click.option("--features", help="CSV feature columns, comma-separated.")
@click.option("--target", help="Forecasting/anomaly: the CSV column to predict.")
@click.option("--label", help="Classification: the CSV label column.")
@_FILLNA_OPTION
@_split_options
@click.option("--board", required=True, help="The board every candidate must fit (see `tinylstm boards`).")
@_SAMPLE_RATE_OPTION
@click.option("--hidden", help="Hidden sizes to try, comma-separated [default: 4,6,8,...,128].")
@click.option("--layers", default="1,2,3", show_default=True, help="Layer counts to try.")
@click.option("--window", help="Window lengths to try (series data), comma-separated; the first is the default.")
@click.option("--stride", help="Strides to try (series data), comma-separated.")
@click.option("--lr", help="Learning rates to try, comma-separated [default: the recipe's].")
@click.option("--epochs", type=click.IntRange(1), help="Epochs per trial [default: the recipe's].")
@click.option("--budget-trials", type=click.IntRange(1), help="Train at most N candidates (a seeded sample).")
@click.option("--objective", type=click.Choice(["accuracy", "latency", "balanced"]), default="accuracy",
              show_default=True, help="Which model of the Pareto front to recommend.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Kernel benchmark results for the latency model, repeatable [default: docs/performance.json].")
@click.option("--variant", type=click.Choice(["reference", "arm_dsp", "avr"]), default=None,
              help="The kernel variant to plan and cost (default: the board's fastest, which `tinylstm run` builds).")
@click.option("--address", help="Attach to this Ray cluster (e.g. ray://head:10001 or auto) instead of a local one.")
@click.option("--cpus", type=click.IntRange(1), default=2, show_default=True, help="CPUs of the local Ray instance.")
@click.option("--retries", type=click.IntRange(0), default=1, show_default=True,
              help="Reruns of a trial whose worker dies.")
@click.option("--no-early-stop", is_flag=True, help="Run every trial to the end (no ASHA).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the recommended project (retrain, build, benchmark) to confirm it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training and sampling seed.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The search directory: trial records, results.json, recommended.toml.")
@click.option("--resume", is_flag=True, help="Continue the search in --out, running only unfinished trials.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of the report.")
def search(data: Path | None, dataset: str | None, task: str | None, features: str | None, target: str | None,
           label: str | None, fillna: str, recording: str | None, group: str | None, split: str, class_weight: str,
           board: str, sample_rate: float | None, hidden: str | None, layers: str, window: str | None,
           stride: str | None, lr: str | None, epochs: int | None, budget_trials: int | None, objective: str,
           calibration: tuple[Path, ...], variant: str | None, address: str | None, cpus: int, retries: int,
           no_early_stop: bool, verify: bool, seed: int, out_dir: Path, resume: bool, as_json: bool) -> None:
    """Find the best LSTM that fits the board: prune with the planner, train the rest on Ray, recommend one."""
    import json

    try:
        from tinylstm import search as sr
    except ImportError as e:
        raise click.ClickException(f"the search needs Ray Tune ({e}): pip install 'tinylstm[search]'") from None
    if (data is None) == (dataset is None):
        raise click.ClickException("give either a data file or --dataset")
    if data is not None and task is None:
        raise click.ClickException("--task is required with a data file")
    windows, strides = _list(window, int, "--window"), _list(stride, int, "--stride")
    lrs = _list(lr, float, "--lr")
    space = sr.SearchSpace(hidden=_list(hidden, int, "--hidden") or sr.DEFAULT_HIDDEN,
                           layers=_list(layers, int, "--layers"), windows=windows, strides=strides, lrs=lrs)
    if min(space.hidden) < 1 or not space.layers or not set(space.layers) <= {1, 2, 3} or \
            min(windows or [1]) < 1 or min(strides or [1]) < 1 or min(lrs or [1]) <= 0:
        raise click.ClickException("sizes, windows and strides must be >= 1, layers 1 to 3, learning rates > 0")
    project = sr.project_sections(
        dataset, str(data.resolve()) if data else None,
        data={"features": features.split(",") if features else None, "window": windows[0] if windows else None,
              "stride": strides[0] if strides else None, "seed": seed, "fillna": fillna, "recording": recording,
              "group": group, "split": split, "sample_rate_hz": sample_rate},
        task={"kind": task, "label": label, "target": target},
        train={"epochs": epochs, "seed": seed, "class_weight": class_weight})
    settings = sr.SearchSettings(board=board, project=project, space=space, objective=objective,
                                 budget_trials=budget_trials, seed=seed, early_stop=not no_early_stop, retries=retries,
                                 calibration=calibration or (sr.DEFAULT_CALIBRATION,), variant=variant)
    try:
        result = sr.search(settings, out_dir, address=address, resume=resume, verify=verify, num_cpus=cpus,
                           progress=sr.Progress() if as_json else sr.ConsoleProgress(objective))
    except sr.SearchError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; the finished trials are recorded in {out_dir}: continue with "
                                   "the same command and --resume") from None
    click.echo(json.dumps(_strict_json(result.summary), indent=2) if as_json else sr.summary_text(result))
    if result.summary["partial"]:
        raise click.ClickException(f"the search did not finish ({result.summary['unfinished']} trials unfinished, "
                                   f"{result.summary['crashed']} lost): continue with the same command and --resume")
    if result.recommended is None or (result.verification is not None and not result.verification["ok"]):
        raise click.exceptions.Exit(1)


if __name__ == "__main__":
    main()
