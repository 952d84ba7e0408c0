"""The board catalogue: one JSON file per board in ``boards/`` (schema in docs/boards.md).

Boards are data: adding a board means adding ``boards/<name>.json``. Every file is checked on load, and a
malformed one is reported with its path and the field at fault.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOARDS_DIR = Path(__file__).resolve().parents[1] / "boards"
ARCHES = ("avr", "arm", "xtensa", "riscv")  # code-generation families
FPUS = ("none", "single", "double")
EMULATOR_KINDS = ("simavr", "qemu")
SOURCED_FIELDS = ("clock_hz", "ram_bytes", "flash_bytes")  # every figure names where it came from
OVERHEAD_RAM = ("framework", "hil", "stack")
OVERHEAD_FLASH = ("framework", "hil")


class BoardError(ValueError):
    """A board that does not exist, or a board file that is malformed."""


@dataclass(frozen=True)
class Emulator:
    kind: str  # "simavr" or "qemu"
    machine: str  # simavr MCU name or QEMU -M machine
    # QEMU counts instructions: the cycles one takes on the real core, to turn counts into time (None: simavr,
    # which counts cycles).
    cycles_per_instruction: float | None = None
    cpi_estimate: bool = False
    cpi_source: str = ""

    @property
    def unit(self) -> str:
        """What the emulator's latency counts are: cycles (simavr) or instructions (QEMU)."""
        return "cycles" if self.kind == "simavr" else "instructions"

    def timing(self) -> str:
        """One line: what a count is and how it becomes time."""
        if self.cycles_per_instruction is None:
            return "simavr counts cycles (cycle-accurate): no conversion"
        return (f"QEMU counts instructions; time assumes {self.cycles_per_instruction:g} cycles per instruction"
                f"{' [estimate]' if self.cpi_estimate else ''}")


@dataclass(frozen=True)
class PlatformIO:
    platform: str
    board: str
    framework: str
    version: str | None  # the platform release the generated platformio.ini pins (None: a local platform)
    compiler: str  # the compiler this platform builds with

    @property
    def spec(self) -> str:
        """The platform as platformio.ini names it: pinned to its version when it has one."""
        return f"platformio/{self.platform}@{self.version}" if self.version else self.platform


@dataclass(frozen=True)
class Overhead:
    """RAM and flash that the firmware around the model takes (framework, HIL protocol, stack reserve)."""

    ram: dict[str, int]
    flash: dict[str, int]
    estimate: bool
    source: str

    @property
    def ram_bytes(self) -> int:
        return sum(self.ram.values())

    @property
    def flash_bytes(self) -> int:
        return sum(self.flash.values())


