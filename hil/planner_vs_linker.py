"""The planner's flash and RAM against the linker's, on random shapes built into the real HIL firmware.

For every emulated board and each kernel it has (reference, and avr or arm_dsp), draws --shapes random shapes
the planner passes (1 to 3 layers, per-channel or per-tensor, with or without a dense head, the window streamed or
buffered), plus on uno_sim --boundary shapes the planner passes with 0 to 16 bytes of flash headroom and the
shape of issue 14 (input 3, hidden 72, window 20, outputs 8). Each is built with PlatformIO, offline, exactly as
`tinylstm build` does. Prints, per board and kernel, the smallest and largest plan - linker for flash and RAM;
every shape must link and every difference must lie in [0, max(64 B, 1%)].

    nice python hil/planner_vs_linker.py [--shapes 30] [--boundary 10] [--seed N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.linker_bound import (  # noqa: E402
    EMULATED,
    Case,
    Result,
    boundary_cases,
    build_case,
    random_case,
    tolerance,  # noqa: E402
)
from tests.random_models import random_model  # noqa: E402
from tinylstm import export  # noqa: E402
from tinylstm.boards import load_board  # noqa: E402

REGRESSION = {"input_size": 3, "hidden_sizes": (72,), "window": 20, "outputs": 8}


def cases(shapes: int, boundary: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    found = []
    for name in EMULATED:
        board = load_board(name)
        for variant in ("reference", export.default_variant(board.arch, board.dsp)):
            found += [random_case(rng, board, variant, int(rng.integers(2**31))) for _ in range(shapes)]
            if board.arch == "avr":
                found += boundary_cases(board, variant, boundary, rng)
                found.append(Case(board, variant, random_model(14, per_channel=False, **REGRESSION), False,
                                  "regression"))
    return found


def faults(result: Result) -> list[str]:
    """What is wrong with one result: a shape the plan passes that does not link, or a difference out of range."""
    fits = result.case.plan.fits
    if result.linked is None:
        return [f"{result.case.describe()}: planned to fit but did not link: {result.error}"] if fits else []
    out = []
    for region, slack, linked in zip(("flash", "RAM"), result.slack, result.linked, strict=True):
        if not 0 <= slack <= tolerance(linked):
            out.append(f"{result.case.describe()}: {region} plan - linker = {slack}")
    return out


def summary(results: list[Result]) -> list[dict]:
    rows = []
    for name in EMULATED:
        for variant in export.VARIANTS:
            linked = [r for r in results if r.case.board.name == name and r.case.variant == variant and r.linked]
            if not linked:
                continue
            flash = [r.slack[0] for r in linked]
            ram = [r.slack[1] for r in linked]
            refused = [r for r in results if r.case.board.name == name and r.case.variant == variant
                       and not r.case.plan.fits]
            rows.append({"board": name, "variant": variant, "shapes": len(linked) + len(refused),
                         "linked": len(linked), "refused_by_plan": len(refused),
                         "boundary": sum(r.case.label == "boundary" for r in linked),
                         "flash_min": min(flash), "flash_max": max(flash), "ram_min": min(ram), "ram_max": max(ram)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| board | kernel | shapes (boundary) | flash plan - linker, min / max B "
             "| RAM plan - linker, min / max B |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['board']} | {r['variant']} | {r['linked']} ({r['boundary']}) | {r['flash_min']} / "
                     f"{r['flash_max']} | {r['ram_min']} / {r['ram_max']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=30, help="random shapes per board and kernel")
    parser.add_argument("--boundary", type=int, default=10, help="boundary shapes per kernel on uno_sim")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--json", type=Path, help="write the summary and every result as JSON")
    parser.add_argument("--work", type=Path, help="build directory (default: a temporary one)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="tinylstm-bound-") as tmp:
        work = args.work or Path(tmp)
        todo = cases(args.shapes, args.boundary, args.seed)
        for n, case in enumerate(todo):
            result = build_case(case, work / f"{case.board.name}-{case.variant}")
            results.append(result)
            slack = result.slack if result.linked else "no link"
            print(f"[{n + 1}/{len(todo)}] {case.describe()}: plan {result.planned}, linker {result.linked}, "
                  f"plan - linker {slack}", file=sys.stderr)
    rows = summary(results)
    problems = [f for r in results for f in faults(r)]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "summary": rows, "faults": problems, "results": [
            {"case": r.case.describe(), "fits": r.case.plan.fits, "planned": r.planned, "linked": r.linked}
            for r in results]}, indent=2) + "\n")
    for problem in problems:
        print(f"fault: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
