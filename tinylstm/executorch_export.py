"""ExecuTorch bundles: a trained float model (or its PT2E int8 version) as a verified .pte and .bpte.

The program has two methods, both on batch 1:

- ``forward(x[1, T, F]) -> y[1, O]``: a whole window of fixed length T, the model's window;
- ``step(x[1, F], h_1, c_1, ..., h_L, c_L) -> (y, h_1, c_1, ..., h_L, c_L)``: one time step that takes and returns
  every layer's state explicitly, for streaming.

``forward`` is a loop (``scan``) over the very cell that ``step`` exports, so stepping T times from zero state gives
``forward``'s output. The BundledProgram (.bpte) carries held-out test windows with the outputs of eager PyTorch,
and the JSON sidecar says how to normalise inputs and read outputs, and records the SHA-256 of both files: nothing
is loaded into the ExecuTorch runtime before its bytes match the sidecar (the runtime checks a program's structure,
not its data, and a damaged program can crash it). See docs/executorch.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._higher_order_ops import scan

from tinylstm import evaluate
from tinylstm.data import Dataset
from tinylstm.qmodel import ModelFormatError
from tinylstm.qmodel import load as load_quantized
from tinylstm.train import Checkpoint, LSTMModel, TrainError, load_checkpoint

PTE_NAME = "model.pte"
BPTE_NAME = "model.bpte"
SIDECAR_NAME = "model.json"
SIDECAR_FORMAT = "tinylstm-executorch"
SIDECAR_VERSION = 2  # 2: `files` records each file's bytes and SHA-256
PRECISIONS = ("fp32", "int8")
# Each bundled test case holds a whole window and calibration steps through every window, so both grow with T;
# longer sequences are better streamed through `step`.
MAX_WINDOW = 4096
DEFAULT_CASES = 8
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
CALIBRATION_WINDOWS = 256
COMPARISON_WINDOWS = 512
# ExecuTorch ScalarType codes of the tensor types a bundle can hold.
_SCALAR_TYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 6: np.float32, 7: np.float64,
                 11: np.bool_}

# Kernel libraries beyond the portable ones that the runtime lacks until they are imported, by operator namespace.
# Importing one registers its kernels with the runtime of this process (and its ops with torch, for lowering).
_KERNEL_LIBRARIES = {"quantized_decomposed": "executorch.kernels.quantized"}

Progress = Callable[[str], None]


class ExecuTorchError(ValueError):
    """A model, checkpoint or bundle the ExecuTorch path cannot use, with the reason."""


# ------------------------------------------------------------------------------------------------- modules


class StepCell(nn.Module):
    """One time step of every LSTM layer and the head, with PyTorch's LSTM equations and gate order (i, f, g, o).

    The input and recurrent projections are separate ``nn.Linear`` layers (the two biases summed), so that PT2E
    quantizers see ordinary linear layers.
    """

    def __init__(self, model: LSTMModel) -> None:
        super().__init__()
        self.input_proj = nn.ModuleList()
        self.hidden_proj = nn.ModuleList()
        for lstm in model.lstms:
            size = lstm.hidden_size
            x_proj = nn.Linear(lstm.input_size, 4 * size)
            h_proj = nn.Linear(size, 4 * size, bias=False)
            with torch.no_grad():
                x_proj.weight.copy_(lstm.weight_ih_l0)
                x_proj.bias.copy_(lstm.bias_ih_l0 + lstm.bias_hh_l0)
                h_proj.weight.copy_(lstm.weight_hh_l0)
            self.input_proj.append(x_proj)
            self.hidden_proj.append(h_proj)
        self.head = nn.Linear(model.head.in_features, model.head.out_features)
        self.head.load_state_dict(model.head.state_dict())
        self.eval()

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_state: list[torch.Tensor] = []
        v = x
        for n, (x_proj, h_proj) in enumerate(zip(self.input_proj, self.hidden_proj, strict=True)):
            h, c = state[2 * n], state[2 * n + 1]
            i, f, g, o = (x_proj(v) + h_proj(h)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new_state += [h, c]
            v = h
        return (self.head(v), *new_state)


class StepProgram(nn.Module):
    """The exported `step` method: a step module (float, or PT2E-converted) with a flat tuple output."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.step(x, *state))


