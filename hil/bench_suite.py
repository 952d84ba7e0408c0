"""The kernel benchmark suite: every kernel variant on the emulated boards (QEMU mps2-an386 instructions, simavr
ATmega328P cycles) over the shapes (3, 16), (6, 32), (12, 64), (32, 128) and the demo shape (6, 32, window 100).

Every figure is checked bit for bit against the integer reference first. Writes docs/performance.json and the
table in docs/performance.md (between its bench-suite markers).

With --cmsis-nn DIR (a CMSIS-NN checkout), CMSIS-NN's arm_lstm_unidirectional_s8 is built from DIR with the same
compiler and flags, checked against the integer reference and measured beside the kernels.

    python hil/bench_suite.py [--work DIR] [--json PATH] [--markdown PATH] [--cmsis-nn DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinylstm import perf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="build directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "performance.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--cmsis-nn", type=Path, metavar="DIR", help="a CMSIS-NN checkout to measure beside")
    args = parser.parse_args(argv)
    cache = REPO / ".cache" / "bench"
    with tempfile.TemporaryDirectory(prefix="tinylstm-bench-") as tmp:
        work = args.work or Path(tmp)
        try:
            result = perf.run_suite(work, cache, cmsis_nn=args.cmsis_nn)
            perf.write_report(result, args.json, args.markdown)
        except perf.PerfError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(perf.markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
