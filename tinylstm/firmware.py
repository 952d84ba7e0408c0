"""Firmware: a PlatformIO project for quantized models on a board, its build, and the emulators that run it.

- ``generate_project`` writes a complete PlatformIO project: platformio.ini, the generated model sources, the
  kernel, and the HIL firmware (protocol in docs/hil-protocol.md) with the board's serial port and counter.
- ``build`` runs ``pio run`` and reads the firmware's flash and RAM use from the ELF.
- Emulated boards build offline with the project-local platforms in ``boards/platforms`` and Debian's cross
  compilers; ``prepare_toolchain`` sets up the PlatformIO core directory for that (idempotent).
- ``start_emulator`` "uploads" to an emulated board: simavr (through the UART harness in
  ``boards/emulators``) or QEMU, each instance with its own pty or TCP port, stopped by pid.
- ``upload`` flashes a real board through PlatformIO.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from tinylstm import export
from tinylstm.boards import Board, BoardError, load_board
from tinylstm.budget import HIL_MAX_PAYLOAD, Plan, PlanError, plan
from tinylstm.export import ModelShape
from tinylstm.qmodel import QuantizedModel

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO_ROOT / "firmware_templates"
HIL_TEMPLATE_DIR = TEMPLATE_DIR / "hil"
PLATFORMS_DIR = REPO_ROOT / "boards" / "platforms"
HARNESS_SOURCE = REPO_ROOT / "boards" / "emulators" / "simavr_uart.c"

SCONS_VERSION = "4.11.1"
REAL_BOARD_BAUD = 115200
SIMAVR_BAUD = 1_000_000  # simavr times the UART by its baud rate: faster links, shorter tests
HIL_MAX_WINDOW = 0xFFFF  # the INFO reply and RUN step counts carry the window in 16 bits (docs/hil-protocol.md)
# UART driver of each QEMU machine.
QEMU_SERIAL = {"mps2-an385": "serial_cmsdk.c", "mps2-an386": "serial_cmsdk.c", "mps2-an500": "serial_cmsdk.c",
               "netduinoplus2": "serial_stm32.c"}
CYCLE_COUNTER_CORES = ("cortex-m3", "cortex-m4", "cortex-m7")
PROJECT_MANIFEST = "tinylstm-project.json"


class FirmwareError(RuntimeError):
    """A firmware project, toolchain, build, upload or emulator failure, with a one-line explanation."""


@dataclass(frozen=True)
class Toolchain:
    package: str  # PlatformIO package name the offline platform asks for
    prefix: str  # binary prefix, e.g. "avr-"
    debian_packages: str


TOOLCHAINS = {
    "avr": Toolchain("toolchain-atmelavr", "avr-", "gcc-avr avr-libc"),
    "arm": Toolchain("toolchain-gccarmnoneeabi", "arm-none-eabi-", "gcc-arm-none-eabi libnewlib-arm-none-eabi"),
}
EMULATOR_PACKAGES = {"simavr": "simavr libsimavr-dev gcc", "qemu": "qemu-system-arm"}


def _install_hint(packages: str) -> str:
    return f"install it with: sudo apt-get install {packages} (or run bash boards/setup.sh)"


# ----------------------------------------------------------------------------------------------------------
# Offline PlatformIO: cache directory, tool-scons, toolchain packages, the simavr harness
# ----------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where tinylstm keeps its PlatformIO core directory, toolchain links and built tools.

    ``$TINYLSTM_CACHE`` if set, else ``<repo>/.cache``.
    """
    return Path(os.environ.get("TINYLSTM_CACHE", REPO_ROOT / ".cache")).resolve()


def core_dir() -> Path:
    return cache_dir() / "platformio"