@dataclass(frozen=True)
class KernelCode:
    """Machine code (.text) for this board's target and compiler flags, measured (docs/boards.md).

    The kernel's functions are measured exactly (``tinylstm_dense`` is dropped by --gc-sections when a model
    has no head); the generated model's functions vary by a few bytes with its constants, so they are given
    as a bound, ``model_text_base + model_text_per_layer * layers``.
    """

    kernel_text_bytes: int
    dense_text_bytes: int
    model_text_base: int
    model_text_per_layer: int
    estimate: bool
    source: str
    compiler: str  # the compiler the figures were measured with
    # The same four figures for the optimized kernel variants measured on this target (export.VARIANTS).
    variants: dict[str, KernelCode] = field(default_factory=dict)

    def for_variant(self, variant: str) -> KernelCode | None:
        """The code figures of a kernel variant; None when they were not measured for this board."""
        return self if variant == "reference" else self.variants.get(variant)


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    mcu: str
    core: str  # e.g. "avr5", "cortex-m4", "xtensa-lx6", "rv32imc"
    arch: str  # code-generation family, one of ARCHES
    clock_hz: int
    ram_bytes: int  # RAM that .data, .bss and the stack may use
    flash_bytes: int  # flash the application image may use (after any bootloader)
    sources: dict[str, str]
    dsp: bool
    fpu: str
    gcc_target_flags: tuple[str, ...]
    platformio: PlatformIO
    emulator: Emulator | None
    overhead: Overhead
    code: KernelCode
    path: Path

    @property
    def emulated(self) -> bool:
        return self.emulator is not None

    def seconds(self, count: float, unit: str) -> float:
        """Time of ``count`` latency counts in ``unit``: cycles at the board's clock, instructions (QEMU) at the
        emulator's cycles per instruction, or microseconds."""
        if unit == "cycles":
            return count / self.clock_hz
        if unit == "us":
            return count * 1e-6
        if unit == "instructions" and self.emulator is not None and self.emulator.cycles_per_instruction:
            return count * self.emulator.cycles_per_instruction / self.clock_hz
        raise BoardError(f"{self.name}: cannot turn {unit} into time (instructions need the emulator's "
                         "timing.cycles_per_instruction)")

    def to_dict(self) -> dict[str, Any]:
        """The board as its file's JSON document."""
        return json.loads(self.path.read_text())

    @property
    def measured_toolchain(self) -> bool:
        """Whether the board builds with the compiler its code figures were measured with."""
        return self.code.compiler == self.platformio.compiler

    def toolchain_note(self) -> str:
        """What the planner adds for the board's compiler (budget.UNMEASURED_TOOLCHAIN_MARGIN)."""
        from tinylstm.budget import UNMEASURED_TOOLCHAIN_MARGIN

        if self.measured_toolchain:
            return "the board builds with that compiler: no margin"
        return (f"the board builds with another compiler: the planner adds {UNMEASURED_TOOLCHAIN_MARGIN:.0%} of "
                f"the code as a margin")

    def describe(self) -> str:
        """Every figure of the board, each with its source."""
        overhead, code = self.overhead, self.code

        def parts(counts: dict[str, int]) -> str:
            return ", ".join(f"{name} {nbytes:,}" for name, nbytes in counts.items())

        emulator = f"{self.emulator.kind} {self.emulator.machine}" if self.emulator else "none (a real board)"
        return "\n".join([
            f"{self.name}: {self.description}",
            f"  MCU         {self.mcu} ({self.core}; code generation: {self.arch})",
            f"  clock       {self.clock_hz:,} Hz",
            f"              source: {self.sources['clock_hz']}",
            f"  RAM         {self.ram_bytes:,} bytes",
            f"              source: {self.sources['ram_bytes']}",
            f"  flash       {self.flash_bytes:,} bytes",
            f"              source: {self.sources['flash_bytes']}",
            f"  DSP/SIMD    {'yes' if self.dsp else 'no'}",
            f"  FPU         {self.fpu}",
            f"  PlatformIO  platform = {self.platformio.spec}, board = {self.platformio.board}, "
            f"framework = {self.platformio.framework}",
            f"  compiler    {self.platformio.compiler}",
            f"  emulator    {emulator}",
            *([f"  timing      {self.emulator.timing()}"] if self.emulator else []),
            *([f"              source: {self.emulator.cpi_source}"] if self.emulator and self.emulator.cpi_source
              else []),
            f"  overhead    RAM {overhead.ram_bytes:,} bytes ({parts(overhead.ram)}), "
            f"flash {overhead.flash_bytes:,} bytes ({parts(overhead.flash)})"
            f"{' [estimate]' if overhead.estimate else ''}",
            f"              source: {overhead.source}",
            f"  code        kernel {code.kernel_text_bytes:,} bytes (of which the dense head "
            f"{code.dense_text_bytes:,}), generated model at most {code.model_text_base:,} + "
            f"{code.model_text_per_layer:,} per layer{' [estimate]' if code.estimate else ''}",
            f"              source: {code.source}",
            f"              measured with {code.compiler}; {self.toolchain_note()}",
            f"  file        {self.path}",
        ])


def board_names(directory: Path = BOARDS_DIR) -> list[str]:
    """Names of the boards in the catalogue (the files ``<name>.json`` directly in ``directory``)."""
    return sorted(p.stem for p in directory.glob("*.json"))


def list_boards(directory: Path = BOARDS_DIR) -> list[Board]:
    """Every board in the catalogue, sorted by name."""
    return [_load_file(directory / f"{name}.json") for name in board_names(directory)]


def load_board(name_or_path: str | Path, directory: Path = BOARDS_DIR) -> Board:
    """A board by catalogue name (``uno``) or by the path of a board file."""
    text = str(name_or_path)
    if text.endswith(".json") or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise BoardError(f"{path}: no such board file")
        return _load_file(path)
    path = directory / f"{text}.json"
    if not path.is_file():
        names = board_names(directory)
        close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known boards: {', '.join(names)}"
        raise BoardError(f"unknown board {text!r}; {hint}")
    return _load_file(path)


