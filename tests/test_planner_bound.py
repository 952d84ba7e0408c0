"""The plan is an upper bound of the linker: random shapes built into the real HIL firmware of every emulated board
with each kernel it has, plus shapes at the edge of the Uno's flash and the shape of issue 14. Every shape the plan
passes must link, with the plan at or above the linker's flash and RAM and within max(64 B, 1%).

The shapes are drawn from a seed (printed on failure) that is not one the code figures were measured with; set
TINYLSTM_PLANNER_SEED to draw others. hil/planner_vs_linker.py runs the same check on more shapes.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.linker_bound import EMULATED, Case, boundary_cases, build_case, random_case, tolerance
from tests.random_models import random_model
from tinylstm import export
from tinylstm.boards import load_board

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("avr-gcc") is None or shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs avr-gcc and arm-none-eabi-gcc")]
SEED = int(os.environ.get("TINYLSTM_PLANNER_SEED", "14"))
SHAPES = 6  # random shapes per board and kernel
BOUNDARY = 4  # uno_sim shapes with 0 to 16 bytes of flash headroom, per kernel
PAIRS = [(name, variant) for name in EMULATED
         for variant in ("reference", export.default_variant(load_board(name).arch, load_board(name).dsp))]


def _check(case: Case, tmp_path) -> None:
    """A shape the plan passes links; whatever links is bounded by the plan, closely."""
    result = build_case(case, tmp_path)
    where = f"{case.describe()} (seed {SEED})"
    if result.linked is None:
        assert not case.plan.fits, f"{where}: the plan passes it but it does not link: {result.error}"
        return
    for region, slack, linked in zip(("flash", "RAM"), result.slack, result.linked, strict=True):
        assert 0 <= slack <= tolerance(linked), f"{where}: {region} plan - linker = {slack} (linker {linked})"


@pytest.mark.parametrize(("board_name", "variant"), PAIRS, ids=[f"{b}-{v}" for b, v in PAIRS])
def test_plan_bounds_the_linker_on_random_shapes(board_name, variant, tmp_path):
    board = load_board(board_name)
    rng = np.random.default_rng([SEED, EMULATED.index(board_name), export.VARIANTS.index(variant)])
    cases = [random_case(rng, board, variant, int(rng.integers(2**31))) for _ in range(SHAPES)]
    if board.arch == "avr":
        cases += boundary_cases(board, variant, BOUNDARY, rng)
    for n, case in enumerate(cases):
        _check(case, tmp_path / str(n))


@pytest.mark.parametrize("variant", ["reference", "avr"])
def test_issue_14_shape_on_uno_sim(variant, tmp_path):
    """input 3, hidden 72, window 20, outputs 8: the plan said 32,768 of 32,768 and the link overflowed by 26
    bytes. Now the plan passes it only if it links, and bounds the linker when it does."""
    model = random_model(14, input_size=3, hidden_sizes=(72,), window=20, outputs=8, per_channel=False)
    _check(Case(load_board("uno_sim"), variant, model, False, "regression"), tmp_path)
