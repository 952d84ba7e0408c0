"""The planner against the linker: random model shapes built into the real HIL firmware of an emulated board,
with the plan's flash and RAM next to the linker's. Shared by tests/test_planner_bound.py and
hil/planner_vs_linker.py.

A plan with the window buffered on the device is checked against the HIL firmware plus the buffer it plans: one
more source file defines ``hil_window[window * input]``, kept by the linker (``-Wl,--undefined``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tests.random_models import random_model
from tinylstm import budget, firmware
from tinylstm.boards import Board
from tinylstm.export import ModelShape
from tinylstm.qmodel import QuantizedModel

EMULATED = ("uno_sim", "mps2_an386", "mps2_an500", "netduinoplus2")
LARGEST_HIDDEN = {"avr": 64, "arm": 128}
BOUNDARY_HEADROOM = 16  # bytes of flash headroom at most for a boundary shape
WINDOW_SOURCE = """/* The input window, buffered on the device (what the plan's buffer_window counts). */
#include <stdint.h>
#include "{prefix}.h"
int8_t hil_window[{PREFIX}_WINDOW * {PREFIX}_INPUT_SIZE];
"""


@dataclass(frozen=True)
class Case:
    """One shape on one board with one kernel, and how the firmware keeps the window."""

    board: Board
    variant: str
    model: QuantizedModel
    buffer_window: bool
    label: str  # "random", "boundary" or "regression"

    @property
    def plan(self) -> budget.Plan:
        return budget.plan(self.board, ModelShape.from_model(self.model), buffer_window=self.buffer_window,
                           variant=self.variant)

    def describe(self) -> str:
        shape = ModelShape.from_model(self.model)
        return (f"{self.board.name}/{self.variant} {self.label}: input {shape.input_size}, hidden "
                f"{list(shape.hidden_sizes)}, window {shape.window}"
                f"{' buffered' if self.buffer_window else ''}, outputs {shape.outputs}"
                f"{', per-channel' if shape.per_channel else ''}")


@dataclass(frozen=True)
class Result:
    case: Case
    planned: tuple[int, int]  # (flash, RAM) as the linker counts them (firmware.predicted_sizes)
    linked: tuple[int, int] | None  # None: the firmware did not link
    error: str = ""

    @property
    def slack(self) -> tuple[int, int]:
        """Plan less linker, for flash and RAM."""
        return self.planned[0] - self.linked[0], self.planned[1] - self.linked[1]


def tolerance(linked: int) -> int:
    """How far above the linker the plan may be: 1% or 64 bytes, whichever is larger."""
    return max(64, linked // 100)


def random_case(rng: np.random.Generator, board: Board, variant: str, seed: int) -> Case:
    """A random shape that the planner says fits: 1 to 3 layers, per-channel or per-tensor scales, with or without
    a dense head, the window streamed or buffered."""
    largest = LARGEST_HIDDEN[board.arch]
    while True:
        layers = int(rng.integers(1, 4))
        hidden = tuple(int(rng.integers(1, largest + 1)) for _ in range(layers))
        outputs = int(rng.integers(1, 17)) if rng.random() < 0.7 else None
        model = random_model(seed, input_size=int(rng.integers(1, 33)), hidden_sizes=hidden, outputs=outputs,
                             window=int(rng.integers(1, 201)), per_channel=bool(rng.random() < 0.5))
        case = Case(board, variant, model, bool(rng.random() < 0.5), "random")
        if case.plan.fits:
            return case
        seed += 10_000


def boundary_cases(board: Board, variant: str, count: int, rng: np.random.Generator) -> list[Case]:
    """``count`` shapes the planner passes with 0 to BOUNDARY_HEADROOM bytes of flash headroom: near the largest
    hidden size, over inputs, outputs, layers and scale kinds."""
    found = []
    for layers in (1, 2):
        for per_channel in (False, True):
            for outputs in (None, *range(1, 17)):
                base = ModelShape(1, (1,) * layers, 20, outputs, per_channel)
                for input_size in range(1, 13):
                    shape = replace(base, input_size=input_size)
                    top = budget.max_hidden(board, shape, variant=variant)
                    for hidden in range(max(1, top - 3), top + 1):
                        p = budget.plan(board, replace(shape, hidden_sizes=(hidden,) * layers), variant=variant)
                        if p.fits and p.flash.headroom <= BOUNDARY_HEADROOM:
                            found.append(p.shape)
    picked = [found[i] for i in rng.choice(len(found), size=min(count, len(found)), replace=False)]
    return [Case(board, variant, random_model(int(rng.integers(2**31)), input_size=s.input_size,
                                              hidden_sizes=s.hidden_sizes, window=s.window, outputs=s.outputs,
                                              per_channel=s.per_channel), False, "boundary")
            for s in picked]


def build_case(case: Case, work_dir: Path) -> Result:
    """Build the case's HIL firmware with the project's normal path and read the linker's flash and RAM."""
    project = firmware.generate_project(case.model, case.board, work_dir, force=True, variant=case.variant)
    if case.buffer_window:
        prefix = project.prefixes[0]
        (project.path / "src" / "hil_window.c").write_text(WINDOW_SOURCE.format(prefix=prefix,
                                                                                PREFIX=prefix.upper()))
        with open(project.path / "platformio.ini", "a") as ini:
            ini.write("build_flags = -Wl,--undefined=hil_window\n")
    planned = firmware.predicted_sizes(case.plan)
    try:
        sizes = firmware.build(project).sizes
    except firmware.FirmwareError as e:
        return Result(case, planned, None, str(e))
    return Result(case, planned, (sizes.flash, sizes.ram))
