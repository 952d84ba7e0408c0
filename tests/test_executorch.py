"""ExecuTorch bundles: the exported programs against eager PyTorch, the bundle check, and bad input.

Truth here is eager PyTorch (the checkpoint's own nn.LSTM model, or the PT2E-converted model run eagerly) and
the ExecuTorch runtime's own loader; the export's reports are checked against what the tests measure themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tinylstm import qmodel
from tinylstm.cli import main
from tinylstm.data import DataSpec, load_dataset
from tinylstm.executorch_export import (
    BPTE_NAME,
    PTE_NAME,
    SIDECAR_NAME,
    ExecuTorchError,
    StepCell,
    WindowProgram,
    export_executorch,
    load_float_checkpoint,
    quantize_step,
    verify_bundle,
)
from tinylstm.quantize import QuantConfig, post_training_quantize
from tinylstm.train import TrainConfig, save_checkpoint, train_model

HIDDEN = [8, 4]
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, stdin: str | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """The tinylstm CLI (or a script) in a fresh Python process, on this tree's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = ["-c", script] if script else ["-m", "tinylstm.cli"]
    return subprocess.run([sys.executable, *command, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=600)


def _train(spec: DataSpec, path):
    dataset = load_dataset(spec)
    checkpoint, _ = train_model(dataset, HIDDEN, TrainConfig(epochs=2, patience=2))
    save_checkpoint(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 2-layer classifier on the bundled motion windows (6 features, 100 steps)."""
    return _train(DataSpec.for_dataset("basic_motions"), tmp_path_factory.mktemp("cls") / "model.pt")


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    """A 2-layer forecaster on a small noisy sine series (window 12)."""
    root = tmp_path_factory.mktemp("fc")
    rng = np.random.default_rng(1)
    t = np.arange(240)
    value = 20 + 5 * np.sin(t / 6) + rng.normal(0, 0.3, len(t))
    (root / "series.csv").write_text("t,value\n" + "".join(f"{a},{b:.4f}\n" for a, b in zip(t, value, strict=True)))
    spec = DataSpec(task="forecasting", path=str(root / "series.csv"), features=["value"], target="value", window=12)
    return _train(spec, root / "model.pt")


@pytest.fixture(scope="module")
def fp32_bundle(classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "bundle"
    result = CliRunner().invoke(main, ["export", "--format", "executorch", "--model", str(classifier),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def int8_export(forecaster, tmp_path_factory):
    """An int8 bundle exported by the CLI in a process of its own: (directory, the export's summary)."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    result = _cli("export", "--format", "executorch", "--quantize", "int8", "--model", str(forecaster),
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def _runtime(path):
    import executorch.kernels.quantized  # noqa: F401  (the int8 program's quantize/dequantize kernels)
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    return program.load_method("forward"), program.load_method("step")


def _held_out(checkpoint, n):
    dataset = checkpoint.dataset()
    x = dataset.inputs(dataset.test)[:n]
    return [torch.from_numpy(np.array(w[None], dtype=np.float32, order="C")) for w in x]


def _stepped(step, x, hidden_sizes):
    """Step a window [1, T, F] through the runtime from zero state; the last output and the final state."""
    state = [torch.zeros(1, h) for h in hidden_sizes for _ in range(2)]
    for t in range(x.shape[1]):
        y, *state = step.execute([x[:, t].contiguous(), *state])
    return y, state


@pytest.mark.slow
def test_fp32_forward_matches_eager_and_stepping_matches_forward(classifier, fp32_bundle):
    checkpoint = load_float_checkpoint(classifier)
    model = checkpoint.model
    forward, step = _runtime(fp32_bundle / PTE_NAME)
    for x in _held_out(checkpoint, 4):
        with torch.no_grad():
            eager = model(x)
        y = forward.execute([x])[0]
        assert float((y - eager).abs().max()) < 1e-5
        y_step, state = _stepped(step, x, HIDDEN)
        assert float((y_step - y).abs().max()) < 1e-6
        # The streamed state is the state nn.LSTM ends a window with, layer by layer.
        v = x
        with torch.no_grad():
            for n, lstm in enumerate(model.lstms):
                v, (h, c) = lstm(v)
                assert float((state[2 * n] - h[0]).abs().max()) < 1e-5
                assert float((state[2 * n + 1] - c[0]).abs().max()) < 1e-5


@pytest.mark.slow
def test_int8_forward_matches_eager_quantized_model_and_stepping_matches_forward(forecaster, int8_export):
    checkpoint = load_float_checkpoint(forecaster)
    dataset = checkpoint.dataset()
    # The same PT2E model, calibrated on the same (all) training windows, run eagerly in PyTorch.
    qstep = quantize_step(StepCell(checkpoint.model), HIDDEN, dataset.inputs(dataset.train))
    eager = WindowProgram(qstep, HIDDEN, checkpoint.config.outputs)
    forward, step = _runtime(int8_export[0] / PTE_NAME)
    spread = float(np.ptp(dataset.targets(dataset.test)))
    for x in _held_out(checkpoint, 4):
        with torch.no_grad():
            want, fp32 = eager(x), checkpoint.model(x)
        y = forward.execute([x])[0]
        assert float((y - want).abs().max()) < 1e-5
        assert float((_stepped(step, x, HIDDEN)[0] - y).abs().max()) < 1e-6
        assert float((y - fp32).abs().max()) < 0.1 * spread  # int8, yet still the same model


@pytest.mark.slow
def test_int8_report_states_the_measured_errors(forecaster, int8_export):
    checkpoint = load_float_checkpoint(forecaster)
    dataset = checkpoint.dataset()
    forward, _ = _runtime(int8_export[0] / PTE_NAME)
    x = dataset.inputs(dataset.test)
    et = np.stack([forward.execute([torch.from_numpy(np.array(w[None], dtype=np.float32, order="C"))])[0][0].numpy()
                   for w in x])
    with torch.no_grad():
        fp32 = checkpoint.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    scale = float(checkpoint.target_norm.scale[0])
    q = json.loads((int8_export[0] / SIDECAR_NAME).read_text())["quantization"]
    assert q["windows"] == len(x)
    assert q["executorch_int8_vs_fp32"]["max_abs"] == pytest.approx(np.abs(et - fp32).max() * scale, rel=1e-4)
    # Against the integer reference: the tinylstm quantizer's model run by the numpy reference.
    from tinylstm.reference import run_batch

    ref_model = post_training_quantize(checkpoint.model, dataset, QuantConfig())
    ref = ref_model.dequantize_output(run_batch(ref_model, ref_model.quantize_input(dataset.test.x)))
    assert q["executorch_int8_vs_reference"]["max_abs"] == pytest.approx(np.abs(et - ref).max() * scale, rel=1e-4)
    assert f"ExecuTorch INT8 vs reference  max |diff| {q['executorch_int8_vs_reference']['max_abs']:.4g}" in \
        int8_export[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_bundle_verifies_in_the_runtime(which, fp32_bundle, int8_export):
    bpte = (fp32_bundle if which == "fp32" else int8_export[0]) / BPTE_NAME
    result = CliRunner().invoke(main, ["verify-bundle", str(bpte)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    report = verify_bundle(bpte)
    assert {c.method for c in report.cases} == {"forward", "step"}
    assert len(report.cases) == 16 and report.passed


@pytest.mark.slow
def test_int8_bundle_verifies_in_a_fresh_process(int8_export):
    """Exported by one process, verified by another that never lowered a program (no kernels loaded by export)."""
    result = _cli("verify-bundle", str(int8_export[0] / BPTE_NAME))
    assert result.returncode == 0, result.stderr
    assert "PASS: 16 test cases" in result.stdout
    assert "Traceback" not in result.stderr and "not found" not in result.stderr


@pytest.mark.slow
def test_tampered_expected_output_fails(classifier, fp32_bundle, tmp_path):
    checkpoint = load_float_checkpoint(classifier)
    x = _held_out(checkpoint, 1)[0]  # the first bundled window
    with torch.no_grad():
        expected = checkpoint.model(x).numpy().astype(np.float32)
    data = (fp32_bundle / BPTE_NAME).read_bytes()
    assert data.count(expected.tobytes()) >= 1  # forward's expected output (and step's, the same numbers)
    changed = expected.copy()
    changed[0, 0] += 1e-3
    bad = tmp_path / "tampered.bpte"
    bad.write_bytes(data.replace(expected.tobytes(), changed.tobytes()))
    # Unchecked (it has no model.json), the runtime's own comparison finds the changed value.
    result = CliRunner().invoke(main, ["verify-bundle", "--unverified", str(bad)])
    assert result.exit_code == 1
    assert "FAIL" in result.output
    report = verify_bundle(bad, unverified=True)
    failed = [c for c in report.cases if not c.passed]
    assert failed and all(c.index == 0 for c in failed)
    assert max(c.max_abs_error for c in failed) == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.slow
def test_sidecar_describes_the_program(classifier, fp32_bundle):
    checkpoint = load_float_checkpoint(classifier)
    sidecar = json.loads((fp32_bundle / SIDECAR_NAME).read_text())
    assert sidecar["precision"] == "fp32"
    assert sidecar["output"]["classes"] == checkpoint.classes
    assert np.allclose(sidecar["input"]["normalisation"]["offset"], checkpoint.input_norm.offset)
    assert np.allclose(sidecar["input"]["normalisation"]["scale"], checkpoint.input_norm.scale)
    assert sorted(p.name for p in fp32_bundle.iterdir()) == sorted([PTE_NAME, BPTE_NAME, SIDECAR_NAME])
    assert sorted(sidecar["files"]) == sorted([PTE_NAME, BPTE_NAME])
    for name in (PTE_NAME, BPTE_NAME):
        data = (fp32_bundle / name).read_bytes()
        assert sidecar["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    forward, step = _runtime(fp32_bundle / PTE_NAME)
    for method, name in ((forward, "forward"), (step, "step")):
        meta = method.metadata
        described = sidecar["methods"][name]
        assert [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())] == \
            [v["shape"] for v in described["inputs"]]
        assert [list(meta.output_tensor_meta(i).sizes()) for i in range(meta.num_outputs())] == \
            [v["shape"] for v in described["outputs"]]
        assert {"aten::sigmoid.out", "aten::tanh.out"} <= set(described["operators"])
        assert described["planned_memory_bytes"] > 0


@pytest.mark.slow
def test_existing_bundle_is_not_overwritten_without_force(classifier, fp32_bundle):
    before = (fp32_bundle / PTE_NAME).read_bytes()
    result = CliRunner().invoke(main, ["export", "--format", "executorch", "--model", str(classifier),
                                       "--out", str(fp32_bundle)])
    assert result.exit_code != 0 and "--force" in result.output
    assert (fp32_bundle / PTE_NAME).read_bytes() == before


# ------------------------------------------------------------------------------------------------ bad input


def _export_cli(model, out):
    return CliRunner().invoke(main, ["export", "--format", "executorch", "--model", str(model), "--out", str(out)])


def test_quantized_model_is_rejected(forecaster, tmp_path):
    checkpoint = load_float_checkpoint(forecaster)
    npz = qmodel.save(post_training_quantize(checkpoint.model, checkpoint.dataset(), QuantConfig()),
                      tmp_path / "model.npz")
    result = _export_cli(npz, tmp_path / "out")
    assert result.exit_code == 1
    assert "quantized tinylstm model" in result.output and "float checkpoint" in result.output
    assert not (tmp_path / "out").exists()


def test_random_file_is_rejected(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(2000))
    result = _export_cli(junk, tmp_path / "out")
    assert result.exit_code == 1
    assert "not a tinylstm checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("window", [0, 10**7])
def test_window_that_cannot_be_exported_is_rejected(forecaster, tmp_path, window):
    checkpoint = load_float_checkpoint(forecaster)
    checkpoint.model.config.window = window
    path = save_checkpoint(checkpoint, tmp_path / "bad-window.pt")
    result = _export_cli(path, tmp_path / "out")
    assert result.exit_code == 1
    assert f"window is {window} steps" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_window_that_differs_from_the_data_is_rejected(forecaster, tmp_path):
    checkpoint = load_float_checkpoint(forecaster)
    checkpoint.model.config.window = 10
    with pytest.raises(ExecuTorchError, match="10 x 1 windows"):
        export_executorch(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_bundle_rejects_other_files(tmp_path, forecaster):
    cases = [([str(tmp_path / "missing.bpte")], "cannot read"),
             ([str(forecaster)], "no model.json beside it"),
             (["--unverified", str(forecaster)], "not an ExecuTorch bundled program")]
    for args, message in cases:
        result = CliRunner().invoke(main, ["verify-bundle", *args])
        assert result.exit_code == 1
        assert message in result.output and len(result.output.splitlines()) == 1, result.output


def test_quantize_option_needs_the_executorch_format(forecaster, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(forecaster), "--out", str(tmp_path / "o"),
                                       "--quantize", "int8"])
    assert result.exit_code == 2
    assert "--format executorch" in result.output


@pytest.mark.slow
def test_damaged_bundle_is_rejected(fp32_bundle, tmp_path):
    data = (fp32_bundle / BPTE_NAME).read_bytes()
    cut = tmp_path / "cut.bpte"
    cut.write_bytes(data[: len(data) // 3])
    result = CliRunner().invoke(main, ["verify-bundle", "--unverified", str(cut)])
    assert result.exit_code == 1
    assert "bundled program" in result.output


# ------------------------------------------------------------------------------------------------ integrity

# Runs one case per line of stdin in this one process and prints one JSON line per case: the CLI's exit code and
# output, any exception that escaped the CLI, and for a .pte what RuntimeModel.load made of it. A crash (abort,
# segfault) ends the process, so the number of lines printed tells which case it was.
_CASE_RUNNER = """
import json, sys
from click.testing import CliRunner
from tinylstm.cli import main
from tinylstm.executorch_export import ExecuTorchError, RuntimeModel

for line in sys.stdin:
    case = json.loads(line)
    result = CliRunner().invoke(main, case["args"])
    escaped = None if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
    load = None
    if case["pte"]:
        try:
            RuntimeModel.load(case["pte"])
            load = "loaded"
        except ExecuTorchError as e:
            load = "error: " + str(e)
        except Exception as e:
            load = "escaped: " + repr(e)
    print(json.dumps({"exit": result.exit_code, "output": result.output, "escaped": escaped, "load": load}),
          flush=True)
"""


def _damaged(data: bytes, other: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random single-byte flip, truncation or splice of data (never data itself)."""
    kind = str(rng.choice(["flip", "truncate", "splice", "cross-splice"]))
    at = int(rng.integers(len(data)))
    if kind == "flip":
        changed = bytearray(data)
        changed[at] ^= int(rng.integers(1, 256))
        return f"flip byte {at}", bytes(changed)
    if kind == "truncate":
        return f"truncate to {at} bytes", data[:at]
    if kind == "splice":  # a run of the file's own bytes inserted elsewhere
        start, length = int(rng.integers(len(data))), int(rng.integers(1, 512))
        return f"splice {length} bytes from {start} at {at}", data[:at] + data[start:start + length] + data[at:]
    start = int(rng.integers(len(other)))  # the head of this file, the tail of the other one
    return f"bytes 0-{at} then the other file from {start}", data[:at] + other[start:]


def _sidecar_damage(text: str) -> list[tuple[str, str | bytes]]:
    """model.json made malformed, with wrong types or with missing keys along what a loader reads."""
    meta = json.loads(text)
    out: list[tuple[str, str | bytes]] = [("empty", ""), ("not UTF-8", b'\xff\xfe{"format": 1}'),
                                          ("cut in half", text[: len(text) // 2]),
           ("nested 100000 deep", "[" * 100_000), ("a list", "[]"), ("a number", "7"), ("null", "null")]
    entry = meta["files"][BPTE_NAME]
    edits = {
        "format": [None, 1, "other", []], "version": [None, 1, 3, "2", 2.5, True], "files": [None, [], "x", 5],
        f"files/{BPTE_NAME}": [None, 5, "x", [entry["sha256"]]],
        f"files/{BPTE_NAME}/sha256": [None, 5, [], "", entry["sha256"][:-1], entry["sha256"].upper(),
                                      entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0" else "1")],
    }
    for key, values in edits.items():
        *parents, last = key.split("/")
        for value in [*values, "<missing>"]:
            changed = json.loads(text)
            node = changed
            for parent in parents:
                node = node[parent]
            if value == "<missing>":
                del node[last]
            else:
                node[last] = value
            out.append((f"{key} = {value!r}", json.dumps(changed)))
    return out


def _write_case(root: Path, bundle: Path, name: str, data: bytes | None = None, sidecar: str | bytes | None = None,
                keep_sidecar: bool = True) -> Path:
    """A bundle directory with one file replaced; returns it."""
    root.mkdir()
    for file in (PTE_NAME, BPTE_NAME):
        (root / file).write_bytes(data if data is not None and file == name else (bundle / file).read_bytes())
    if keep_sidecar:
        text = sidecar if sidecar is not None else (bundle / SIDECAR_NAME).read_text()
        (root / SIDECAR_NAME).write_bytes(text.encode() if isinstance(text, str) else text)
    return root


@pytest.mark.slow
def test_damaged_files_give_one_line_errors_never_crashes(fp32_bundle, tmp_path):
    """200 random flips, truncations and splices of model.pte and model.bpte, and damaged model.json files, given
    to verify-bundle and RuntimeModel.load in a separate process: each is a one-line error, exit 1."""
    rng = np.random.default_rng(20240607)
    files = {name: (fp32_bundle / name).read_bytes() for name in (PTE_NAME, BPTE_NAME)}
    sidecar = (fp32_bundle / SIDECAR_NAME).read_text()
    cases = []  # (description, file to give the CLI, .pte for RuntimeModel.load or None, what the error must say)
    for n in range(200):
        name, other = (PTE_NAME, BPTE_NAME) if n % 2 == 0 else (BPTE_NAME, PTE_NAME)
        if n == 0:  # a flip that made `step` segfault when nothing checked the file
            changed = bytearray(files[name])
            changed[1000] ^= 0xFF
            what, data = "flip byte 1000", bytes(changed)
        else:
            what, data = _damaged(files[name], files[other], rng)
        root = _write_case(tmp_path / f"case{n}", fp32_bundle, name, data=data)
        cases.append((f"{name}: {what}", root / name, root / PTE_NAME if name == PTE_NAME else None,
                      f"{root / name} was modified or corrupted"))
    for n, (what, text) in enumerate(_sidecar_damage(sidecar)):
        root = _write_case(tmp_path / f"sidecar{n}", fp32_bundle, SIDECAR_NAME, sidecar=text)
        pte = None if what.startswith(f"files/{BPTE_NAME}") else root / PTE_NAME  # model.pte's entry is intact
        cases.append((f"{SIDECAR_NAME}: {what}", root / BPTE_NAME, pte, str(root / SIDECAR_NAME)))
    root = _write_case(tmp_path / "sidecar-directory", fp32_bundle, SIDECAR_NAME, keep_sidecar=False)
    (root / SIDECAR_NAME).mkdir()
    cases.append(("model.json is a directory", root / BPTE_NAME, root / PTE_NAME, f"{root / SIDECAR_NAME}: cannot"))
    root = _write_case(tmp_path / "alone", fp32_bundle, SIDECAR_NAME, keep_sidecar=False)
    cases.append(("no model.json", root / BPTE_NAME, root / PTE_NAME, "no model.json beside it"))

    stdin = "".join(json.dumps({"args": ["verify-bundle", str(path)], "pte": pte and str(pte)}) + "\n"
                    for _, path, pte, _ in cases)
    run = _cli(stdin=stdin, script=_CASE_RUNNER)
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 0 and len(results) == len(cases), \
        f"the process ended with {run.returncode} on case {len(results)}: {cases[len(results)][0]}\n{run.stderr}"
    for (what, _, _, message), result in zip(cases, results, strict=True):
        assert result["escaped"] is None, (what, result)
        assert result["exit"] == 1 and result["output"].count("\n") == 1, (what, result)
        assert result["output"].startswith("Error: ") and message in result["output"], (what, result)
        if result["load"] is not None:
            assert result["load"].startswith("error: ") and message.split(":")[0] in result["load"], (what, result)

    # A sample through the real command line: one line on stderr, nothing on stdout, exit 1.
    for what, path, _, message in cases[:4] + cases[200:202] + cases[-2:]:
        result = _cli("verify-bundle", str(path))
        assert result.returncode == 1 and result.stdout == "", (what, result)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, (what, result.stderr)
        assert message in result.stderr, (what, result.stderr)


@pytest.mark.slow
def test_random_flips_of_the_sidecar_either_pass_or_fail_cleanly(fp32_bundle, tmp_path):
    """A flip in model.json away from the digests leaves the files checkable; anywhere else it is a clean error."""
    rng = np.random.default_rng(7)
    sidecar = (fp32_bundle / SIDECAR_NAME).read_bytes()
    cases = []
    for n in range(20):
        changed = bytearray(sidecar)
        changed[int(rng.integers(len(sidecar)))] ^= int(rng.integers(1, 256))
        root = _write_case(tmp_path / f"case{n}", fp32_bundle, SIDECAR_NAME, sidecar=bytes(changed))
        cases.append(root)
    stdin = "".join(json.dumps({"args": ["verify-bundle", str(root / BPTE_NAME)], "pte": str(root / PTE_NAME)}) + "\n"
                    for root in cases)
    run = _cli(stdin=stdin, script=_CASE_RUNNER)
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 0 and len(results) == len(cases), run.stderr
    for root, result in zip(cases, results, strict=True):
        assert result["escaped"] is None, result
        # A flip in a digest makes that file's check fail; one in the format, version or keys, the sidecar's.
        clean_errors = (f"{root / SIDECAR_NAME}: ", f"{root / BPTE_NAME} was modified",
                        f"{root / PTE_NAME} was modified")
        if result["exit"] == 0:
            assert "PASS: 16 test cases" in result["output"], result
        else:
            assert result["exit"] == 1 and result["output"].count("\n") == 1, result
            assert result["output"].removeprefix("Error: ").startswith(clean_errors), result
        assert result["load"] == "loaded" or result["load"].removeprefix("error: ").startswith(clean_errors), result