class WindowProgram(nn.Module):
    """The exported `forward` method: the step module looped over the window from zero state."""

    def __init__(self, step: nn.Module, hidden_sizes: Sequence[int], outputs: int) -> None:
        super().__init__()
        self.step = step
        self.hidden_sizes = list(hidden_sizes)
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        init = [torch.zeros(batch, self.outputs)] + zero_state(self.hidden_sizes, batch)

        def body(carry: list[torch.Tensor], x_t: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            return list(self.step(x_t, *carry[1:])), []

        final, _ = scan(body, init, x, dim=1)
        return final[0]


def zero_state(hidden_sizes: Sequence[int], batch: int = 1) -> list[torch.Tensor]:
    """The initial (h, c) of every layer, flattened: [h_1, c_1, ..., h_L, c_L]."""
    return [torch.zeros(batch, size) for size in hidden_sizes for _ in range(2)]


# ------------------------------------------------------------------------------------------------ checkpoint


def load_float_checkpoint(path: str | Path) -> Checkpoint:
    """The float checkpoint written by the trainer; a clear error for anything else (a quantized model, say)."""
    try:
        return load_checkpoint(path)
    except TrainError as e:
        try:
            load_quantized(path)
        except ModelFormatError:
            message = str(e)
            if "not a tinylstm checkpoint" in message:  # drop the unpickler's multi-line explanation
                message = f"{path}: not a tinylstm checkpoint (expected the float model written by `tinylstm train`)"
            raise ExecuTorchError(message) from None
        raise ExecuTorchError(
            f"{path} is a quantized tinylstm model; the ExecuTorch export takes the float checkpoint written by "
            "`tinylstm train` (add --quantize int8 for an int8 program)") from None


def check_window(checkpoint: Checkpoint) -> None:
    """Raise ExecuTorchError unless the model's window is one `forward` can be exported with."""
    window = checkpoint.config.window
    if not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise ExecuTorchError(f"the model's window is {window!r} steps; the `forward` method needs a fixed "
                              f"window of 1 to {MAX_WINDOW} steps (stream longer sequences through `step`)")


def check_matches_data(checkpoint: Checkpoint, dataset: Dataset) -> None:
    """Raise ExecuTorchError unless the model's shapes match its data and there are held-out windows to bundle."""
    config = checkpoint.config
    if (dataset.window, dataset.features, dataset.outputs) != (config.window, config.input_size, config.outputs):
        raise ExecuTorchError(
            f"the model takes {config.window} x {config.input_size} windows with {config.outputs} outputs, but its "
            f"data gives {dataset.window} x {dataset.features} with {dataset.outputs}; was the data changed?")
    if len(dataset.test) == 0:
        raise ExecuTorchError("the model's data has no held-out test windows to bundle")


# -------------------------------------------------------------------------------------------------- export


@dataclass
class CaseResult:
    method: str
    index: int
    passed: bool
    max_abs_error: float
    error: str | None = None  # what the runtime reported when a case could not run


@dataclass
class BundleReport:
    path: str
    atol: float
    rtol: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def worst(self) -> float:
        return max((c.max_abs_error for c in self.cases), default=0.0)

    def methods(self) -> dict[str, list[CaseResult]]:
        out: dict[str, list[CaseResult]] = {}
        for case in self.cases:
            out.setdefault(case.method, []).append(case)
        return out

    def to_dict(self) -> dict[str, Any]:
        def finite(v: float) -> float | None:  # JSON has no infinity: a case that could not run has no error
            return v if np.isfinite(v) else None

        return {"path": self.path, "passed": self.passed, "worst_abs_error": finite(self.worst), "atol": self.atol,
                "rtol": self.rtol, "cases": [{**dataclasses.asdict(c), "max_abs_error": finite(c.max_abs_error)}
                                             for c in self.cases]}

    def summary(self) -> str:
        lines = []
        for method, cases in self.methods().items():
            ok = sum(c.passed for c in cases)
            worst = max(c.max_abs_error for c in cases)
            lines.append(f"{method}: {ok}/{len(cases)} test cases pass, worst |error| {worst:.3g}")
            lines += [f"  case {c.index}: FAIL, |error| {c.max_abs_error:.3g}" + (f" ({c.error})" if c.error else "")
                      for c in cases if not c.passed]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: {len(self.cases)} test cases, worst |error| {self.worst:.3g} "
                     f"(tolerance {self.atol:g} + {self.rtol:g} x |expected|)")
        return "\n".join(lines)


