"""Benchmark quantized models on a board that already runs the tinylstm HIL firmware, reached by serial URL.

    python hil/bench.py --port /dev/ttyACM0 --board uno --model model.npz [--windows 100] [--json out.json]

The port is any pyserial URL: /dev/ttyUSB0, COM3, a pty path, or socket://HOST:PORT. Each model is selected
on the device by its hash; every output is checked bit for bit against the integer reference, and the
latency comes from the device's own counter. To build and flash first, add --flash (real boards), or use
`tinylstm bench`, which also builds and starts emulated boards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tinylstm import bench, firmware, hil, qmodel
from tinylstm.boards import BoardError, load_board
from tinylstm.sampling import SAMPLES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--port", required=True, help="Serial port or URL of the device (/dev/ttyACM0, COM3, socket://...).")
@click.option("--board", "board_name", required=True, help="Board name (see `tinylstm boards`).")
@click.option("--model", "model_paths", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Quantized model (.npz); repeatable.")
@click.option("--flash", "flash_first", is_flag=True, help="Build each model and upload it to the board first.")
@click.option("--baud", type=click.IntRange(1), help="Baud rate (default: the board's HIL firmware rate).")
@click.option("--windows", type=click.IntRange(1), default=50, show_default=True, help="Windows per model.")
@click.option("--source", type=click.Choice(bench.SOURCES), default="auto", show_default=True,
              help="data: held-out test windows; seed: windows generated on the device; auto: data if available.")
@click.option("--sample", type=click.Choice(SAMPLES), default="stratified", show_default=True,
              help="Which held-out windows: stratified (seeded, every class, every labelled anomaly), first, all.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=bench.DEFAULT_SEED, show_default=True,
              help="Seed of the stratified sample, and of the windows generated on the device.")
@click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds to wait for each reply.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report.")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the Markdown summary.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG.")
def main(port, board_name, model_paths, flash_first, baud, windows, source, sample, seed, timeout, json_out,
         markdown_out, plot_out):
    """Benchmark models on the device at PORT: latency, bit-exactness and held-out accuracy."""
    try:
        models = [qmodel.load(p) for p in model_paths]
        board = load_board(board_name)
        total = sum(bench.planned_windows(m, windows, source, sample) for m in models)
        with click.progressbar(length=total, label="windows", file=sys.stderr) as bar:
            report = bench.run_bench(models, board, port=port, flash=flash_first, windows=windows, source=source,
                                     seed=seed, sample=sample, timeout=timeout, baud=baud,
                                     model_paths=[str(p) for p in model_paths], on_progress=bar.update)
        text = bench.markdown(report)
        bench.save_outputs(report, text, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)
    except (bench.BenchError, firmware.FirmwareError, hil.HILError, qmodel.ModelFormatError, BoardError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text, nl=False)
    mismatched = bench.mismatches(report)
    if mismatched:
        raise click.ClickException(mismatched)


if __name__ == "__main__":
    main()
