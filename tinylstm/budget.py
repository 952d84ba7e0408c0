"""The memory-budget planner: will a model of this shape fit this board, byte by byte?

Every model figure comes from ``tinylstm.export.memory_layout`` and ``kernel_layout``, the same layout the C
templates emit, so the plan and the generated objects cannot disagree. Around them the plan adds what the
firmware allocates for the model (the HIL frame buffer's growth beyond the minimal model's, and the input
window when it is buffered on the device), worst-case alignment padding, the measured machine code (the board
file's ``code`` record, plus a margin when the board's stock compiler is not the one measured), and the board's
overhead (framework, HIL protocol, stack reserve). Flash and RAM totals are upper bounds of what the linker
gives the HIL firmware (tests/test_planner_bound.py and hil/planner_vs_linker.py check it on random shapes).
A plan takes microseconds, so sweeps can call it freely.

Given the sensor's sample rate, the plan also checks time: the deployed firmware runs one LSTM step per sample
(the Arduino sketch steps on each sample and starts a new window after each output), so every step must finish
within the sample period. The longest step is the last of a window, which also runs the dense head (and the
reset after it). Its time is an upper bound: the latency cost model's prediction (``tinylstm.costmodel``, fitted
per board and kernel) plus the device allowance that hil/deadline_vs_device.py measured for the pair on the HIL
firmware (a pair without one gets the bare prediction, flagged as an estimate), in the board's counts, turned
into seconds with the board's clock and, for QEMU's instruction counts, the board file's cycles per instruction.
A board or kernel without calibration leaves the deadline unchecked, with a warning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from tinylstm import costmodel
from tinylstm.boards import Board
from tinylstm.export import Buffer, ModelShape, default_variant, kernel_layout, memory_layout

DEFAULT_MARGIN = 0.10
MAX_HIDDEN = 4096  # search limit and CLI limit
MAX_WINDOW = 100_000

FITS, TIGHT, DOES_NOT_FIT = "fits", "tight", "does not fit"
UNCHECKED = "not checked"
REGIONS = ("flash", "ram")

# avr-gcc limits: ptrdiff_t is 16 bits, so no object may exceed 32767 bytes, and the kernel reads constants
# with 16-bit program-memory addresses (pgm_read_*), so they must lie in the first 64 KB of flash.
AVR_MAX_OBJECT = 32767
AVR_PROGMEM_REACH = 65536

# What each generated object is, from its name in the layout.
_CATEGORIES = (
    (re.compile(r"_weights$"), "weights"),
    (re.compile(r"_bias$"), "kernel sums"),
    (re.compile(r"_(multiplier|shift)$"), "multipliers/shifts"),
    (re.compile(r"_constants$"), "multipliers/shifts"),  # arm_dsp: sizes and requantization words of a layer
    (re.compile(r"_params$"), "parameter structs"),
    (re.compile(r"(sigmoid|activation)_table$"), "activation table"),
    (re.compile(r"_hidden$"), "h"),
    (re.compile(r"_cell$"), "c"),
    (re.compile(r"^scratch$"), "scratch"),
)
# Alignment of each object on a 32-bit target (int32 arrays and the parameter structs: 4, int16: 2, int8: 1).
# AVR aligns nothing. An object not listed is assumed word aligned, which only overstates the padding bound.
_ALIGN_32BIT = (
    (re.compile(r"_(bias|multiplier|params)$"), 4),
    (re.compile(r"(_cell|sigmoid_table)$"), 2),
    (re.compile(r"(_weights|_shift|_hidden|^scratch)$"), 1),
)
# Largest request payload (a STEP or RUN chunk) the HIL firmware accepts, per code-generation family.
HIL_MAX_PAYLOAD = {"avr": 128, "arm": 1024, "xtensa": 1024, "riscv": 1024}
# Code added to the plan, as a share of the measured code, for a board whose stock compiler is not the one its
# code figures were measured with (docs/boards.md, "Compilers").
UNMEASURED_TOOLCHAIN_MARGIN = 0.10
# The layout family each code-generation arch uses: ILP32 targets share the Arm EABI sizes and alignments.
_LAYOUT_ARCH = {"avr": "avr", "arm": "arm", "xtensa": "arm", "riscv": "arm"}


class PlanError(ValueError):
    """A shape or option the planner cannot plan for (for example a size of zero)."""


@dataclass(frozen=True)
class Item:
    """One line of the plan: bytes of one kind in one region, and who allocates them."""

    name: str
    category: str
    region: str  # "flash" or "ram"
    nbytes: int
    part: str  # "model" (generated model source), "kernel" (static kernel), "firmware" (buffers it allocates)
    upper_bound: bool = False  # True for figures that are a bound, not an exact count


@dataclass(frozen=True)
class Resource:
    """Flash or RAM: the board's capacity against what the model part and the firmware around it take."""

    region: str
    capacity: int
    model: int
    overhead: int
    status: str

    @property
    def total(self) -> int:
        return self.model + self.overhead

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "model": self.model, "overhead": self.overhead, "total": self.total,
                "headroom": self.headroom, "status": self.status}