@dataclass
class ExportResult:
    out_dir: Path
    precision: str
    window: int
    files: dict[str, int]  # file name -> bytes
    digests: dict[str, str]  # file name -> SHA-256 (hex) of model.pte and model.bpte, as model.json records them
    verification: BundleReport
    step_vs_forward: float  # max |forward - T steps| in the runtime, on the first bundled window
    quantization: dict[str, Any] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "precision": self.precision, "window": self.window,
                "files": self.files, "sha256": self.digests, "verification": self.verification.to_dict(),
                "step_vs_forward": self.step_vs_forward, "quantization": self.quantization, "seconds": self.seconds}

    def summary(self) -> str:
        lines = [f"{self.precision.upper()} ExecuTorch bundle in {self.out_dir} ({self.seconds:.1f} s)"]
        lines += [f"  {name}: {size:,} bytes" + (f", sha256 {self.digests[name]}" if name in self.digests else "")
                  for name, size in self.files.items()]
        report = self.verification
        lines.append(f"  bundle check in the ExecuTorch runtime: {'PASS' if report.passed else 'FAIL'}, "
                     f"{len(report.cases)} test cases, worst |error| {report.worst:.3g}")
        lines.append(f"  step x {self.window} vs forward: max |difference| {self.step_vs_forward:.3g}")
        if self.quantization:
            lines += ["  " + line for line in quantization_summary(self.quantization)]
        return "\n".join(lines)


def export_executorch(checkpoint: Checkpoint, out_dir: str | Path, *, quantize: str | None = None,
                      cases: int = DEFAULT_CASES, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                      force: bool = False, dataset: Dataset | None = None,
                      progress: Progress | None = None) -> ExportResult:
    """Write model.pte, model.bpte and model.json for a float checkpoint into out_dir; verify the bundle.

    ``quantize="int8"`` quantizes with PT2E and ExecuTorch's XNNPACKQuantizer (calibrated on training windows)
    and compares the program against FP32 and against the integer reference on held-out windows.
    Nothing is left behind when a step fails.
    """
    with _quiet():
        return _export(checkpoint, Path(out_dir), quantize, cases, atol, rtol, force, dataset, progress)


