"""The real-time check: the longest LSTM step against the sample period, in the planner, `tinylstm plan`,
`tinylstm train` and the board files' cycles per instruction.

The expected step times are computed here by hand from a synthetic calibration with known coefficients
(costmodel: per_step = a * MACs + b * hidden units + c * layers, the head a * outputs * H once per window), the
board's clock and, for QEMU, the cycles per instruction in its file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from tests import deadline_bound
from tinylstm import budget, costmodel
from tinylstm.boards import BoardError, load_board
from tinylstm.cli import main
from tinylstm.export import ModelShape

A, B, C = 10.0, 300.0, 1000.0  # counts per MAC, per hidden unit, per layer
SHAPES = ((3, 16, 1), (6, 32, 1), (12, 64, 1), (6, 24, 2), (6, 16, 3))
# The firmware's kernel on each board and what its emulator counts.
KERNELS = {"uno_sim": ("avr", "cycles"), "mps2_an386": ("arm_dsp", "instructions")}
SHAPE = ModelShape(input_size=6, hidden_sizes=(32,), window=100, outputs=4)
# The longest step of SHAPE: 4*32*(6+32) MACs, 32 units, 1 layer, plus the head's 4*32 MACs.
LONGEST = A * 4 * 32 * 38 + B * 32 + C + A * 4 * 32  # 60,520 counts
# 16 MHz, cycles; 25 MHz at 1.5 cycles per instruction.
STEP_SECONDS = {"uno_sim": LONGEST / 16e6, "mps2_an386": LONGEST * 1.5 / 25e6}


def _records() -> list[dict]:
    records = []
    for board, (variant, unit) in KERNELS.items():
        for i, h, n in SHAPES:
            macs = 4 * h * (i + h) + (n - 1) * 4 * h * 2 * h
            records.append({"board": board, "variant": variant, "input": i, "hidden": h, "layers": n,
                            "per_step": A * macs + B * h * n + C * n, "unit": unit})
    return records


COST = costmodel.CostModel(costmodel.parse_measurements(_records()))


def _seconds(board: str, hidden: int) -> float:
    """The longest step of SHAPE with ``hidden`` units, by hand."""
    counts = A * 4 * hidden * (6 + hidden) + B * hidden + C + A * 4 * hidden
    return counts / 16e6 if board == "uno_sim" else counts * 1.5 / 25e6


@pytest.mark.parametrize("name", KERNELS)
def test_planner_refuses_a_too_slow_model_at_a_high_rate_and_accepts_it_at_a_low_one(name):
    board = load_board(name)
    slow = budget.plan(board, SHAPE, sample_rate_hz=1000.0, cost=COST)
    assert slow.deadline.step_seconds == pytest.approx(STEP_SECONDS[name], rel=1e-9)
    assert not slow.fits and slow.overflowing == ("time",)
    assert slow.reasons == (f"time: step {STEP_SECONDS[name] * 1e3:.3g} ms vs period 1 ms at 1000 Hz: "
                            f"{STEP_SECONDS[name] * 1e3:.1f}x too slow (keeps up to {1 / STEP_SECONDS[name]:,.0f} Hz)",)
    assert slow.summary().startswith(f"does not fit {name}: time: step")
    fast = budget.plan(board, SHAPE, sample_rate_hz=100.0, cost=COST)
    assert fast.fits and fast.verdict == budget.FITS and fast.reasons == ()
    assert fast.deadline.share == pytest.approx(STEP_SECONDS[name] * 100.0, rel=1e-9)
    assert fast.deadline.text().endswith(f"uses {STEP_SECONDS[name] * 100:.0%} of the period")


@pytest.mark.parametrize("name", KERNELS)
def test_the_verdict_flips_at_one_over_the_step_time(name):
    board = load_board(name)
    limit = 1.0 / STEP_SECONDS[name]
    below = budget.plan(board, SHAPE, sample_rate_hz=limit * (1 - 1e-6), cost=COST, margin=0.0)
    above = budget.plan(board, SHAPE, sample_rate_hz=limit * (1 + 1e-6), cost=COST, margin=0.0)
    assert below.verdict == budget.FITS and above.verdict == budget.DOES_NOT_FIT
    # With the default 10% margin, a step taking over 90% of the period is tight, not a pass.
    assert budget.plan(board, SHAPE, sample_rate_hz=limit * 0.95, cost=COST).verdict == budget.TIGHT
    assert budget.plan(board, SHAPE, sample_rate_hz=limit * 0.85, cost=COST).verdict == budget.FITS


@pytest.mark.parametrize("name", KERNELS)
def test_the_recorded_calibration_also_refuses_and_accepts(name):
    """The default calibration (docs/performance.json): a rate far above and far below what the fit predicts."""
    board = load_board(name)
    planned = budget.plan(board, SHAPE, sample_rate_hz=1.0)
    assert planned.deadline.step_seconds is not None and planned.fits
    limit = planned.deadline.max_rate_hz
    assert budget.plan(board, SHAPE, sample_rate_hz=limit * 0.5).fits
    assert budget.plan(board, SHAPE, sample_rate_hz=limit * 2).overflowing == ("time",)


def test_a_device_allowance_makes_the_step_an_upper_bound():
    """cost model x (1 + share) + per sample + per output of the head, by hand; the note says so."""
    allowance = costmodel.Allowance("uno_sim", "avr", 0.25, 500.0, 30.0)
    cost = costmodel.CostModel(costmodel.parse_measurements(_records()), allowances={("uno_sim", "avr"): allowance})
    planned = budget.plan(load_board("uno_sim"), SHAPE, sample_rate_hz=100.0, cost=cost)
    bound = LONGEST * 1.25 + 500 + 30 * 4
    assert planned.deadline.step_counts == pytest.approx(bound, rel=1e-12)
    assert planned.deadline.step_seconds == pytest.approx(bound / 16e6, rel=1e-12)
    assert planned.deadline.upper_bound and "step time" not in planned.estimates
    assert planned.deadline.note.startswith(f"{bound:,.0f} cycles upper bound: cost model {LONGEST:,.0f} (avr "
                                            "kernel) + 25% + 500 per sample + 30 per output, measured on the device")
    assert "longest step (upper bound)" in planned.describe()
    # Without an allowance for the pair, the step is the cost model's estimate and the plan says so.
    bare = budget.plan(load_board("uno_sim"), SHAPE, sample_rate_hz=100.0, cost=COST)
    assert not bare.deadline.upper_bound and "not a bound" in bare.deadline.note and "step time" in bare.estimates
    assert budget.Deadline.from_dict(planned.deadline.to_dict()) == planned.deadline


def test_the_recorded_allowances_cover_both_emulated_kernels():
    """docs/deadline-allowance.json (hil/deadline_vs_device.py --write) holds an allowance for each board and kernel
    the script measures; the default calibration applies them."""
    stored = costmodel.load_allowances()
    assert set(stored) == set(deadline_bound.PAIRS)
    assert all(a.share >= 0 and a.per_sample >= 0 and a.per_output >= 0 for a in stored.values())
    assert all("hil/deadline_vs_device.py" in a.command for a in stored.values())
    for name in KERNELS:
        assert budget.plan(load_board(name), SHAPE, sample_rate_hz=1.0).deadline.upper_bound


def test_an_unreadable_allowance_file_names_the_fix(tmp_path):
    path = tmp_path / "allowance.json"
    path.write_text(json.dumps({"allowances": [{"board": "uno_sim"}]}))
    with pytest.raises(costmodel.CostModelError, match="rewrite it with that script's --write"):
        costmodel.load_allowances(path)


def test_without_a_sample_rate_nothing_changes():
    board = load_board("uno_sim")
    plain = budget.plan(board, SHAPE)
    assert plain.deadline is None and plain.to_dict()["deadline"] is None and plain.warnings == ()
    timed = budget.plan(board, SHAPE, sample_rate_hz=1.0, cost=COST)
    assert replace(timed, deadline=None) == plain


def test_max_hidden_shrinks_under_a_tight_deadline_and_is_monotone():
    board = load_board("mps2_an386")
    memory_only = budget.max_hidden(board, SHAPE)
    previous = memory_only
    for rate in (10.0, 100.0, 1000.0, 10_000.0):
        hidden = budget.max_hidden(board, SHAPE, sample_rate_hz=rate, cost=COST)
        # Brute force over the hand-computed step time: the largest hidden size within the period.
        by_hand = max(h for h in range(1, memory_only + 1) if _seconds("mps2_an386", h) <= 1.0 / rate)
        assert hidden == by_hand
        assert hidden <= previous
        previous = hidden
    assert previous < memory_only


def test_a_board_without_latency_measurements_gets_a_warning_not_a_pass():
    board = load_board("nucleo_f401re")
    result = budget.plan(board, SHAPE, sample_rate_hz=1e6, cost=COST)
    assert result.deadline.status == budget.UNCHECKED and result.deadline.step_seconds is None
    assert result.fits  # memory decides the verdict; the deadline is unknown
    assert len(result.warnings) == 1 and "cannot check the deadline at 1e+06 Hz" in result.warnings[0]
    assert "no latency measurements of the arm_dsp kernel on nucleo_f401re" in result.warnings[0]


def test_a_sample_rate_that_is_not_positive_is_refused():
    with pytest.raises(budget.PlanError, match="positive number of samples per second"):
        budget.plan(load_board("uno_sim"), SHAPE, sample_rate_hz=0.0)


def _plan_cli(tmp_path, *args: str):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"records": _records()}))
    return CliRunner().invoke(main, ["plan", "--input", "6", "--window", "100", "--outputs", "4",
                                     "--calibration", str(calibration), *args])


@pytest.mark.parametrize("name", KERNELS)
def test_cli_plan_exits_1_for_a_model_that_cannot_keep_up(name, tmp_path):
    slow = _plan_cli(tmp_path, "--board", name, "--hidden", "32", "--sample-rate", "1000")
    assert slow.exit_code == 1, slow.output
    ms = STEP_SECONDS[name] * 1e3
    assert f"error: does not fit {name}: time: step {ms:.3g} ms vs period 1 ms at 1000 Hz: {ms:.1f}x too slow" \
        in slow.stderr
    assert slow.stderr.endswith("; --max-hidden gives the largest hidden size that fits or a lower --sample-rate\n")
    assert slow.stderr.count("\n") == 1  # one line
    fast = _plan_cli(tmp_path, "--board", name, "--hidden", "32", "--sample-rate", "100")
    assert fast.exit_code == 0, fast.output
    assert "sample period" in fast.stdout and "verdict: fits" in fast.stdout


def test_cli_max_hidden_keeps_up_with_the_sample_rate(tmp_path):
    result = _plan_cli(tmp_path, "--board", "mps2_an386", "--sample-rate", "1000", "--max-hidden", "--json")
    assert result.exit_code == 0, result.output
    by_hand = max(h for h in range(1, 4097) if _seconds("mps2_an386", h) <= 1e-3)
    assert json.loads(result.stdout)["max_hidden"] == by_hand


def test_cli_plan_warns_when_the_deadline_cannot_be_checked(tmp_path):
    result = _plan_cli(tmp_path, "--board", "nucleo_f401re", "--hidden", "32", "--sample-rate", "1000")
    assert result.exit_code == 0
    assert result.stderr.startswith("warning: time: cannot check the deadline at 1000 Hz")


def test_cli_train_refuses_a_too_slow_model_before_training(tmp_path):
    def train(rate: str):
        return CliRunner().invoke(main, ["train", "--dataset", "basic_motions", "--board", "uno_sim", "--hidden",
                                         "32", "--sample-rate", rate, "--out", str(tmp_path / "m.pt")])

    result = train("1000")
    assert result.exit_code == 1
    assert "does not fit uno_sim: time: step" in result.output and "too slow" in result.output
    assert "the largest hidden size that fits with 1 layer(s) is" in result.output
    hopeless = train("100000")
    assert hopeless.exit_code == 1 and "no hidden size fits" in hopeless.output
    assert "or a lower sample rate" in hopeless.output
    assert not (tmp_path / "m.pt").exists()
    no_board = CliRunner().invoke(main, ["train", "--dataset", "basic_motions", "--sample-rate", "100",
                                         "--out", str(tmp_path / "m.pt")])
    assert no_board.exit_code == 2 and "give --board too" in no_board.output


# ------------------------------------------------------------------------------------- cycles per instruction


def test_qemu_boards_state_their_cycles_per_instruction_and_its_source():
    for name, cpi in (("mps2_an386", 1.5), ("netduinoplus2", 1.5), ("mps2_an500", 1.0)):
        emulator = load_board(name).emulator
        assert emulator.unit == "instructions" and emulator.cycles_per_instruction == cpi
        assert emulator.cpi_estimate and "not measured on hardware" in emulator.cpi_source
    uno = load_board("uno_sim").emulator
    assert uno.unit == "cycles" and uno.cycles_per_instruction is None


def test_counts_become_time_with_the_clock_and_the_cycles_per_instruction():
    assert load_board("uno_sim").seconds(16_000, "cycles") == pytest.approx(1e-3)
    assert load_board("mps2_an386").seconds(10_000, "instructions") == pytest.approx(10_000 * 1.5 / 25e6)
    assert load_board("uno").seconds(250, "us") == pytest.approx(250e-6)
    with pytest.raises(BoardError, match="cannot turn instructions into time"):
        load_board("uno").seconds(1, "instructions")


def test_the_cycles_per_instruction_appear_in_boards_and_plan():
    listing = CliRunner().invoke(main, ["boards"])
    assert "instructions, 1.5 cycles each (estimate)" in listing.output
    shown = CliRunner().invoke(main, ["boards", "mps2_an386"]).output
    assert "time assumes 1.5 cycles per instruction [estimate]" in shown and "Technical Reference Manual" in shown
    described = budget.plan(load_board("mps2_an386"), SHAPE, sample_rate_hz=100.0, cost=COST).describe()
    assert "1.5 cycles per instruction" in described and "estimates: cycles per instruction" in described


def _board_file(tmp_path, name: str, edit) -> str:
    document = load_board(name).to_dict()
    edit(document["emulator"])
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_a_qemu_board_without_timing_and_a_simavr_board_with_it_are_refused(tmp_path):
    with pytest.raises(BoardError, match=r"field 'emulator.timing': missing"):
        load_board(_board_file(tmp_path, "mps2_an386", lambda e: e.pop("timing")))
    with pytest.raises(BoardError, match=r"field 'emulator.timing.cycles_per_instruction': must be > 0"):
        load_board(_board_file(tmp_path, "mps2_an386", lambda e: e["timing"].update(cycles_per_instruction=0)))
    with pytest.raises(BoardError, match=r"field 'emulator.timing': simavr counts cycles"):
        load_board(_board_file(tmp_path, "uno_sim", lambda e: e.update(timing={"cycles_per_instruction": 1})))


# --------------------------------------------------------------------------------------- against the device


DEVICE_SEED = int(os.environ.get("TINYLSTM_DEADLINE_SEED", "16"))
DEVICE_MODELS = 3  # random models per board, with the kernel its firmware builds


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("avr-gcc") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs avr-gcc and arm-none-eabi-gcc")
@pytest.mark.parametrize(("board_name", "variant"), deadline_bound.PAIRS[:2])
def test_the_plans_step_bounds_the_devices_longest_sample(board_name, variant, tmp_path):
    """Random models (drawn from a seed the allowance was not measured with; TINYLSTM_DEADLINE_SEED draws others)
    in the HIL firmware in the emulator: the longest step with the head and the reset after it, as the device
    counts them, stays within the plan's step."""
    board = load_board(board_name)
    rng = np.random.default_rng([DEVICE_SEED, deadline_bound.PAIRS.index((board_name, variant))])
    cases = [deadline_bound.random_case(rng, board, variant, int(rng.integers(2**31))) for _ in range(DEVICE_MODELS)]
    for result in deadline_bound.measure_all(cases, tmp_path, DEVICE_SEED):
        plan = result.case.plan
        assert plan.deadline.upper_bound and "upper bound" in plan.deadline.note
        assert result.longest_sample <= plan.deadline.step_counts, (
            f"{result.case.describe()} (seed {DEVICE_SEED}): the device took {result.longest_sample:,} "
            f"{result.unit}, over the plan's bound {plan.deadline.step_counts:,.0f}")
        # The mean step of the worst window (reset and head shared out) is within the bound too.
        assert result.worst_window_step <= plan.deadline.step_counts
