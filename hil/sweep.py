"""What each hidden size costs on one board: cycles, RAM and flash, measured on the device.

    python hil/sweep.py --board uno_sim --hidden 4,8,16,32 --input 6 --window 16 [--out sweep.md]
    python hil/sweep.py --board nano33ble --port /dev/ttyACM0 --hidden 16,32,64 --input 3 --window 50

For each size a model with the given shape (random weights: the cost does not depend on training) is built
into its own firmware. An emulated board runs it in its emulator; a real board is flashed on --port. Windows
are generated on the device from a seed and every output is checked against the integer reference. The
table gives the linker's flash and RAM next to the planner's prediction, and the device's counts per window
and per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tinylstm import bench, firmware, hil
from tinylstm.boards import BoardError, load_board


def _sizes(text):
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of sizes") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("give at least one hidden size, each >= 1")
    return sizes


def table(report):
    """The sweep table in Markdown: one row per hidden size."""
    unit = report["board"]["unit"]
    lines = [f"# Hidden-size sweep on {report['board']['name']}", "",
             f"Unit: {unit} ({report['models'][0]['latency']['note']}). Flash = .text + .data, "
             "RAM = .data + .bss from the linker; planner figures in brackets.", "",
             f"| hidden | flash B | RAM B | {unit}/window (median) | {unit}/step (median) | µs/step | "
             "windows | mismatches |", "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        fw, lat = m["firmware"], m["latency"]
        us = f"{lat['us_per_step']['median']:,.1f}" if lat["us_per_step"] else "n/a"
        lines.append(f"| {'x'.join(map(str, m['hidden_sizes']))} | {fw['flash']:,} ({fw['planned_flash']:,}) "
                     f"| {fw['ram']:,} ({fw['planned_ram']:,}) | {lat['per_window']['median']:,.0f} "
                     f"| {lat['per_step']['median']:,.0f} | {us} "
                     f"| {m['windows']} | {m['mismatches']} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--board", "board_name", required=True, help="Board name (see `tinylstm boards`).")
@click.option("--hidden", required=True, help="Hidden sizes to measure, comma-separated (e.g. 4,8,16,32).")
@click.option("--input", "input_size", type=click.IntRange(1), default=6, show_default=True, help="Input features.")
@click.option("--window", type=click.IntRange(1), default=16, show_default=True, help="Time steps per window.")
@click.option("--outputs", type=click.IntRange(1), default=4, show_default=True, help="Outputs of the dense head.")
@click.option("--layers", type=click.IntRange(1, 3), default=1, show_default=True, help="LSTM layers.")
@click.option("--port", help="Serial port or URL of a real board (each size is uploaded to it).")
@click.option("--baud", type=click.IntRange(1), help="Baud rate (default: the board's HIL firmware rate).")
@click.option("--windows", type=click.IntRange(1), default=20, show_default=True, help="Windows per size.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=bench.DEFAULT_SEED, show_default=True)
@click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="Write the Markdown table.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the benchmark report (docs/bench-report.schema.json).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG: cycles histogram and cycles per step vs hidden size.")
def main(board_name, hidden, input_size, window, outputs, layers, port, baud, windows, seed, timeout, out, json_out,
         plot_out):
    """Benchmark several hidden sizes on one board and write the table of cycles, RAM and flash per size."""
    sizes = _sizes(hidden)
    try:
        board = load_board(board_name)
        if board.emulator is None and port is None:
            raise click.UsageError(f"{board.name} is a real board: give --port")
        models = [bench.synthetic_model(input_size, [h] * layers, window, outputs, seed=h) for h in sizes]
        firmware.check_fits(models, board)  # every size, before the first build
        with click.progressbar(length=windows * len(models), label=f"sizes on {board.name}", file=sys.stderr) as bar:
            report = bench.run_bench(models, board, port=port, flash=port is not None, windows=windows,
                                     source="seed", seed=seed, timeout=timeout, baud=baud, on_progress=bar.update)
        text = table(report)
        bench.save_outputs(report, text, json_out=json_out, markdown_out=out, plot_out=plot_out)
    except (bench.BenchError, firmware.FirmwareError, hil.HILError, BoardError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text, nl=False)
    mismatched = bench.mismatches(report)
    if mismatched:
        raise click.ClickException(mismatched)


if __name__ == "__main__":
    main()
