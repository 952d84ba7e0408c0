"""ExecuTorch bundles: the exported programs against eager PyTorch, the bundle check, and bad input.

Truth here is eager PyTorch (the checkpoint's own nn.LSTM model, or the PT2E-converted model run eagerly) and
the ExecuTorch runtime's own loader; the export's reports are checked against what the tests measure themselves.
"""

from __future__ import annotations

import json

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
    out = tmp_path_factory.mktemp("int8") / "bundle"
    return export_executorch(load_float_checkpoint(forecaster), out, quantize="int8")


def _runtime(path):
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
    forward, step = _runtime(int8_export.out_dir / PTE_NAME)
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
    forward, _ = _runtime(int8_export.out_dir / PTE_NAME)
    x = dataset.inputs(dataset.test)
    et = np.stack([forward.execute([torch.from_numpy(np.array(w[None], dtype=np.float32, order="C"))])[0][0].numpy()
                   for w in x])
    with torch.no_grad():
        fp32 = checkpoint.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    scale = float(checkpoint.target_norm.scale[0])
    q = int8_export.quantization
    assert q["windows"] == len(x)
    assert q["executorch_int8_vs_fp32"]["max_abs"] == pytest.approx(np.abs(et - fp32).max() * scale, rel=1e-4)
    # Against the integer reference: the tinylstm quantizer's model run by the numpy reference.
    from tinylstm.reference import run_batch

    ref_model = post_training_quantize(checkpoint.model, dataset, QuantConfig())
    ref = ref_model.dequantize_output(run_batch(ref_model, ref_model.quantize_input(dataset.test.x)))
    assert q["executorch_int8_vs_reference"]["max_abs"] == pytest.approx(np.abs(et - ref).max() * scale, rel=1e-4)
    assert "INT8 vs reference" in int8_export.summary()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_bundle_verifies_in_the_runtime(which, fp32_bundle, int8_export):
    bpte = (fp32_bundle if which == "fp32" else int8_export.out_dir) / BPTE_NAME
    result = CliRunner().invoke(main, ["verify-bundle", str(bpte)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    report = verify_bundle(bpte)
    assert {c.method for c in report.cases} == {"forward", "step"}
    assert len(report.cases) == 16 and report.passed


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
    result = CliRunner().invoke(main, ["verify-bundle", str(bad)])
    assert result.exit_code == 1
    assert "FAIL" in result.output
    report = verify_bundle(bad)
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
    for name in (PTE_NAME, BPTE_NAME):
        assert sidecar["files"][name] == (fp32_bundle / name).stat().st_size
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
    for path in (forecaster, tmp_path / "missing.bpte"):
        result = CliRunner().invoke(main, ["verify-bundle", str(path)])
        assert result.exit_code == 1
        assert "not an ExecuTorch bundled program" in result.output or "cannot read" in result.output


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
    result = CliRunner().invoke(main, ["verify-bundle", str(cut)])
    assert result.exit_code == 1
    assert "bundled program" in result.output