def pio_environment(offline: bool = True) -> dict[str, str]:
    """The environment for PlatformIO: no telemetry or upgrade checks; offline: the project-local core dir."""
    env = dict(os.environ)
    env["PLATFORMIO_SETTING_ENABLE_TELEMETRY"] = "no"
    env["PLATFORMIO_SETTING_CHECK_PLATFORMIO_INTERVAL"] = "3650"
    env["PLATFORMIO_NO_ANSI"] = "true"
    if offline:
        env["PLATFORMIO_CORE_DIR"] = str(core_dir())
    return env


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """An exclusive lock over the cache, so parallel processes prepare it once."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _prepare_scons() -> None:
    """PlatformIO's tool-scons package, made from the scons module installed with tinylstm."""
    from platformio.dependencies import get_core_dependencies
    from platformio.package.meta import PackageMetadata, PackageSpec, PackageType

    requirement = get_core_dependencies()["tool-scons"]  # e.g. "~4.41101.0"
    version = requirement.lstrip("~^=<>")
    target = core_dir() / "packages" / "tool-scons"
    manifest = target / "package.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") == version:
        return
    try:
        import SCons
    except ImportError:
        raise FirmwareError(f"scons is not installed; install it with: pip install scons=={SCONS_VERSION}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tool-scons.", dir=target.parent))
    shutil.copytree(Path(SCons.__file__).parent, tmp / "SCons", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "scons.py").write_text(
        "import os\nimport sys\n\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        "import SCons.Script  # noqa: E402\n\n"
        "SCons.Script.main()\n"
    )
    (tmp / "package.json").write_text(json.dumps({
        "name": "tool-scons", "version": version,
        "description": f"SCons {SCons.__version__} from PyPI, packaged for PlatformIO by tinylstm",
    }, indent=2))
    spec = PackageSpec(owner="platformio", name="tool-scons", requirements=requirement)
    PackageMetadata(PackageType.TOOL, "tool-scons", version, spec=spec).dump(str(tmp / ".piopm"))
    _replace_dir(tmp, target)


def _gcc_package_version(gcc: str) -> str:
    """PlatformIO's version scheme for a GCC toolchain: 1.MMmmpp.0 (12.2.1 -> 1.120201.0)."""
    out = subprocess.run([gcc, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True, check=True)
    parts = [int(p) for p in re.findall(r"\d+", out.stdout)[:3]] + [0, 0]
    return f"1.{parts[0]:d}{parts[1]:02d}{parts[2]:02d}.0"


def toolchain_package_dir(arch: str) -> Path:
    return cache_dir() / "toolchains" / TOOLCHAINS[arch].package


def _prepare_toolchain_package(arch: str) -> None:
    """A local PlatformIO package whose bin/ links to the Debian cross compiler's binaries."""
    tc = TOOLCHAINS[arch]
    gcc = shutil.which(tc.prefix + "gcc")
    if gcc is None:
        raise FirmwareError(f"the {arch} cross compiler ({tc.prefix}gcc) is missing; "
                            f"{_install_hint(tc.debian_packages)}")
    bin_dir = Path(gcc).resolve().parent
    target = toolchain_package_dir(arch)
    manifest = target / "package.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("bin_dir") == str(bin_dir):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tc.package}.", dir=target.parent))
    (tmp / "bin").mkdir()
    for tool in sorted(bin_dir.glob(tc.prefix + "*")):
        (tmp / "bin" / tool.name).symlink_to(tool)
    (tmp / "package.json").write_text(json.dumps({
        "name": tc.package, "version": _gcc_package_version(gcc),
        "description": f"links to {bin_dir}/{tc.prefix}*", "bin_dir": str(bin_dir),
    }, indent=2))
    _replace_dir(tmp, target)


def harness_path() -> Path:
    return cache_dir() / "bin" / "simavr_uart"