def duration(seconds: float) -> str:
    """A time for people: s, ms or µs with three significant figures."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} µs"


@dataclass(frozen=True)
class Deadline:
    """The real-time check: the longest step (the last of a window, with the dense head) against the sample
    period. ``status`` is FITS, TIGHT (headroom under the plan's margin), DOES_NOT_FIT or UNCHECKED."""

    sample_rate_hz: float
    status: str
    step_counts: float | None  # counts of the step judged, in ``unit`` (predicted longest, or measured mean)
    unit: str | None
    step_seconds: float | None
    note: str  # how counts became time, or why the deadline is not checked
    upper_bound: bool = False  # the step is the plan's bound of the device's longest sample, not an estimate

    @property
    def period(self) -> float:
        return 1.0 / self.sample_rate_hz

    @property
    def share(self) -> float | None:
        """The share of the sample period the longest step takes (above 1: too slow)."""
        return None if self.step_seconds is None else self.step_seconds / self.period

    @property
    def max_rate_hz(self) -> float | None:
        """The highest sample rate the step keeps up with."""
        return None if self.step_seconds is None else 1.0 / self.step_seconds

    def margin(self) -> str:
        """How the step compares with the period: "uses 24% of the period" or "3.9x too slow (...)"."""
        if self.step_seconds is None:
            return "not checked"
        if self.status == DOES_NOT_FIT:
            return f"{self.share:.1f}x too slow (keeps up to {self.max_rate_hz:,.0f} Hz)"
        return f"uses {self.share:.0%} of the period"

    def text(self) -> str:
        """The step against the period, and the margin."""
        rate = f"{self.sample_rate_hz:g} Hz"
        if self.step_seconds is None:
            return f"cannot check the deadline at {rate}: {self.note}"
        return f"step {duration(self.step_seconds)} vs period {duration(self.period)} at {rate}: {self.margin()}"

    def line(self) -> str:
        """``text`` prefixed "time:", like the memory faults' "flash:" and "ram:"."""
        return f"time: {self.text()}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Deadline:
        """The deadline ``to_dict`` wrote (in plan.json and bench.json)."""
        return cls(d["sample_rate_hz"], d["status"], d["step_counts"], d["unit"], d["step_s"], d["note"],
                   d.get("upper_bound", False))

    def to_dict(self) -> dict[str, Any]:
        return {"sample_rate_hz": self.sample_rate_hz, "period_s": self.period, "status": self.status,
                "step_counts": self.step_counts, "unit": self.unit, "step_s": self.step_seconds,
                "share": self.share, "max_rate_hz": self.max_rate_hz, "note": self.note,
                "upper_bound": self.upper_bound}


def deadline(board: Board, shape: ModelShape, variant: str, sample_rate_hz: float, margin: float,
             cost: costmodel.CostModel | None) -> Deadline:
    """The deadline check of ``shape`` on ``board`` with kernel ``variant`` at ``sample_rate_hz``."""
    if cost is None or (board.name, variant) not in cost.fits:
        calibrated = ", ".join(f"{b} {v}" for b, v in cost.fits) if cost else "no calibration file"
        note = (f"no latency measurements of the {variant} kernel on {board.name} (calibrated: {calibrated}); "
                "measure it with python -m tinylstm.costmodel calibrate, or time the device")
        return Deadline(sample_rate_hz, UNCHECKED, None, None, None, note)
    est = cost.estimate(board, shape, variant)
    predicted = est.per_step + est.head
    allowance = cost.allowances.get((board.name, variant))
    if allowance is None:
        return timed(board, predicted, est.fit.unit, sample_rate_hz, margin,
                     f"predicted by the cost model ({variant} kernel; no device allowance measured, not a bound)")
    return timed(board, allowance.bound(shape, predicted), est.fit.unit, sample_rate_hz, margin,
                 f"upper bound: cost model {predicted:,.0f} ({variant} kernel) {allowance.text()}, measured on the "
                 f"device (docs/{costmodel.DEFAULT_ALLOWANCE.name})", upper_bound=True)


def timed(board: Board, counts: float, unit: str, sample_rate_hz: float, margin: float, what: str,
          upper_bound: bool = False) -> Deadline:
    """The deadline check of a step of ``counts`` in ``unit`` (cycles, instructions or us) on ``board``;
    ``what`` says where the counts come from (a prediction, a bound, a measurement)."""
    seconds = board.seconds(counts, unit)
    note = f"{counts:,.0f} {unit} {what}"
    if unit != "us":
        note += f" at {board.clock_hz / 1e6:g} MHz"
    if unit == "instructions":
        note += f", {board.emulator.timing()}"
    period = 1.0 / sample_rate_hz
    status = DOES_NOT_FIT if seconds > period else TIGHT if period - seconds < margin * period else FITS
    return Deadline(sample_rate_hz, status, counts, unit, seconds, note, upper_bound)


@dataclass(frozen=True)
class Plan:
    board: Board
    shape: ModelShape
    buffer_window: bool
    margin: float
    items: tuple[Item, ...]
    flash: Resource
    ram: Resource
    reasons: tuple[str, ...]  # why it does not fit, one line per fault
    verdict: str  # FITS, TIGHT or DOES_NOT_FIT
    variant: str  # the kernel variant planned (export.VARIANTS)
    deadline: Deadline | None = None  # the real-time check, when a sample rate was given

    @property
    def fits(self) -> bool:
        """True when the model fits and keeps up, tight or not."""
        return self.verdict != DOES_NOT_FIT

    @property
    def overflowing(self) -> tuple[str, ...]:
        """What does not fit: "flash", "ram", and "time" when a step overruns the sample period."""
        regions = tuple(r.region for r in (self.flash, self.ram) if r.status == DOES_NOT_FIT)
        return regions + (("time",) if self.deadline and self.deadline.status == DOES_NOT_FIT else ())

    @property
    def warnings(self) -> tuple[str, ...]:
        """Checks that were asked for but could not be made (a deadline without latency measurements)."""
        return (self.deadline.line(),) if self.deadline and self.deadline.status == UNCHECKED else ()

    @property
    def estimates(self) -> tuple[str, ...]:
        """Figures of the plan that are estimates rather than measurements."""
        notes = []
        if self.board.overhead.estimate:
            notes.append("board overhead")
        if self.board.code.estimate:
            notes.append("code")
        if self.deadline and self.deadline.unit == "instructions" and self.board.emulator.cpi_estimate:
            notes.append("cycles per instruction")
        if self.deadline and self.deadline.step_seconds is not None and not self.deadline.upper_bound:
            notes.append("step time")
        return tuple(notes)

    def summary(self) -> str:
        """One line: the verdict and, when it does not fit, the first fault of each overflowing resource."""
        if self.fits:
            return f"{self.verdict} {self.board.name}"
        faults = [next(r for r in self.reasons if r.startswith(f"{region}:")) for region in self.overflowing]
        return f"does not fit {self.board.name}: " + "; ".join(faults)

    def category_totals(self, region: str) -> dict[str, int]:
        totals: dict[str, int] = {}
        for item in self.items:
            if item.region == region:
                totals[item.category] = totals.get(item.category, 0) + item.nbytes
        return totals

    def to_dict(self) -> dict[str, Any]:
        shape = self.shape
        return {
            "board": self.board.name,
            "shape": {"input_size": shape.input_size, "hidden_sizes": list(shape.hidden_sizes),
                      "window": shape.window, "outputs": shape.outputs, "per_channel": shape.per_channel},
            "options": {"buffer_window": self.buffer_window, "margin": self.margin},
            "variant": self.variant,
            "verdict": self.verdict,
            "overflowing": list(self.overflowing),
            "reasons": list(self.reasons),
            "flash": self.flash.to_dict(),
            "ram": self.ram.to_dict(),
            "items": [{"name": i.name, "category": i.category, "region": i.region, "bytes": i.nbytes,
                       "part": i.part, "upper_bound": i.upper_bound} for i in self.items],
            "overhead": {"ram": dict(self.board.overhead.ram), "flash": dict(self.board.overhead.flash),
                         "estimate": self.board.overhead.estimate},
            "estimates": list(self.estimates),
            "deadline": self.deadline.to_dict() if self.deadline else None,
        }

    def describe(self) -> str:
        """A human-readable table: model items by category, overhead, totals, headroom and the verdict."""
        lines = [f"{self.board.name}: {self.board.description} ({self.board.mcu}, {self.board.core})",
                 f"model: input {self.shape.input_size}, hidden {list(self.shape.hidden_sizes)}, window "
                 f"{self.shape.window} ({'buffered on the device' if self.buffer_window else 'streamed'}), "
                 f"outputs {self.shape.outputs if self.shape.outputs is not None else 'none (last h)'}"
                 f"{', per-channel scales' if self.shape.per_channel else ''}; {self.variant} kernel"]
        overhead = self.board.overhead
        for resource, extra in ((self.flash, overhead.flash), (self.ram, overhead.ram)):
            lines.append("")
            lines.append(f"{resource.region.upper():<34}{'bytes':>10}")
            for category, nbytes in self.category_totals(resource.region).items():
                bound = any(i.upper_bound for i in self.items
                            if i.region == resource.region and i.category == category)
                lines.append(f"  {category + (' (at most)' if bound else ''):<32}{nbytes:>10,}")
            lines.append(f"  {'model part':<32}{resource.model:>10,}")
            tag = " (estimate)" if overhead.estimate else ""
            for name, nbytes in extra.items():
                lines.append(f"  {'overhead: ' + name + tag:<32}{nbytes:>10,}")
            lines.append(f"  {'total':<32}{resource.total:>10,}")
            lines.append(f"  {'capacity':<32}{resource.capacity:>10,}")
            share = resource.headroom / resource.capacity
            lines.append(f"  {'headroom':<32}{resource.headroom:>10,}  ({share:.1%})  {resource.status}")
        if self.deadline:
            lines += ["", *self._describe_deadline(self.deadline)]
        lines.append("")
        lines.append(f"verdict: {self.verdict}" + (f" ({', '.join(self.overflowing)})" if self.overflowing else ""))
        lines.extend(f"  {reason}" for reason in self.reasons)
        if self.verdict == TIGHT:
            lines.append(f"  headroom is under the {self.margin:.0%} margin")
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        if self.estimates:
            where = " and the TIME section" if "step time" in self.estimates else ""
            lines.append(f"estimates: {', '.join(self.estimates)} (see the board file{where})")
        return "\n".join(lines)

    def _describe_deadline(self, d: Deadline) -> list[str]:
        """The TIME section of ``describe``: the longest step against the sample period."""
        lines = ["TIME (one step per sample)"]
        if d.step_seconds is None:
            return [*lines, f"  not checked: {d.note}"]
        headroom = d.period - d.step_seconds
        label = "longest step (upper bound)" if d.upper_bound else "longest step (predicted)"
        lines += [f"  {label:<32}{duration(d.step_seconds):>10}  ({d.note})",
                  f"  {'sample period':<32}{duration(d.period):>10}  ({d.sample_rate_hz:g} Hz)",
                  f"  {'headroom':<32}{('-' if headroom < 0 else '') + duration(abs(headroom)):>10}"
                  f"  ({1 - d.share:.1%})  {d.status}"]
        if self.board.emulator and d.unit == "instructions":
            lines.append(f"  cycles per instruction: {self.board.emulator.cpi_source}")
        return lines


def _category(name: str) -> str:
    for pattern, category in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def _alignment(name: str, layout_arch: str, variant: str = "reference") -> int:
    if layout_arch == "avr":
        return 1
    if variant == "arm_dsp" and re.search(r"(_weights|^scratch)$", name):
        return 4  # packed 32-bit words
    for pattern, align in _ALIGN_32BIT:
        if pattern.search(name):
            return align
    return 4


def _padding_bound(buffers: list[Buffer], region: str, layout_arch: str, variant: str = "reference") -> int:
    """Most bytes of padding the model's objects add to the region (the order is the linker's choice).

    AVR aligns no object, but the code after the PROGMEM objects starts on a word: one byte at most. On 32-bit
    targets an object needs at most its alignment less one byte before it, and only after an object whose size
    is not a multiple of four has left the offset unaligned: at most 3 bytes per such object, plus 3 where the
    model's objects meet the firmware's and 3 where the section's end is aligned to a word.
    """
    objects = [b for b in buffers if b.region == region]
    if not objects:
        return 0
    if layout_arch == "avr":
        return 1 if region == "flash" else 0
    per_object = sum(_alignment(b.name, layout_arch, variant) - 1 for b in objects)
    unaligned = sum(1 for b in objects if b.nbytes % 4)
    return min(per_object, 3 * unaligned + 3) + 3


def hil_frame_bytes(board: Board, input_size: int, output_size: int) -> int:
    """Size of the HIL firmware's frame buffer for one model (BUFFER_SIZE in firmware_templates/hil/hil_main.c):
    a header, the largest of a request payload, a reply with the output and the INFO reply, a CRC, and COBS."""
    max_payload = max(HIL_MAX_PAYLOAD[board.arch], input_size + 1)
    info = 2 + 16 + 7 + 9 + 2 + 4 + 1 + len(board.name)
    frame = 3 + max(max_payload, 6 + output_size, info) + 2
    return frame + frame // 254 + 1


def check_shape(shape: ModelShape) -> None:
    """Raise PlanError for sizes that make no model: zero, negative, or beyond the planner's limits."""
    if shape.input_size < 1:
        raise PlanError(f"input size {shape.input_size} must be >= 1")
    if not shape.hidden_sizes:
        raise PlanError("a model needs at least one LSTM layer")
    for hidden in shape.hidden_sizes:
        if not 1 <= hidden <= MAX_HIDDEN:
            raise PlanError(f"hidden size {hidden} must be in 1..{MAX_HIDDEN}")
    if shape.window < 1:
        raise PlanError(f"window {shape.window} must be >= 1")
    if shape.outputs is not None and shape.outputs < 1:
        raise PlanError(f"outputs {shape.outputs} must be >= 1 (or none for no dense head)")


def plan(board: Board, shape: ModelShape, *, buffer_window: bool = False, margin: float = DEFAULT_MARGIN,
         variant: str | None = None, sample_rate_hz: float | None = None,
         cost: costmodel.CostModel | None = None) -> Plan:
    """The plan for ``shape`` on ``board`` with the kernel ``variant`` (export.VARIANTS; None: the board's fastest,
    the one its firmware builds, ``export.default_variant``).

    ``buffer_window``: the firmware keeps the whole input window (window x input bytes) in RAM instead of
    streaming it one sample at a time. ``margin``: headroom below this share of a resource (or of the sample
    period) makes it "tight". ``sample_rate_hz``: the sensor's rate; every step must finish within its period
    (module docstring), predicted by ``cost`` (None: the default calibration, ``costmodel.default_model``).
    """
    check_shape(shape)
    if not 0 <= margin < 1:
        raise PlanError(f"margin {margin} must be in [0, 1)")
    if sample_rate_hz is not None and not (math.isfinite(sample_rate_hz) and sample_rate_hz > 0):
        raise PlanError(f"sample rate {sample_rate_hz} Hz must be a positive number of samples per second")
    variant = variant or default_variant(board.arch, board.dsp)
    code = board.code.for_variant(variant)
    if code is None:
        raise PlanError(f"no code size of the {variant!r} kernel is recorded for {board.name} "
                        f"(recorded: reference{''.join(', ' + v for v in board.code.variants)})")
    layout_arch = _LAYOUT_ARCH[board.arch]
    model_buffers = memory_layout(shape, layout_arch, variant)
    kernel_buffers = kernel_layout(layout_arch, variant)
    items = [Item(b.name, _category(b.name), b.region, b.nbytes, "model") for b in model_buffers]
    items += [Item(b.name, _category(b.name), b.region, b.nbytes, "kernel") for b in kernel_buffers]

    layers = len(shape.hidden_sizes)
    kernel_text = code.kernel_text_bytes - (code.dense_text_bytes if shape.outputs is None else 0)
    items.append(Item("kernel code", "code", "flash", kernel_text, "kernel", upper_bound=True))
    items.append(Item("model code", "code", "flash", code.model_text_base + code.model_text_per_layer * layers,
                      "model", upper_bound=True))

    # The board's HIL overhead holds the frame buffer of the minimal model (1 input, 1 output); a wider model may
    # need a larger one (it carries the output in the reply).
    frame = hil_frame_bytes(board, shape.input_size, shape.output_size) - hil_frame_bytes(board, 1, 1)
    if frame:
        items.append(Item("frame buffer growth", "HIL frame", "ram", frame, "firmware"))
    if buffer_window:
        items.append(Item("window", "input window", "ram", shape.window * shape.input_size, "firmware"))

    if board.code.compiler != board.platformio.compiler:
        measured = sum(i.nbytes for i in items if i.category == "code")
        items.append(Item("unmeasured compiler", "toolchain margin", "flash",
                          math.ceil(UNMEASURED_TOOLCHAIN_MARGIN * measured), "kernel", upper_bound=True))

    all_buffers = model_buffers + kernel_buffers
    for region in REGIONS:
        padding = _padding_bound(all_buffers, region, layout_arch, variant)
        if padding:
            items.append(Item(f"{region} padding", "alignment padding", region, padding, "model", upper_bound=True))

    limit_faults = []  # faults that no amount of flash cures
    if board.arch == "avr":
        for b in model_buffers:
            if b.nbytes > AVR_MAX_OBJECT:
                limit_faults.append(f"flash: {b.name} is {b.nbytes:,} bytes; avr-gcc allows at most "
                               f"{AVR_MAX_OBJECT:,} bytes per object")
        constants = sum(b.nbytes for b in all_buffers if b.region == "flash")
        if constants > AVR_PROGMEM_REACH:
            limit_faults.append(f"flash: {constants:,} bytes of model constants; AVR program-memory reads reach "
                           f"only the first {AVR_PROGMEM_REACH // 1024} KB")

    overhead = board.overhead
    reasons = []
    resources = {}
    for region, capacity, extra in (("flash", board.flash_bytes, overhead.flash_bytes),
                                    ("ram", board.ram_bytes, overhead.ram_bytes)):
        model_bytes = sum(i.nbytes for i in items if i.region == region)
        total = model_bytes + extra
        faulty = any(r.startswith(f"{region}:") for r in limit_faults)
        if total > capacity or faulty:
            status = DOES_NOT_FIT
            if total > capacity:
                reasons.append(f"{region}: needs {total:,} bytes, the board has {capacity:,} "
                               f"({total - capacity:,} over)")
        elif capacity - total < margin * capacity:
            status = TIGHT
        else:
            status = FITS
        resources[region] = Resource(region, capacity, model_bytes, extra, status)

    reasons += limit_faults
    statuses = {r.status for r in resources.values()}
    timing = None
    if sample_rate_hz is not None:
        timing = deadline(board, shape, variant, sample_rate_hz, margin,
                          cost if cost is not None else costmodel.default_model())
        statuses.add(timing.status)
        if timing.status == DOES_NOT_FIT:
            reasons.append(timing.line())
    verdict = DOES_NOT_FIT if DOES_NOT_FIT in statuses else TIGHT if TIGHT in statuses else FITS
    return Plan(board, shape, buffer_window, margin, tuple(items), resources["flash"], resources["ram"],
                tuple(reasons), verdict, variant, timing)


def _largest(fits: Any, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), for a predicate that is monotone (true, then false); low-1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def max_hidden(board: Board, shape: ModelShape, *, buffer_window: bool = False, limit: int = MAX_HIDDEN,
               variant: str | None = None, sample_rate_hz: float | None = None,
               cost: costmodel.CostModel | None = None) -> int:
    """The largest hidden size (the same in every layer of ``shape``) that fits ``board`` with the kernel
    ``variant`` (None: the board's fastest), and keeps up with ``sample_rate_hz`` when given; 0 if none does.

    Every buffer and the step time (non-negative cost coefficients) grow with the hidden size, so the verdict is
    monotone and a binary search finds the answer.
    """
    layers = len(shape.hidden_sizes)

    def fits(hidden: int) -> bool:
        return plan(board, replace(shape, hidden_sizes=(hidden,) * layers), buffer_window=buffer_window,
                    variant=variant, sample_rate_hz=sample_rate_hz, cost=cost).fits

    return _largest(fits, 1, limit)


def max_window(board: Board, shape: ModelShape, *, buffer_window: bool = True, limit: int = MAX_WINDOW,
               variant: str | None = None) -> int | None:
    """The longest input window that fits ``board`` with the kernel ``variant`` (None: the board's fastest); 0 if
    none does.

    None when memory does not depend on the window (it is streamed and no buffer grows with it).
    """
    def planned(window: int) -> Plan:
        return plan(board, replace(shape, window=window), buffer_window=buffer_window, variant=variant)

    def fits(window: int) -> bool:
        return planned(window).fits

    if fits(1) and planned(1).items == planned(limit).items:
        return None
    return _largest(fits, 1, limit)