def _export(checkpoint: Checkpoint, out_dir: Path, quantize: str | None, cases: int, atol: float, rtol: float,
            force: bool, dataset: Dataset | None, progress: Progress | None) -> ExportResult:
    start = time.monotonic()
    say = _progress(progress, start)
    precision = quantize or "fp32"
    if precision not in PRECISIONS:
        raise ExecuTorchError(f"unknown quantization {quantize!r}; choose int8 (or none for FP32)")
    if cases < 1:
        raise ExecuTorchError(f"a bundle needs at least one test case (got {cases})")
    _check_out_dir(out_dir, force)
    check_window(checkpoint)
    say("loading the model's data")
    dataset = dataset or checkpoint.dataset()
    check_matches_data(checkpoint, dataset)
    model = checkpoint.model.eval()
    config = checkpoint.config
    cell = StepCell(model)
    step_module: nn.Module = cell
    quant_info: dict[str, Any] | None = None
    if precision == "int8":
        calib = _subset(dataset.inputs(dataset.train), CALIBRATION_WINDOWS)
        say(f"quantizing with PT2E (XNNPACKQuantizer, per-tensor int8), calibrating on {len(calib)} training windows")
        step_module = quantize_step(cell, config.hidden_sizes, calib)
        quant_info = {"scheme": "PT2E XNNPACKQuantizer: int8 weights (per tensor, symmetric) and activations "
                                "(per tensor, min/max calibration); sigmoid and tanh in float",
                      "calibration_windows": len(calib)}

    say(f"exporting `forward` (window {config.window}) and `step`")
    x_example = torch.zeros(1, config.window, config.input_size)
    step_example = (torch.zeros(1, config.input_size), *zero_state(config.hidden_sizes))
    programs = {
        "forward": torch.export.export(WindowProgram(step_module, config.hidden_sizes, config.outputs), (x_example,)),
        "step": torch.export.export(StepProgram(step_module), step_example),
    }
    say("lowering to the ExecuTorch edge dialect")
    program = _to_executorch(programs)

    test_x = dataset.inputs(dataset.test)
    picked = np.unique(np.linspace(0, len(test_x) - 1, min(cases, len(test_x))).round().astype(int))
    say(f"bundling {len(picked)} held-out test windows with eager PyTorch outputs")
    eager = _eager_float(model) if precision == "fp32" else _eager_converted(step_module, config.hidden_sizes)
    suites = _test_suites(eager, test_x[picked])
    bundle = _bundle(program, suites)

    pte = bytes(program.buffer)
    tmp = _temp_dir(out_dir)
    try:
        (tmp / PTE_NAME).write_bytes(pte)
        (tmp / BPTE_NAME).write_bytes(bundle)
        say("verifying the bundle in the ExecuTorch runtime")
        # The bytes just written, not read back: they are what the digests in model.json will describe.
        report = _verify(bundle, str(tmp / BPTE_NAME), atol, rtol)
        if not report.passed:
            raise ExecuTorchError(f"the bundle fails its own test cases in the runtime:\n{report.summary()}")
        runtime = RuntimeModel(pte, str(tmp / PTE_NAME))
        step_gap = float(np.abs(runtime.forward(test_x[picked[0]]) - runtime.stream(test_x[picked[0]])).max())
        if quant_info is not None:
            say(f"comparing INT8 with FP32 and the integer reference on {min(len(test_x), COMPARISON_WINDOWS)} "
                "held-out windows")
            quant_info.update(compare_int8(runtime, checkpoint, dataset))
        files = {PTE_NAME: len(pte), BPTE_NAME: len(bundle)}
        digests = {PTE_NAME: hashlib.sha256(pte).hexdigest(), BPTE_NAME: hashlib.sha256(bundle).hexdigest()}
        sidecar = _sidecar(checkpoint, dataset, precision, files, digests,
                           {m: len(c) for m, c in report.methods().items()}, atol, rtol, quant_info)
        for plan in program.executorch_program.execution_plan:  # what a runtime build must provide
            sidecar["methods"][plan.name]["operators"] = sorted(
                {op.name + (f".{op.overload}" if op.overload else "") for op in plan.operators})
            sidecar["methods"][plan.name]["planned_memory_bytes"] = int(sum(plan.non_const_buffer_sizes))
        (tmp / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
        files[SIDECAR_NAME] = (tmp / SIDECAR_NAME).stat().st_size
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.path = str(out_dir / BPTE_NAME)
    say("done")
    return ExportResult(out_dir, precision, config.window, files, digests, report, step_gap, quant_info,
                        time.monotonic() - start)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back the deprecation chatter that torch, torchao and ExecuTorch print while exporting (not errors)."""
    loggers = [logging.getLogger(name) for name in ("torch.utils._pytree", "torchao")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _progress(progress: Progress | None, start: float) -> Progress:
    def say(message: str) -> None:
        if progress:
            progress(f"[{time.monotonic() - start:5.1f}s] {message}")
    return say


def _subset(x: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` windows, evenly spread (deterministic)."""
    if len(x) <= limit:
        return x
    return x[np.linspace(0, len(x) - 1, limit).round().astype(int)]


def quantize_step(cell: StepCell, hidden_sizes: Sequence[int], calibration: np.ndarray) -> nn.Module:
    """PT2E int8 of the step cell with ExecuTorch's XNNPACKQuantizer, calibrated by stepping through windows."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if len(calibration) == 0:
        raise ExecuTorchError("no training windows to calibrate on")
    # The shipped config with min/max activation ranges (its default histogram observer is slow on long windows),
    # the calibration that tinylstm's own quantizer uses too.
    config = get_symmetric_quantization_config()
    activation = dataclasses.replace(config.input_activation,
                                     observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    batch = torch.export.Dim("batch", min=1, max=max(2, len(calibration)))
    example = (torch.zeros(2, cell.input_proj[0].in_features), *zero_state(hidden_sizes, 2))
    exported = torch.export.export(cell, example, dynamic_shapes=({0: batch}, tuple({0: batch} for _ in example[1:])))
    prepared = prepare_pt2e(exported.module(), XNNPACKQuantizer().set_global(config))
    x = torch.from_numpy(np.ascontiguousarray(calibration))
    state = zero_state(hidden_sizes, len(x))
    with torch.no_grad():
        for t in range(x.shape[1]):
            state = list(prepared(x[:, t], *state)[1:])
    return convert_pt2e(prepared)


def _to_executorch(programs: dict[str, torch.export.ExportedProgram]) -> Any:
    from executorch.exir import to_edge

    _register_kernels()  # the out-variants of quantize/dequantize that lowering an int8 program needs
    return to_edge(programs).to_executorch()


# ------------------------------------------------------------------------------------------------ test cases


# For a window x [1, T, F]: the state after T - 1 steps, then the output and state after all T steps.
Trajectory = tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]


def _eager_float(model: LSTMModel) -> Callable[[torch.Tensor], Trajectory]:
    """From the model's own nn.LSTM layers and head."""

    def states(x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        v = x
        for lstm in model.lstms:
            if x.shape[1] == 0:
                h = c = torch.zeros(x.shape[0], lstm.hidden_size)
            else:
                v, (h, c) = lstm(v)
                h, c = h[0], c[0]
            out += [h, c]
        return out

    def run(x: torch.Tensor) -> Trajectory:
        with torch.no_grad():
            before, after = states(x[:, :-1]), states(x)
            return before, model.head(after[-2]), after

    return run


def _eager_converted(step: nn.Module, hidden_sizes: Sequence[int]) -> Callable[[torch.Tensor], Trajectory]:
    """From the PT2E-converted step module, stepped eagerly."""

    def run(x: torch.Tensor) -> Trajectory:
        state = zero_state(hidden_sizes, x.shape[0])
        before = state
        with torch.no_grad():
            for t in range(x.shape[1]):
                before = state
                y, *state = step(x[:, t], *state)
        return before, y, state

    return run


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor with ordinary row-major strides (what the runtime and a bundle accept)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A dense copy with ordinary strides (a bundle cannot hold broadcast tensors)."""
    return _tensor(t.detach().numpy())


def _test_suites(eager: Callable[[torch.Tensor], Trajectory], windows: np.ndarray) -> list[Any]:
    """forward: whole windows; step: the step that completes each window, from the state after the steps before."""
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite

    forward, step = [], []
    for window in windows:
        x = _tensor(window[None])
        before, y, after = eager(x)
        forward.append(MethodTestCase(inputs=(x,), expected_outputs=(_plain(y),)))
        step.append(MethodTestCase(inputs=(_plain(x[:, -1]), *map(_plain, before)),
                                   expected_outputs=(_plain(y), *map(_plain, after))))
    return [MethodTestSuite("forward", forward), MethodTestSuite("step", step)]


def _bundle(program: Any, suites: list[Any]) -> bytes:
    from executorch.devtools.bundled_program.core import BundledProgram
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    return serialize_from_bundled_program_to_flatbuffer(BundledProgram(program, suites))


# --------------------------------------------------------------------------------------------------- runtime


def _register_kernels() -> None:
    """Register every kernel library a tinylstm program can need with this process's ExecuTorch runtime.

    A program using an operator the runtime lacks fails to load (an int8 program needs the quantized kernels);
    the libraries register themselves on import, so a process that never lowered a program must import them.
    """
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    for namespace, module in _KERNEL_LIBRARIES.items():
        importlib.import_module(module)
        if not any(name.startswith(f"{namespace}::") for name in _get_operator_names()):
            raise ExecuTorchError(f"the ExecuTorch kernels for {namespace}:: operators did not load (import {module} "
                                  "failed); reinstall executorch")


def _load_program(data: bytes, name: str) -> Any:
    """A program (checked bytes) in the ExecuTorch runtime, with every kernel it can need registered first."""
    from executorch.runtime import Runtime

    _register_kernels()
    try:
        return Runtime.get().load_program(data)
    except (RuntimeError, ValueError) as e:
        raise ExecuTorchError(f"{name}: the ExecuTorch runtime cannot load the program ({_one_line(e)})") from None


def _load_method(program: Any, method: str, name: str) -> Any:
    try:
        loaded = program.load_method(method)
    except (RuntimeError, ValueError) as e:
        raise ExecuTorchError(f"{name}: the ExecuTorch runtime cannot load method `{method}` ({_one_line(e)})") \
            from None
    if loaded is None:
        raise ExecuTorchError(f"{name}: the program has no `{method}` method")
    return loaded


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class RuntimeModel:
    """A tinylstm program in the ExecuTorch runtime on the host, with numpy in and out (batch 1).

    Open a .pte with ``RuntimeModel.load``, which checks it against its sidecar first.
    """

    def __init__(self, program: bytes, name: str) -> None:
        loaded = _load_program(program, name)
        self._forward = _load_method(loaded, "forward", name)
        self._step = _load_method(loaded, "step", name)
        meta = self._step.metadata
        self.state_shapes = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(1, meta.num_inputs())]

    @classmethod
    def load(cls, path: str | Path, *, unverified: bool = False) -> RuntimeModel:
        """The .pte at path, after checking it against the SHA-256 in the model.json beside it (see read_checked)."""
        with _quiet():
            return cls(read_checked(path, unverified=unverified), str(path))

    def forward(self, window: np.ndarray) -> np.ndarray:
        """The output [O] for one normalised window [T, F]."""
        return self._forward.execute((_tensor(window[None]),))[0][0].numpy()

    def step(self, x_t: np.ndarray, state: list[torch.Tensor]) -> tuple[np.ndarray, list[torch.Tensor]]:
        """One step: the output [O] and the new state, for a normalised sample [F] and the previous state."""
        y, *new_state = self._step.execute((_tensor(x_t[None]), *state))
        return y[0].numpy(), list(new_state)

    def stream(self, window: np.ndarray) -> np.ndarray:
        """The output after stepping through a window [T, F] from zero state."""
        state = [torch.zeros(shape) for shape in self.state_shapes]
        y = np.zeros(0, dtype=np.float32)
        for x_t in window:
            y, state = self.step(x_t, state)
        return y


def verify_bundle(path: str | Path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, *,
                  unverified: bool = False) -> BundleReport:
    """Run every test case of a .bpte in the ExecuTorch runtime; pass or fail by ExecuTorch's own check.

    The file is first checked against the SHA-256 in the model.json beside it (see read_checked). A case passes
    when every output is within atol + rtol * |expected| of the bundled expected output.
    """
    with _quiet():
        return _verify(read_checked(path, unverified=unverified), str(path), atol, rtol)


def _verify(data: bytes, name: str, atol: float, rtol: float) -> BundleReport:
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    cases, program_bytes = _read_bundle(data, name)
    program = _load_program(program_bytes, name)
    try:
        bundle = _load_bundled_program_from_buffer(data)
    except RuntimeError as e:
        raise ExecuTorchError(f"{name}: the ExecuTorch runtime cannot load the bundled program ({_one_line(e)})") \
            from None
    report = BundleReport(name, atol, rtol)
    for method_name, method_cases in cases.items():
        method = _load_method(program, method_name, name)
        for index, (inputs, expected) in enumerate(method_cases):
            problem = None
            try:
                outputs = bundle.verify_result_with_bundled_expected_output(method_name, index, rtol, atol)
                passed = True
            except RuntimeError as e:
                passed, problem = False, str(e)
                try:  # run the case directly, to measure how far off it is
                    outputs = method.execute([torch.from_numpy(x.copy()) for x in inputs])
                except RuntimeError as e2:
                    outputs, problem = [], str(e2)
            error = _max_abs_error([o.numpy() for o in outputs], expected)
            report.cases.append(CaseResult(method_name, index, passed, error, None if passed else problem))
    return report


def _max_abs_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
        return float("inf")
    return max((float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max(initial=0.0))
                for g, w in zip(got, want, strict=True)), default=0.0)


Case = tuple[list[np.ndarray], list[np.ndarray]]


def _read_bundle(data: bytes, path: str) -> tuple[dict[str, list[Case]], bytes]:
    """The (inputs, expected outputs) of every test case per method, and the program, read back from a .bpte."""
    from executorch.devtools.bundled_program.serialize import deserialize_from_flatbuffer_to_bundled_program

    if data[4:8] != b"BP08":  # the BundledProgram flatbuffer identifier
        raise ExecuTorchError(f"{path}: not an ExecuTorch bundled program (.bpte)")
    try:
        bundle = deserialize_from_flatbuffer_to_bundled_program(data)
        cases = {suite.method_name: [([_array(v.val) for v in case.inputs],
                                      [_array(v.val) for v in case.expected_outputs]) for case in suite.test_cases]
                 for suite in bundle.method_test_suites}
    except Exception as e:  # flatc and the JSON reader fail in many ways on a damaged file
        raise ExecuTorchError(f"{path}: damaged or unsupported bundled program ({_one_line(e)})") from None
    if not any(cases.values()) or not bundle.program:
        raise ExecuTorchError(f"{path}: damaged or empty bundled program (no program or no test cases)")
    return cases, bytes(bundle.program)


def _array(value: Any) -> np.ndarray:
    """A bundled tensor as numpy."""
    dtype = _SCALAR_TYPES.get(int(value.scalar_type)) if hasattr(value, "scalar_type") else None
    if dtype is None:
        raise ValueError("a test case holds a value that is not a supported tensor")
    return np.frombuffer(bytes(value.data), dtype=dtype).reshape(value.sizes)


# ---------------------------------------------------------------------------------------------- comparisons


def compare_int8(runtime: RuntimeModel, checkpoint: Checkpoint, dataset: Dataset) -> dict[str, Any]:
    """The int8 program's outputs against FP32 (eager PyTorch) and the integer reference on held-out windows.

    Outputs are compared in the model's output units: class scores, or the target's original units.
    """
    from tinylstm.quantize import QuantConfig, post_training_quantize

    split = dataset.test
    idx = np.linspace(0, len(split) - 1, min(len(split), COMPARISON_WINDOWS)).round().astype(int)
    idx = np.unique(idx)
    subset = dataclasses.replace(split, **{f.name: getattr(split, f.name)[idx] for f in dataclasses.fields(split)
                                           if getattr(split, f.name) is not None})
    inputs = dataset.inputs(subset)
    et = np.stack([runtime.forward(w) for w in inputs])
    fp32 = evaluate.fp32_outputs(checkpoint.model, dataset, subset)
    reference = evaluate.int8_outputs(post_training_quantize(checkpoint.model, dataset, QuantConfig()), dataset,
                                      subset)
    if dataset.task != "classification":
        et = dataset.to_units(et)
    units = "class scores" if dataset.task == "classification" else f"{', '.join(dataset.target_names)} units"
    return {
        "windows": int(len(idx)),
        "units": units,
        "executorch_int8_vs_fp32": _gap(et, fp32, dataset.task),
        "executorch_int8_vs_reference": _gap(et, reference, dataset.task),
        "reference_vs_fp32": _gap(reference, fp32, dataset.task),
    }


def _gap(a: np.ndarray, b: np.ndarray, task: str) -> dict[str, float]:
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    out = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    if task == "classification":
        out["same_label"] = float((np.argmax(a, axis=1) == np.argmax(b, axis=1)).mean())
    return out


def quantization_summary(q: dict[str, Any]) -> list[str]:
    lines = [f"INT8 ({q['scheme']})", f"calibrated on {q['calibration_windows']} training windows; "
             f"compared on {q['windows']} held-out windows, in {q['units']}:"]
    names = {"executorch_int8_vs_fp32": "ExecuTorch INT8 vs FP32      ",
             "executorch_int8_vs_reference": "ExecuTorch INT8 vs reference ",
             "reference_vs_fp32": "reference INT8 vs FP32       "}
    for key, label in names.items():
        g = q[key]
        line = f"  {label} max |diff| {g['max_abs']:.4g}, mean {g['mean_abs']:.4g}"
        if "same_label" in g:
            line += f", same label {g['same_label']:.1%}"
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------ sidecar


def _sidecar(checkpoint: Checkpoint, dataset: Dataset, precision: str, files: dict[str, int], digests: dict[str, str],
             cases: dict[str, int], atol: float, rtol: float, quant: dict[str, Any] | None) -> dict[str, Any]:
    config = checkpoint.config
    norm = checkpoint.input_norm
    state = [{"name": f"{kind}_{n + 1}", "shape": [1, size]}
             for n, size in enumerate(config.hidden_sizes) for kind in ("h", "c")]
    if dataset.task == "classification":
        output = {"meaning": "class scores (logits); the predicted class is the largest", "classes": checkpoint.classes}
    else:
        target = checkpoint.target_norm
        assert target is not None
        output = {"meaning": "normalised predictions of the target; value = y * scale + offset in original units",
                  "targets": checkpoint.target_names, "horizon": dataset.spec.horizon if dataset.task == "forecasting"
                  else 1, "scale": target.scale.tolist(), "offset": target.offset.tolist()}
        if dataset.task == "anomaly":
            output["anomaly"] = ("a point is anomalous when |forecast - actual| (original units) exceeds the "
                                 "threshold")
            output["anomaly_threshold"] = checkpoint.extra.get("anomaly_threshold")
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "precision": precision,
        "task": dataset.task,
        "model": dataclasses.asdict(config),
        "input": {"features": checkpoint.feature_names, "dtype": "float32",
                  "normalisation": {"kind": norm.kind, "offset": norm.offset.tolist(), "scale": norm.scale.tolist(),
                                    "formula": "x_model = (x - offset) / scale, per feature"}},
        "output": output,
        "methods": {
            "forward": {"inputs": [{"name": "x", "shape": [1, config.window, config.input_size]}],
                        "outputs": [{"name": "y", "shape": [1, config.outputs]}]},
            "step": {"inputs": [{"name": "x_t", "shape": [1, config.input_size]}, *state],
                     "outputs": [{"name": "y", "shape": [1, config.outputs]}, *state],
                     "note": "start from zeros; feed each returned h/c back in; after `window` steps y equals "
                             "forward's output"},
        },
        "files": {name: {"bytes": size, "sha256": digests[name]} for name, size in files.items()},
        "bundle": {"test_cases": cases, "source": "held-out test windows", "expected_outputs": "eager PyTorch",
                   "atol": atol, "rtol": rtol},
    }
    if quant is not None:
        sidecar["quantization"] = quant
    return sidecar


def read_checked(path: str | Path, *, unverified: bool = False) -> bytes:
    """The bytes of a .pte or .bpte, once they match the SHA-256 that the model.json beside it records.

    Every load into the runtime goes through here, and the runtime then gets these very bytes. The runtime checks
    a program's structure but not its data: changed weights run with wrong outputs, and some damage crashes the
    process. ``unverified=True`` skips the check (for a file without its sidecar) and accepts that risk.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExecuTorchError(f"{path}: cannot read ({e.strerror or e})") from None
    if unverified:
        return data
    digest = _recorded_digest(path)
    if hashlib.sha256(data).hexdigest() != digest:
        raise ExecuTorchError(f"{path} was modified or corrupted: its SHA-256 differs from the one in "
                              f"{path.parent / SIDECAR_NAME}; export the bundle again")
    return data


def _recorded_digest(path: Path) -> str:
    """The SHA-256 (hex) that the sidecar beside path records for it; ExecuTorchError for any doubt."""
    sidecar = path.parent / SIDECAR_NAME
    if not sidecar.exists():
        raise ExecuTorchError(f"{path}: no {SIDECAR_NAME} beside it to check it against; keep the bundle's files "
                              "together (or load it unchecked with --unverified, at the risk of a crash)")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except OSError as e:
        raise ExecuTorchError(f"{sidecar}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested beyond the parser's depth
        raise ExecuTorchError(f"{sidecar}: not valid JSON ({_one_line(e)}); export the bundle again") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ExecuTorchError(f"{sidecar}: not a tinylstm ExecuTorch sidecar (no \"format\": \"{SIDECAR_FORMAT}\")")
    if meta.get("version") != SIDECAR_VERSION:
        raise ExecuTorchError(f"{sidecar}: version {meta.get('version')!r}, this tinylstm reads version "
                              f"{SIDECAR_VERSION} (with SHA-256 digests); export the bundle again")
    files = meta.get("files")
    entry = files.get(path.name) if isinstance(files, dict) else None
    digest = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ExecuTorchError(f"{sidecar}: records no SHA-256 for {path.name} (files.{path.name}.sha256)")
    return digest


# ------------------------------------------------------------------------------------------------ files


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExecuTorchError(f"{out_dir} exists and is not a directory")
    existing = [name for name in (PTE_NAME, BPTE_NAME, SIDECAR_NAME) if (out_dir / name).exists()]
    if existing and not force:
        raise ExecuTorchError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite")


def _temp_dir(out_dir: Path) -> Path:
    parent = out_dir if out_dir.is_dir() else out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".executorch-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """A new directory is renamed into place whole; into an existing one, each file is replaced atomically."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    for name in (PTE_NAME, BPTE_NAME, SIDECAR_NAME):
        os.replace(tmp / name, out_dir / name)