def _build_harness() -> Path:
    """The simavr UART harness, compiled from boards/emulators/simavr_uart.c when missing or out of date."""
    binary = harness_path()
    if binary.is_file() and binary.stat().st_mtime >= HARNESS_SOURCE.stat().st_mtime:
        return binary
    if not Path("/usr/include/simavr/sim_avr.h").is_file() or shutil.which("gcc") is None:
        raise FirmwareError(f"simavr's headers or gcc are missing; {_install_hint(EMULATOR_PACKAGES['simavr'])}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    cmd = ["gcc", "-O2", "-o", str(tmp), str(HARNESS_SOURCE), "-I/usr/include/simavr",
           "-lsimavr", "-lpthread", "-lutil"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FirmwareError(f"building the simavr harness failed: {result.stderr.strip().splitlines()[-1:]}")
    tmp.replace(binary)
    return binary


def prepare_toolchain(arch: str | None = None, emulator: str | None = None) -> Path:
    """Prepare the offline PlatformIO core directory (tool-scons), the toolchain package for ``arch``, and the
    simavr harness when ``emulator == "simavr"``. Idempotent and safe to call from parallel processes; returns
    the core directory.
    """
    if arch is not None and arch not in TOOLCHAINS:
        raise FirmwareError(f"no offline toolchain for the {arch!r} family (emulated boards are avr or arm)")
    with _cache_lock():
        _prepare_scons()
        if arch is not None:
            _prepare_toolchain_package(arch)
        if emulator == "simavr":
            _build_harness()
    return core_dir()


# ----------------------------------------------------------------------------------------------------------
# Project generation
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Project:
    """A generated PlatformIO project."""

    path: Path
    board: Board
    prefixes: list[str]
    digests: list[str]
    variant: str = "reference"  # the kernel variant the project was generated with (export.VARIANTS)

    @property
    def env_name(self) -> str:
        return self.board.name

    @property
    def elf(self) -> Path:
        return self.path / ".pio" / "build" / self.env_name / "firmware.elf"

    @classmethod
    def open(cls, path: Path) -> Project:
        manifest = Path(path) / PROJECT_MANIFEST
        if not manifest.is_file():
            raise FirmwareError(f"{path} is not a tinylstm firmware project (no {PROJECT_MANIFEST})")
        data = json.loads(manifest.read_text())
        return cls(Path(path), load_board(data["board"]), data["prefixes"], data["digests"],
                   data.get("variant", "reference"))


def _jinja() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader([TEMPLATE_DIR, HIL_TEMPLATE_DIR]),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


def platform_sources(board: Board) -> list[str]:
    """The HIL platform layer files (in firmware_templates/hil) for a board: serial port, counter, start-up."""
    if board.emulator is not None and board.emulator.kind == "simavr":
        return ["serial_avr.c", "counter_avr_timer1.c"]
    if board.emulator is not None and board.emulator.kind == "qemu":
        serial = QEMU_SERIAL.get(board.emulator.machine)
        if serial is None:
            raise FirmwareError(f"board {board.name}: no UART driver for QEMU machine {board.emulator.machine!r} "
                                f"(known: {', '.join(QEMU_SERIAL)})")
        return ["startup_cortexm.c", serial, "counter_systick_qemu.c"]
    if board.platformio.framework == "arduino":
        if board.arch == "avr":
            counter = "counter_avr_timer1.c"
        elif board.arch in ("xtensa", "riscv"):
            counter = "counter_esp32.cpp"
        elif board.core in CYCLE_COUNTER_CORES:
            counter = "counter_dwt.c"
        else:
            counter = "counter_micros.cpp"
        return ["serial_arduino.cpp", counter]
    if board.arch == "avr":
        return ["serial_avr.c", "counter_avr_timer1.c"]
    raise FirmwareError(f"board {board.name}: no HIL platform layer for framework "
                        f"{board.platformio.framework!r} on {board.arch}")


def _pio_board_manifest(board: Board) -> dict:
    path = PLATFORMS_DIR / board.platformio.platform / "boards" / f"{board.platformio.board}.json"
    if not path.is_file():
        raise FirmwareError(f"board {board.name}: {path} is missing")
    return json.loads(path.read_text())


def linker_script(board: Board) -> str:
    """The linker script of an emulated Cortex-M board (cortexm.ld.j2): its flash and RAM from the board file and
    the origins from the platform's board manifest. The HIL and the benchmark firmware both link with it."""
    build = _pio_board_manifest(board)["build"]
    return _jinja().get_template("cortexm.ld.j2").render(
        board=board.name, flash_origin=int(build["flash_origin"], 16), flash_size=board.flash_bytes,
        ram_origin=int(build["ram_origin"], 16), ram_size=board.ram_bytes)


def default_prefixes(models: Sequence[QuantizedModel]) -> list[str]:
    return ["tinylstm_model"] if len(models) == 1 else [f"m{i:02d}" for i in range(len(models))]


def board_variant(board: Board, variant: str | None = None) -> str:
    """The kernel variant to build for ``board``: ``variant`` if given (checked), else the board's fastest
    (``export.default_variant``)."""
    if variant is None:
        return export.default_variant(board.arch, board.dsp)
    try:
        export.check_variant(variant)
    except export.ExportError as e:
        raise FirmwareError(str(e)) from None
    return variant


def generate_project(models: QuantizedModel | Sequence[QuantizedModel], board: Board | str, out_dir: Path, *,
                     prefixes: Sequence[str] | None = None, force: bool = False,
                     variant: str | None = None) -> Project:
    """Write a PlatformIO project serving ``models`` over the HIL protocol on ``board`` into ``out_dir``.

    ``variant`` is the kernel (export.VARIANTS); None picks ``board_variant(board)``.
    Several models share one firmware (each with its own prefix); the host selects one by its hash. The project
    is rendered into a temporary directory and renamed into place; an existing project is replaced only with
    ``force`` (its .pio build cache is kept).
    """
    board = load_board(board) if isinstance(board, str) else board
    variant = board_variant(board, variant)
    models = [models] if isinstance(models, QuantizedModel) else list(models)
    if not models:
        raise FirmwareError("a firmware needs at least one model")
    prefixes = list(prefixes) if prefixes is not None else default_prefixes(models)
    if len(prefixes) != len(models) or len(set(prefixes)) != len(prefixes):
        raise FirmwareError("give one distinct prefix per model")
    for model in models:
        if model.input.window > HIL_MAX_WINDOW:
            raise FirmwareError(f"model {model.name}: a window of {model.input.window:,} steps exceeds the HIL "
                                f"protocol's 16-bit window field (at most {HIL_MAX_WINDOW:,})")
    digests = [m.digest() for m in models]
    if len(set(digests)) != len(digests):
        raise FirmwareError("the same model appears twice; the device selects models by hash")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / PROJECT_MANIFEST).is_file() and any(out_dir.iterdir()):
        raise FirmwareError(f"{out_dir} exists and is not a tinylstm firmware project; choose an empty directory")
    if (out_dir / PROJECT_MANIFEST).is_file() and not force:
        raise FirmwareError(f"{out_dir} already holds a firmware project; use --force to regenerate it")

    files: dict[str, str] = {}
    try:
        for model, prefix in zip(models, prefixes, strict=True):
            files.update({f"src/{name}": text for name, text in export.render_c(model, prefix, variant).items()})
    except export.ExportError as e:
        raise FirmwareError(str(e)) from None
    files.update({f"src/{name}": text for name, text in export.kernel_sources(variant).items()})
    for name in ["hil_main.c", "hil_port.h", *platform_sources(board)]:
        files[f"src/{name}"] = (HIL_TEMPLATE_DIR / name).read_text()

    env = _jinja()
    max_input = max(m.input.features for m in models)
    max_output = max(m.output_size for m in models)
    emulated = board.emulator is not None
    context = {
        "board": board.name,
        "cpu_hz": board.clock_hz,
        "baud": SIMAVR_BAUD if emulated and board.emulator.kind == "simavr" else REAL_BOARD_BAUD,
        "max_payload": max(HIL_MAX_PAYLOAD[board.arch], max_input + 1),
        "max_output": max_output,
        "models": [{"prefix": p, "PREFIX": p.upper()} for p in prefixes],
        "arduino": board.platformio.framework == "arduino",
    }
    files["src/hil_config.h"] = env.get_template("hil_config.h.j2").render(context)
    files["src/hil_models.c"] = env.get_template("hil_models.c.j2").render(context)

    ldscript = None
    if emulated and board.arch == "arm":
        ldscript = "cortexm.ld"
        files[ldscript] = linker_script(board)
    files["platformio.ini"] = env.get_template("platformio.ini.j2").render(
        board=board, models=[{"prefix": p, "digest": d} for p, d in zip(prefixes, digests, strict=True)],
        platform=_platform_spec(board), platform_packages=_platform_packages(board), ldscript=ldscript,
        baud=context["baud"], upload_command=_upload_command(board))
    files[PROJECT_MANIFEST] = json.dumps({"board": board.name, "prefixes": prefixes, "digests": digests,
                                          "variant": variant}, indent=2)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        if out_dir.exists():
            if (out_dir / ".pio").is_dir():
                (out_dir / ".pio").rename(tmp / ".pio")
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Project(out_dir, board, prefixes, digests, variant)


