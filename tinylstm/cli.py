"""The tinylstm command line: a thin layer that parses, calls the library, and prints."""

from __future__ import annotations

import click

from tinylstm import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinylstm")
def main() -> None:
    """tinylstm: train a small LSTM on time-series data, quantize it to int8, and run it on a microcontroller."""


if __name__ == "__main__":
    main()
