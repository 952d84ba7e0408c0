"""Re-measure the planner's figures of the board files with the local compilers and write them back.

- code (``--code``): every board's ``code`` record, for each kernel variant it records, from linked programs
  (tests/test_budget.py: ``measure_code``; boards sharing a compiler and target flags share the figures);
- overhead: every emulated board's framework and HIL figures (``tinylstm.firmware.measure_overhead``), which are
  taken net of the reference kernel's code figure, so they are measured after the code.

Run it after any change to the kernels, the generated model code or the HIL firmware, then check the bound with
hil/planner_vs_linker.py (and tests/test_planner_bound.py):

    nice python hil/measure_boards.py --code [--board uno_sim ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_budget import COMPILER, measure_code  # noqa: E402
from tinylstm import firmware  # noqa: E402
from tinylstm.boards import Board, list_boards  # noqa: E402

CODE_KEYS = ("kernel_text_bytes", "dense_text_bytes", "model_text_base", "model_text_per_layer")


def update(board: Board, change: dict) -> None:
    """Apply ``change`` ({dotted.key: value}) to the board file, keeping its layout."""
    data = json.loads(board.path.read_text())
    for key, value in change.items():
        *parents, last = key.split(".")
        node = data
        for parent in parents:
            node = node[parent]
        node[last] = value
    board.path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def measure_codes(boards: list[Board], work: Path) -> None:
    targets: dict[tuple[str, tuple[str, ...]], list[Board]] = {}
    for board in boards:
        if board.arch in COMPILER and not board.code.estimate:
            targets.setdefault((COMPILER[board.arch], board.gcc_target_flags), []).append(board)
    for (cc, flags), members in targets.items():
        variants = {"reference"} | {v for b in members for v in b.code.variants}
        for variant in sorted(variants):
            out = work / f"code-{'-'.join(f.strip('-') for f in flags)}-{variant}"
            out.mkdir(parents=True)
            measured = measure_code(cc, flags, out, variant)
            for board in members:
                if board.code.for_variant(variant) is None:
                    continue
                prefix = "code." if variant == "reference" else f"code.variants.{variant}."
                update(board, {prefix + key: measured[key] for key in CODE_KEYS})
                print(f"{board.name} {variant}: {', '.join(f'{k} {measured[k]}' for k in CODE_KEYS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", action="append", help="only these boards (default: all)")
    parser.add_argument("--code", action="store_true", help="re-measure the code figures too")
    args = parser.parse_args(argv)
    boards = [b for b in list_boards() if args.board is None or b.name in args.board]
    with tempfile.TemporaryDirectory(prefix="tinylstm-measure-") as tmp:
        if args.code:
            measure_codes(boards, Path(tmp))
        for board in list_boards():  # reloaded: the overhead is measured net of the new code figures
            if board.emulator is None or (args.board and board.name not in args.board):
                continue
            o = firmware.measure_overhead(board, Path(tmp) / f"overhead-{board.name}")
            update(board, {"overhead.flash.framework": o.framework_flash, "overhead.flash.hil": o.hil_flash,
                           "overhead.ram.framework": o.framework_ram, "overhead.ram.hil": o.hil_ram})
            print(f"{board.name} overhead ({o.compiler}): flash framework {o.framework_flash}, hil {o.hil_flash}; "
                  f"RAM framework {o.framework_ram}, hil {o.hil_ram}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
