"""The planner's step time against the device, on random models built into the real HIL firmware.

For uno_sim (avr and reference kernels) and mps2_an386 (arm_dsp and reference), draws --models random models the
planner passes, builds each one's HIL firmware as `tinylstm build` does, runs it in the emulator and measures the
longest sample period of the deployed firmware: the longest step with the dense head, plus the reset that starts
the next window (tests/deadline_bound.py says how). Two minimal models (input 1, hidden 1, a head of 1 and of 8
outputs) give the firmware's fixed cost per sample and per output beyond the cost model; the random models give
the share of the cost model that covers the rest. Prints every model against the cost model, and per board and
kernel the allowance and the largest device / bound ratio, which must not exceed 1.

    nice python hil/deadline_vs_device.py [--models 30] [--seed N] [--write] [--json PATH]

--write stores the allowances in docs/deadline-allowance.json, which the planner adds to the cost model; without
it, the models are checked against the stored allowances.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.deadline_bound import PAIRS, Case, Result, allowance, measure_all, minimal_cases, random_case  # noqa: E402
from tinylstm import costmodel  # noqa: E402
from tinylstm.boards import load_board  # noqa: E402


def cases(models: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    found = []
    for board, variant in PAIRS:
        found += minimal_cases(load_board(board), variant)
        found += [random_case(rng, load_board(board), variant, int(rng.integers(2**31))) for _ in range(models)]
    return found


def summary(results: list[Result], stored: dict[tuple[str, str], costmodel.Allowance], write: bool) -> list[dict]:
    """Per board and kernel: the allowance these results call for, and every result against the allowance in force
    (the new one with --write, else the stored one)."""
    rows = []
    for board, variant in PAIRS:
        mine = [r for r in results if (r.case.board.name, r.case.variant) == (board, variant)]
        found = allowance(board, variant, (mine[0], mine[1]), mine[2:])
        used = found if write else stored.get((board, variant))
        ratios = [r.ratio(r.case.cost_model) for r in mine[2:]]
        bounds = [r.ratio(used.bound(r.case.shape, r.case.cost_model) if used else r.case.cost_model)
                  for r in mine]
        rows.append({"board": board, "variant": variant, "unit": mine[0].unit, "models": len(ratios),
                     "min_ratio": round(min(ratios), 4), "max_ratio": round(max(ratios), 4),
                     "share": found.share, "per_sample": found.per_sample, "per_output": found.per_output,
                     "checked_against": "new" if write else "stored" if used else "none",
                     "max_of_bound": round(max(bounds), 4)})
    return rows


def table(results: list[Result], rows: list[dict]) -> str:
    lines = ["| model | cost model | device: longest step + head + reset (reset) | device / cost model "
             "| BENCH worst window / steps |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.case.describe()} | {r.case.cost_model:,.0f} | {r.longest_sample:,} ({r.reset:,}) "
                     f"{r.unit} | {r.ratio(r.case.cost_model):.3f} | {r.worst_window_step:,.0f} |")
    lines += ["", "| board | kernel | random models | device / cost model, min / max | allowance: share, per sample, "
              "per output | device / bound, max |", "|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s['board']} | {s['variant']} | {s['models']} | {s['min_ratio']:.3f} / "
                     f"{s['max_ratio']:.3f} | {s['share']:.0%}, {s['per_sample']:,} {s['unit']}, "
                     f"{s['per_output']:,} {s['unit']} | {s['max_of_bound']:.3f} ({s['checked_against']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=30, help="random models per board and kernel")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--write", action="store_true",
                        help=f"store the allowances in {costmodel.DEFAULT_ALLOWANCE.relative_to(REPO)}")
    parser.add_argument("--json", type=Path, help="write the summary and every result as JSON")
    parser.add_argument("--work", type=Path, help="build directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.models < 1:
        parser.error("--models must be at least 1")
    stored = costmodel.load_allowances() if costmodel.DEFAULT_ALLOWANCE.is_file() else {}
    results = measure_all(cases(args.models, args.seed), args.work, args.seed,
                          log=lambda line: print(line, file=sys.stderr))
    rows = summary(results, stored, args.write)
    print(table(results, rows))
    if args.write:
        costmodel.write_allowances(rows, f"nice python hil/deadline_vs_device.py --models {args.models} "
                                         f"--seed {args.seed} --write")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "summary": rows, "results": [
            {"case": r.case.describe(), "unit": r.unit, "cost_model": r.case.cost_model,
             "longest_step": r.longest_step, "reset": r.reset, "worst_window_step": r.worst_window_step}
            for r in results]}, indent=2) + "\n")
    over = [row for row in rows if row["max_of_bound"] > 1]
    for row in over:
        print(f"fault: {row['board']} {row['variant']}: a device sample {row['max_of_bound']:.3f}x the "
              f"{row['checked_against']} bound", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