class _Fields:
    """Typed access to one JSON object of a board file; faults name the file and the dotted field."""

    def __init__(self, path: Path, data: Any, prefix: str = "") -> None:
        if not isinstance(data, dict):
            where = prefix.rstrip(".") or "the top level"
            raise BoardError(f"{path}: {where} must be a JSON object")
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, key: str, message: str) -> BoardError:
        return BoardError(f"{self.path}: field '{self.prefix}{key}': {message}")

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        if key not in self.data:
            if required:
                raise self.fail(key, "missing")
            return None
        value = self.data[key]
        # JSON true/false are Python bools, which are also ints: keep them apart.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def text(self, key: str) -> str:
        value = self.get(key, str)
        if not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def positive(self, key: str) -> int:
        value = self.get(key, int)
        if value <= 0:
            raise self.fail(key, f"must be a positive number of bytes or hertz, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def sub(self, key: str, required: bool = True) -> _Fields | None:
        value = self.get(key, (dict, type(None)) if not required else dict, required)
        return None if value is None else _Fields(self.path, value, f"{self.prefix}{key}.")

    def byte_counts(self, key: str, names: tuple[str, ...]) -> dict[str, int]:
        fields = self.sub(key)
        counts = {}
        for name in names:
            value = fields.get(name, int)
            if value < 0:
                raise fields.fail(name, f"must be >= 0, got {value}")
            counts[name] = value
        return counts


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "an object",
             list: "a list", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _emulator(emu: _Fields | None) -> Emulator | None:
    """The emulator record; a QEMU board must state its cycles per instruction and their source."""
    if emu is None:
        return None
    kind, machine = emu.choice("kind", EMULATOR_KINDS), emu.text("machine")
    timing = emu.sub("timing", required=kind == "qemu")
    if kind == "simavr":
        if timing is not None:
            raise emu.fail("timing", "simavr counts cycles; cycles per instruction apply to QEMU boards only")
        return Emulator(kind, machine)
    cpi = timing.get("cycles_per_instruction", (int, float))
    if not cpi > 0:
        raise timing.fail("cycles_per_instruction", f"must be > 0, got {cpi}")
    return Emulator(kind, machine, float(cpi), timing.get("estimate", bool), timing.text("source"))


def _load_file(path: Path) -> Board:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise BoardError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise BoardError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    f = _Fields(path, data)
    name = f.text("name")
    if name != path.stem:
        raise f.fail("name", f"{name!r} must match the file name {path.stem!r}")

    sources = f.sub("sources")
    source_texts = {key: sources.text(key) for key in SOURCED_FIELDS}

    flags = f.get("gcc_target_flags", list)
    if not all(isinstance(flag, str) for flag in flags):
        raise f.fail("gcc_target_flags", "must be a list of strings")

    pio = f.sub("platformio")
    version = pio.get("version", str, required=False)
    if version is not None and not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise pio.fail("version", f"{version!r} is not an exact release (for example 5.0.0)")
    platformio = PlatformIO(pio.text("platform"), pio.text("board"), pio.text("framework"), version,
                            pio.text("compiler"))

    emulator = _emulator(f.sub("emulator", required=False))

    ovh = f.sub("overhead")
    overhead = Overhead(
        ram=ovh.byte_counts("ram", OVERHEAD_RAM),
        flash=ovh.byte_counts("flash", OVERHEAD_FLASH),
        estimate=ovh.get("estimate", bool),
        source=ovh.text("source"),
    )

    code_fields = f.sub("code")
    code = KernelCode(
        kernel_text_bytes=code_fields.positive("kernel_text_bytes"),
        dense_text_bytes=code_fields.positive("dense_text_bytes"),
        model_text_base=code_fields.positive("model_text_base"),
        model_text_per_layer=code_fields.positive("model_text_per_layer"),
        estimate=code_fields.get("estimate", bool),
        source=code_fields.text("source"),
        compiler=code_fields.text("compiler"),
    )
    if code.dense_text_bytes > code.kernel_text_bytes:
        raise code_fields.fail("dense_text_bytes", "is part of kernel_text_bytes, so it cannot be larger")
    variants = code_fields.sub("variants", required=False)
    if variants is not None:
        for variant in variants.data:
            v = variants.sub(variant)
            code.variants[variant] = KernelCode(
                kernel_text_bytes=v.positive("kernel_text_bytes"),
                dense_text_bytes=v.positive("dense_text_bytes"),
                model_text_base=v.get("model_text_base", int),
                model_text_per_layer=v.positive("model_text_per_layer"),
                estimate=code.estimate,
                source=code.source,
                compiler=code.compiler,
            )

    return Board(
        name=name,
        description=f.text("description"),
        mcu=f.text("mcu"),
        core=f.text("core"),
        arch=f.choice("arch", ARCHES),
        clock_hz=f.positive("clock_hz"),
        ram_bytes=f.positive("ram_bytes"),
        flash_bytes=f.positive("flash_bytes"),
        sources=source_texts,
        dsp=f.get("dsp", bool),
        fpu=f.choice("fpu", FPUS),
        gcc_target_flags=tuple(flags),
        platformio=platformio,
        emulator=emulator,
        overhead=overhead,
        code=code,
        path=path,
    )
