"""The planner's step time against the device: random models built into the real HIL firmware of an emulated
board and run in its emulator. Shared by tests/test_deadline.py and hil/deadline_vs_device.py.

The deadline binds the longest sample period of the deployed firmware: the last step of a window, the dense head
after it and the reset that starts the next window (the Arduino sketch). The HIL protocol measures it directly:

- every step of a window goes as a STEP with output, so each count is one step plus the head, in the state the
  window has reached (the largest is the longest step with its head, wherever in the window it falls);
- the reset is a one-step RUN (reset, step, head) less a STEP with output of the same input from reset.

The longest sample is the largest STEP count plus the reset. BENCH's worst window over its steps (the mean step,
with the reset and head shared out) is measured too, on windows the device generates from a seed.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tests.random_models import random_model, random_windows
from tinylstm import bench, budget, costmodel, reference
from tinylstm.boards import Board
from tinylstm.export import ModelShape
from tinylstm.qmodel import QuantizedModel

# The emulated boards with latency calibration, each with the kernel its firmware builds first.
PAIRS = (("uno_sim", "avr"), ("mps2_an386", "arm_dsp"), ("uno_sim", "reference"), ("mps2_an386", "reference"))
LARGEST_HIDDEN = {"avr": 48, "arm": 96}
MAX_WINDOW = 16  # every step is one STEP round trip
STEP_WINDOWS = 2  # windows stepped one STEP at a time (random_windows: uniform, rails, mixed)
BENCH_WINDOWS = 4  # seeded windows run by BENCH
HEAD_OUTPUTS = 8  # the larger head of the minimal models
SLACK_PERCENT = 2  # added to the share for the models not drawn (one seed's share fell 1% short of another's)


@dataclass(frozen=True)
class Case:
    board: Board
    variant: str
    model: QuantizedModel

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_model(self.model)

    @property
    def plan(self) -> budget.Plan:
        """The plan at 1 Hz (any rate: only the step is compared), with the default calibration."""
        return budget.plan(self.board, self.shape, variant=self.variant, sample_rate_hz=1.0)

    @property
    def cost_model(self) -> float:
        """The cost model's longest step (step and head), before any allowance."""
        est = costmodel.default_model().estimate(self.board, self.shape, self.variant)
        return est.per_step + est.head

    def describe(self) -> str:
        s = self.shape
        return (f"{self.board.name}/{self.variant}: input {s.input_size}, hidden {list(s.hidden_sizes)}, window "
                f"{s.window}, outputs {s.outputs}{', per-channel' if s.per_channel else ''}")


@dataclass(frozen=True)
class Result:
    case: Case
    unit: str
    longest_step: int  # largest STEP-with-output count: one step and the head
    reset: int
    worst_window_step: float  # BENCH: the worst window's counts / steps

    @property
    def longest_sample(self) -> int:
        return self.longest_step + self.reset

    def ratio(self, counts: float) -> float:
        """The longest sample against ``counts`` (above 1: the device took longer)."""
        return self.longest_sample / counts


def random_case(rng: np.random.Generator, board: Board, variant: str, seed: int) -> Case:
    """A random model that the planner says fits ``board`` (memory; its step is what is compared): 1 to 3 layers,
    a dense head or none, either scale kind, realistic and extreme parameters."""
    largest = LARGEST_HIDDEN[board.arch]
    while True:
        layers = int(rng.integers(1, 4))
        model = random_model(seed, input_size=int(rng.integers(1, 17)),
                             hidden_sizes=tuple(int(rng.integers(1, largest + 1)) for _ in range(layers)),
                             outputs=int(rng.integers(1, 9)) if rng.random() < 0.7 else None,
                             window=int(rng.integers(2, MAX_WINDOW + 1)), per_channel=bool(rng.random() < 0.5))
        case = Case(board, variant, model)
        if case.plan.fits:
            return case
        seed += 10_000


def measure(case: Case, work_dir: Path, seed: int) -> Result:
    """Build the case's HIL firmware, run it in the emulator and measure the longest sample (module docstring).
    Every output is checked against the integer reference."""
    model = case.model
    windows = random_windows(seed, model, STEP_WINDOWS)
    expected = reference.run_batch(model, windows)
    with bench.flashed(case.board, model, None, work_dir, 30.0, 15.0, None, {}, case.variant) as client:
        info = client.info
        longest = 0
        for window, want in zip(windows, expected, strict=True):
            client.reset()
            for x_t in window:
                step = client.step(x_t, output=True)
                longest = max(longest, step.counts)
            assert np.array_equal(step.output, want), f"{case.describe()}: STEP output differs from the reference"
        one = client.run(windows[0][:1])
        client.reset()
        reset = max(0, one.counts - client.step(windows[0][0], output=True).counts)
        entry = bench.bench_model(client, model, windows=BENCH_WINDOWS, source="seed", seed=seed)
        assert entry["mismatches"] == 0, f"{case.describe()}: BENCH outputs differ from the reference"
    return Result(case, info.unit, info.counts_to_unit(longest), info.counts_to_unit(reset),
                  max(entry["counts"]) / model.input.window)


def measure_all(cases: list[Case], work: Path | None, seed: int, log=None) -> list[Result]:
    """``measure`` every case, in ``work`` (None: a temporary directory)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="tinylstm-deadline-") as tmp:
        for n, case in enumerate(cases):
            results.append(measure(case, (work or Path(tmp)) / f"{n}", seed + n))
            if log:
                r = results[-1]
                log(f"[{n + 1}/{len(cases)}] {case.describe()}: cost model {case.cost_model:,.0f}, device "
                    f"{r.longest_sample:,} {r.unit} (x{r.ratio(case.cost_model):.3f})")
    return results


def minimal_cases(board: Board, variant: str) -> tuple[Case, Case]:
    """The smallest model (input 1, hidden 1) with a head of 1 and of HEAD_OUTPUTS outputs: what they take beyond
    the cost model is the firmware's fixed cost per sample and per output."""
    return tuple(Case(board, variant, random_model(1, input_size=1, hidden_sizes=(1,), window=2, outputs=outputs,
                                                   per_channel=False, extreme=0.0))
                 for outputs in (1, HEAD_OUTPUTS))


def allowance(board: str, variant: str, minimal: tuple[Result, Result], results: list[Result]
              ) -> costmodel.Allowance:
    """The allowance over the cost model's step and head that covers every measured sample.

    per_output and per_sample: what the minimal models took beyond the cost model, split into a cost per head
    output (their difference over the extra outputs) and the rest, in counts rounded up. share: the largest excess
    of the random models beyond those fixed costs, as a share of the cost model, rounded up to whole percent plus
    SLACK_PERCENT for the models not drawn.
    """
    excess = [r.longest_sample - r.case.cost_model for r in minimal]
    per_output = max(0, math.ceil((excess[1] - excess[0]) / (HEAD_OUTPUTS - 1)))
    fixed = costmodel.Allowance(board, variant, 0.0, max(0, math.ceil(excess[0] - per_output)), per_output)
    worst = max((r.longest_sample - fixed.fixed(r.case.shape)) / r.case.cost_model for r in (*minimal, *results))
    return replace(fixed, share=max(0, math.ceil(100 * (worst - 1) - 1e-9) + SLACK_PERCENT) / 100)