@contextlib.contextmanager
def project_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on a project directory, held while it is generated and built, so that two commands
    given the same directory take turns instead of replacing it under each other."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]
    with open(locks / f"project-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _platform_spec(board: Board) -> str:
    local = PLATFORMS_DIR / board.platformio.platform
    return f"symlink://{local}" if local.is_dir() else board.platformio.spec


def _platform_packages(board: Board) -> list[str]:
    if not (PLATFORMS_DIR / board.platformio.platform).is_dir():
        return []
    return [f"{TOOLCHAINS[board.arch].package}@symlink://{toolchain_package_dir(board.arch)}"]


def _upload_command(board: Board) -> str | None:
    """For emulated boards, `pio run -t upload` starts the emulator in the background (see `tinylstm flash`)."""
    if board.emulator is None:
        return None
    return (f"{shlex.quote(sys.executable)} -m tinylstm.firmware start --board {board.name} "
            f"--elf $SOURCE")


# ----------------------------------------------------------------------------------------------------------
# Planner check, build and sizes
# ----------------------------------------------------------------------------------------------------------

def check_fits(models: QuantizedModel | Sequence[QuantizedModel], board: Board, variant: str | None = None
               ) -> list[Plan]:
    """The planner's verdict for each model on the board with the kernel ``generate_project`` builds for
    ``variant`` (None: ``board_variant(board)``), before any compile; FirmwareError if one does not fit."""
    models = [models] if isinstance(models, QuantizedModel) else list(models)
    variant = board_variant(board, variant)
    try:
        plans = [plan(board, ModelShape.from_model(m), variant=variant) for m in models]
    except PlanError as e:
        raise FirmwareError(str(e)) from None
    for model, p in zip(models, plans, strict=True):
        if not p.fits:
            raise FirmwareError(f"model {model.name} does not fit {board.name}: {'; '.join(p.reasons)}")
    return plans


def predicted_sizes(p: Plan) -> tuple[int, int]:
    """The planner's (flash, RAM) for the whole firmware, as the linker counts them: RAM is .data + .bss, so
    the stack reserve is left out."""
    return p.flash.total, p.ram.total - p.board.overhead.ram["stack"]


@dataclass(frozen=True)
class Sizes:
    """Firmware memory use from the linker: flash = .text + .data, RAM = .data + .bss (as `size -B`)."""

    text: int
    data: int
    bss: int

    @property
    def flash(self) -> int:
        return self.text + self.data

    @property
    def ram(self) -> int:
        return self.data + self.bss


@dataclass(frozen=True)
class BuildResult:
    project: Project
    elf: Path
    sizes: Sizes
    compiler: str  # the compiler that built the firmware, e.g. "avr-gcc 5.4.0"
    log: str = field(repr=False)


def size_tool(board: Board) -> str:
    prefix = TOOLCHAINS[board.arch].prefix if board.arch in TOOLCHAINS else ""
    return prefix + "size"


def elf_sizes(elf: Path, board: Board) -> Sizes:
    out = subprocess.run([size_tool(board), "-B", "-d", str(elf)], capture_output=True, text=True)
    if out.returncode != 0:
        raise FirmwareError(f"{size_tool(board)} failed on {elf}: {out.stderr.strip()}")
    text, data, bss = (int(v) for v in out.stdout.splitlines()[1].split()[:3])
    return Sizes(text, data, bss)


def _compiler_version(board: Board) -> str:
    gcc = TOOLCHAINS[board.arch].prefix + "gcc" if board.arch in TOOLCHAINS else "gcc"
    out = subprocess.run([gcc, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True)
    return f"{gcc} {out.stdout.strip()}" if out.returncode == 0 else gcc


def _check_offline_board(board: Board) -> None:
    if board.emulator is None:
        return
    tc = TOOLCHAINS.get(board.arch)
    if tc is None or shutil.which(tc.prefix + "gcc") is None:
        packages = tc.debian_packages if tc else "a cross compiler"
        raise FirmwareError(f"the compiler for {board.name} ({tc.prefix if tc else ''}gcc) is missing; "
                            f"{_install_hint(packages)}")


def build(project: Project, *, timeout: float = 600) -> BuildResult:
    """``pio run`` in the project; emulated boards build offline. Raises FirmwareError with the compiler's
    first error on failure."""
    board = project.board
    offline = (PLATFORMS_DIR / board.platformio.platform).is_dir()
    if offline:
        _check_offline_board(board)
        prepare_toolchain(board.arch, board.emulator.kind if board.emulator else None)
    cmd = [sys.executable, "-m", "platformio", "run", "-d", str(project.path), "-e", project.env_name]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=pio_environment(offline), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"pio run did not finish within {timeout:.0f} s in {project.path}") from None
    log = result.stdout + result.stderr
    if result.returncode != 0 and not offline and re.search(r"HTTPClientError|ConnectionError|Max retries", log):
        raise FirmwareError(
            f"downloading the PlatformIO platform '{board.platformio.platform}' for {board.name} failed: the "
            f"PlatformIO registry cannot be reached from here. The generated project is in {project.path}; build "
            f"it on a machine with internet access: pio run -d {project.path} (-t upload to flash)")
    if result.returncode != 0:
        raise FirmwareError(f"pio run failed for {board.name}: {_first_error(log)} (project: {project.path})")
    return BuildResult(project, project.elf, elf_sizes(project.elf, board), _compiler_version(board), log)


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\berror\b|Error:|overflowed|undefined reference", line):
            return line.strip()
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def minimal_model() -> QuantizedModel:
    """The smallest model (1 input, 1 hidden unit, no head, window 1): the firmware around it is the overhead."""
    from tinylstm.qmodel import InputSpec, LSTMLayer

    def gates(value: int, *shape: int, dtype: type = np.int32) -> np.ndarray:
        return np.full((4, *shape), value, dtype=dtype)

    layer = LSTMLayer(
        input_size=1, hidden_size=1, input_zero_point=0, output_zero_point=0, input_scale=1 / 64,
        output_scale=1 / 128, cell_scale_power=-11, cell_clip=0,
        input_weights=gates(1, 1, 1, dtype=np.int8), hidden_weights=gates(1, 1, 1, dtype=np.int8),
        bias=gates(0, 1), input_multiplier=gates(1 << 30), input_shift=gates(0),
        hidden_multiplier=gates(1 << 30), hidden_shift=gates(0),
        forget_to_cell_multiplier=1 << 30, forget_to_cell_shift=0, input_to_cell_multiplier=1 << 30,
        input_to_cell_shift=0, output_multiplier=1 << 30, output_shift=0)
    return QuantizedModel(InputSpec(features=1, window=1, scale=1 / 64, zero_point=0), [layer], name="minimal")


_BARE_MAIN = """/* No HIL, no model: what the C runtime and start-up code take on their own. */
int main(void)
{
    for (;;)
        ;
}

void SysTick_Handler(void)
{
}
"""


@dataclass(frozen=True)
class Overhead:
    """The firmware around the model, measured by the linker on an emulated board (bytes)."""

    framework_flash: int  # C runtime, start-up code, vector table: a firmware whose main() does nothing
    framework_ram: int
    hil_flash: int  # the HIL firmware with the minimal model, less the framework and what the model part links
    hil_ram: int
    compiler: str


def object_file(project: Project, source: str) -> Path:
    """The object file PlatformIO compiled from ``src/<source>`` of a built project."""
    return project.path / ".pio" / "build" / project.env_name / "src" / (Path(source).stem + ".o")


def linked_functions(result: BuildResult, source: str) -> dict[str, int]:
    """{function: size in the linked firmware} of the functions compiled from ``src/<source>`` that the linker
    kept (read with nm: code symbols t/T of the object file, sizes from the ELF)."""
    nm = TOOLCHAINS[result.project.board.arch].prefix + "nm"

    def code_symbols(path: Path) -> dict[str, int]:
        out = subprocess.run([nm, "-S", "--defined-only", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            raise FirmwareError(f"{nm} failed on {path}: {out.stderr.strip()}")
        symbols = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in "tT":
                symbols[parts[3]] = int(parts[1], 16)
        return symbols

    compiled = code_symbols(object_file(result.project, source))
    return {name: size for name, size in code_symbols(result.elf).items() if name in compiled}


def measure_overhead(board: Board | str, work_dir: Path) -> Overhead:
    """Build a do-nothing firmware and the HIL firmware with ``minimal_model()`` for an emulated board, and
    split the linker's figures into framework and HIL overhead.

    The HIL overhead is what remains of the HIL firmware once the framework and the model part are taken out;
    the model part is counted as linked, not as planned: the plan's exact objects, the model functions the
    firmware links (read from the ELF) and the kernel's code figure. Padding is left in the overhead. Subtracting
    the plan's upper bounds instead would shrink the overhead by their slack at this model, and the plan would
    fall short of the linker for models whose code reaches its bound.
    """
    board = load_board(board) if isinstance(board, str) else board
    if board.emulator is None:
        raise FirmwareError(f"{board.name} is not emulated: its overhead cannot be measured offline")
    model = minimal_model()
    # The overhead does not depend on the kernel: measured with the reference kernel.
    hil_project = generate_project(model, board, Path(work_dir) / "hil", force=True, variant="reference")
    hil = build(hil_project)
    bare_path = Path(work_dir) / "bare"
    bare_project = generate_project(model, board, bare_path, force=True, variant="reference")
    for source in (bare_path / "src").iterdir():
        if source.name != "startup_cortexm.c":
            source.unlink()
    (bare_path / "src" / "main.c").write_text(_BARE_MAIN)
    bare = build(bare_project)
    p = plan(board, ModelShape.from_model(model), variant="reference")
    model_functions = sum(linked_functions(hil, f"{hil_project.prefixes[0]}.c").values())
    linked = {region: sum(i.nbytes for i in p.items if i.region == region and
                          (not i.upper_bound or i.name == "kernel code")) for region in ("flash", "ram")}
    return Overhead(bare.sizes.flash, bare.sizes.ram, hil.sizes.flash - bare.sizes.flash - linked["flash"]
                    - model_functions, hil.sizes.ram - bare.sizes.ram - linked["ram"], bare.compiler)


# ----------------------------------------------------------------------------------------------------------
# Emulators
# ----------------------------------------------------------------------------------------------------------

def run_dir() -> Path:
    """Where emulator instances keep their pid file, log and pty link: one sub-directory per instance."""
    return cache_dir() / "run"


@dataclass
class Emulator:
    """A running emulator instance. Use as a context manager, or call ``stop()``."""

    board: Board
    elf: Path
    pid: int
    url: str  # what tinylstm.hil.connect() takes: a pty path or socket://127.0.0.1:PORT
    directory: Path
    cycle_log: Path | None = None  # simavr: the harness's own cycle counts between markers
    process: subprocess.Popen | None = field(default=None, repr=False)
    detached: bool = False  # started by `tinylstm flash`, running on its own until `tinylstm flash --stop`

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid, self.directory)

    def harness_cycles(self) -> list[int]:
        """simavr only: the cycles the simulator counted between each pair of firmware markers, in order."""
        if self.cycle_log is None or not self.cycle_log.is_file():
            return []
        return [int(line.split()[1]) for line in self.cycle_log.read_text().splitlines() if line.startswith("cycles ")]

    def log(self) -> str:
        path = self.directory / "emulator.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the emulator by pid (SIGTERM, then SIGKILL) and remove its run directory."""
        _terminate(self.pid, self.directory, self.process, timeout)
        _ATTACHED.discard(self)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __hash__(self) -> int:
        return self.pid


_ATTACHED: set[Emulator] = set()


@atexit.register
def _stop_attached() -> None:
    for emulator in list(_ATTACHED):
        emulator.stop()


def _pid_alive(pid: int, directory: Path) -> bool:
    """Whether pid is still the emulator started for ``directory`` (guards against a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(directory).encode() in cmdline


def _terminate(pid: int, directory: Path, process: subprocess.Popen | None, timeout: float) -> None:
    if process is not None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return
    if not _pid_alive(pid, directory):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid, directory):
        time.sleep(0.05)
    if _pid_alive(pid, directory):
        os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started the emulator dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_command(board: Board, elf: Path, directory: Path) -> tuple[list[str], str]:
    """The command line that runs ``elf`` on an emulated board, and the serial URL it will offer."""
    if board.emulator is None:
        raise FirmwareError(f"board {board.name} is not emulated; flash it with a serial port instead")
    if board.emulator.kind == "simavr":
        link = directory / "uart"
        cmd = [str(_build_harness()), "-m", board.emulator.machine, "-f", str(board.clock_hz),
               "-l", str(link), "-c", str(directory / "cycles.log"), str(elf)]
        return cmd, str(link)
    qemu = shutil.which("qemu-system-arm")
    if qemu is None:
        raise FirmwareError(f"qemu-system-arm is missing; {_install_hint(EMULATOR_PACKAGES['qemu'])}")
    port = _free_port()
    cmd = [qemu, "-M", board.emulator.machine, "-nographic", "-monitor", "none", "-nodefaults",
           "-serial", f"tcp:127.0.0.1:{port},server=on,wait=on,nodelay=on",
           "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
           "-kernel", str(elf), "-pidfile", str(directory / "qemu.pid")]
    return cmd, f"socket://127.0.0.1:{port}"


def start_emulator(board: Board | str, elf: Path, *, detach: bool = False, timeout: float = 20.0) -> Emulator:
    """Start the board's emulator on ``elf`` and wait until its serial port is ready.

    Attached instances (the default) stop with the Python process: at exit, or by SIGTERM from the kernel if
    the process dies. ``detach=True`` leaves the emulator running in its own session (``tinylstm flash``);
    stop it with ``stop_emulators``.
    """
    board = load_board(board) if isinstance(board, str) else board
    elf = Path(elf).resolve()
    if not elf.is_file():
        raise FirmwareError(f"{elf}: no such firmware")
    if board.emulator is not None and board.emulator.kind == "simavr":
        prepare_toolchain(emulator="simavr")
    run_dir().mkdir(parents=True, exist_ok=True)
    running_emulators()  # clears the run directories of emulators whose process is gone
    for attempt in range(3):
        directory = Path(tempfile.mkdtemp(prefix=f"{board.name}-", dir=run_dir()))
        cmd, url = emulator_command(board, elf, directory)
        log_path = directory / "emulator.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=None if detach else _die_with_parent)
        emulator = Emulator(board, elf, process.pid, url, directory,
                            directory / "cycles.log" if board.emulator.kind == "simavr" else None,
                            None if detach else process, detach)
        (directory / "elf").write_text(f"{elf}\n{_file_digest(elf)}\n")
        if detach:
            (directory / "detached").touch()
        (directory / "url").write_text(url + "\n")
        (directory / "pid").write_text(f"{process.pid}\n")  # last: a directory with a pid file is complete
        if not detach:
            _ATTACHED.add(emulator)
        ready = "uart: " if board.emulator.kind == "simavr" else "waiting for connection"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if ready in log_path.read_text(errors="replace"):
                return emulator
            time.sleep(0.02)
        text = log_path.read_text(errors="replace").strip()
        emulator.stop()
        if "Address already in use" in text and attempt < 2:
            continue  # another process took the free port between probe and bind
        last = text.splitlines()[-1] if text else "no output"
        raise FirmwareError(f"the {board.emulator.kind} emulator for {board.name} did not start: {last}")
    raise AssertionError("unreachable")


def running_emulators() -> list[Emulator]:
    """Emulator instances that are still running (including detached ones started by other processes)."""
    found = []
    if not run_dir().is_dir():
        return found
    for directory in sorted(run_dir().iterdir()):
        try:
            pid = int((directory / "pid").read_text())
            url = (directory / "url").read_text().strip()
            elf = Path((directory / "elf").read_text().splitlines()[0])
            board = load_board(directory.name.rsplit("-", 1)[0])
        except (OSError, ValueError, IndexError):
            continue
        if _pid_alive(pid, directory):
            found.append(Emulator(board, elf, pid, url, directory, detached=(directory / "detached").exists()))
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return found


def running_firmware(board: Board, elf: Path) -> Emulator | None:
    """A detached emulator of ``board`` already running the same firmware (by content), if any."""
    digest = _file_digest(elf)
    for emulator in running_emulators():
        if emulator.detached and emulator.board.name == board.name:
            with contextlib.suppress(OSError, IndexError):
                if (emulator.directory / "elf").read_text().splitlines()[1] == digest:
                    return emulator
    return None


def stop_emulators(board: str | None = None) -> list[Emulator]:
    """Stop the emulators that ``tinylstm flash`` started (of ``board`` if given); returns those stopped.

    Emulators that a running bench, run or demo started are theirs to stop: they end with that process.
    """
    if board is not None:
        load_board(board)  # an unknown name is an error, not "nothing running"
    stopped = [e for e in running_emulators() if e.detached and (board is None or e.board.name == board)]
    for emulator in stopped:
        emulator.stop()
    return stopped


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Real boards
# ----------------------------------------------------------------------------------------------------------

def check_port(port: str) -> None:
    """Raise FirmwareError unless ``port`` names an existing serial device (URLs such as socket:// pass)."""
    if "://" in port:
        return
    from serial.tools import list_ports

    known = [p.device for p in list_ports.comports()]
    if port in known or (port.startswith("/") and Path(port).exists()):
        return
    raise FirmwareError(f"serial port {port} does not exist; available: {', '.join(known) or 'none'}")


def upload(project: Project, port: str | None = None, *, timeout: float = 600) -> None:
    """Flash a real board with ``pio run -t upload`` (PlatformIO finds the port itself if none is given)."""
    if project.board.emulator is not None:
        raise FirmwareError(f"{project.board.name} is emulated: start it with start_emulator()")
    if port is not None:
        check_port(port)
    cmd = [sys.executable, "-m", "platformio", "run", "-d", str(project.path), "-e", project.env_name,
           "-t", "upload"] + (["--upload-port", port] if port else [])
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=pio_environment(offline=False),
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"pio upload did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise FirmwareError(f"upload to {project.board.name} failed: {_first_error(result.stdout + result.stderr)}")


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m tinylstm.firmware start --board B --elf F``: the upload command of emulated boards."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tinylstm.firmware",
                                     description="Start an emulated board in the background, or stop them.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the board's emulator on an ELF and print its serial URL")
    start.add_argument("--board", required=True)
    start.add_argument("--elf", required=True, type=Path)
    stop = sub.add_parser("stop", help="stop running emulators")
    stop.add_argument("--board")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            emulator = start_emulator(args.board, args.elf, detach=True)
            print(f"{emulator.board.name} running (pid {emulator.pid}); serial port: {emulator.url}")
        else:
            for emulator in stop_emulators(args.board):
                print(f"stopped {emulator.board.name} (pid {emulator.pid})")
    except (FirmwareError, BoardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
