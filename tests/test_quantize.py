"""The INT8 quantizer, checked against the float model it quantizes (run through the integer reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tinylstm import qmodel, reference
from tinylstm.cli import main
from tinylstm.data import DataSpec, load_dataset
from tinylstm.evaluate import fp32_outputs, int8_outputs
from tinylstm.pipeline import DEMOS
from tinylstm.qmodel import InputSpec
from tinylstm.quantize import (
    QuantConfig,
    calibrate,
    cell_scale_power,
    convert,
    post_training_quantize,
    quantize_checkpoint,
    quantize_multiplier,
    unrolled_forward,
)
from tinylstm.train import LSTMModel, ModelConfig, TrainConfig, check_budget, save_checkpoint, train_model


@pytest.mark.parametrize("real", [1e-9, 3.1e-5, 0.0123, 0.5, 0.75, 0.999999999, 1.0, 1.7, 1234.5])
def test_quantize_multiplier_represents_the_factor(real):
    m, s = quantize_multiplier(real)
    assert 2**30 <= m < 2**31 and -31 <= s <= 30
    assert m * 2.0 ** (s - 31) == pytest.approx(real, rel=2**-30)


def test_cell_scale_power_holds_the_range_in_int16():
    for c_max in (0.3, 1.0, 3.9, 4.0, 7.5, 100.0):
        p = cell_scale_power(c_max)
        assert c_max <= 32767 * 2.0**p < 2 * c_max  # fits, and the next finer scale would not


def sine_csv(tmp_path, n=1200, anomaly_at=None):
    rng = np.random.default_rng(0)
    t = np.arange(n)
    v = 10 + 5 * np.sin(2 * np.pi * t / 25) + 2 * np.sin(2 * np.pi * t / 7) + rng.normal(0, 0.2, n)
    label = np.zeros(n, int)
    if anomaly_at is not None:
        v[anomaly_at:anomaly_at + 3] += np.array([6.0, -7.0, 6.0])
        label[anomaly_at:anomaly_at + 3] = 1
    path = tmp_path / "sine.csv"
    path.write_text("v,label\n" + "".join(f"{a:.5f},{b}\n" for a, b in zip(v, label, strict=True)))
    return path


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    path = sine_csv(tmp_path_factory.mktemp("fc"))
    ds = load_dataset(DataSpec(task="forecasting", path=str(path), features=["v"], target="v", window=24))
    ckpt, _ = train_model(ds, [12], TrainConfig(epochs=40, lr=1e-2, batch_size=64, patience=10))
    return ds, ckpt


def random_model(sizes, inputs=3, outputs=2, seed=0):
    torch.manual_seed(seed)
    model = LSTMModel(ModelConfig("forecasting", inputs, sizes, outputs, 20))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # larger weights than PyTorch's init: saturating gates, a cell state beyond +-1
    return model


@pytest.mark.parametrize("sizes,per_channel", [([8], False), ([8], True), ([10, 6], False), ([5, 7, 4], True)])
def test_integer_reference_tracks_the_float_model(sizes, per_channel):
    """Independent truth: the dequantized reference output of the quantized model against PyTorch."""
    model = random_model(sizes)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 20, 3)).astype(np.float32)
    cfg = QuantConfig(per_channel=per_channel)
    ranges = calibrate(model, x, cfg)
    q = convert(model, ranges, InputSpec(features=3, window=20, scale=1.0, zero_point=0), per_channel)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = q.dequantize_output(reference.run_batch(q, q.quantize_input(x)))
    span = ranges.out[1] - ranges.out[0]
    err = np.abs(got - expected)
    assert err.mean() < 0.01 * span and err.max() < 0.06 * span, (err.mean() / span, err.max() / span)
    # the summed PyTorch biases b_ih + b_hh are what the integer model uses: dropping one breaks the match
    with torch.no_grad():
        model.lstms[0].bias_hh_l0.zero_()
        assert np.abs(model(torch.from_numpy(x)).numpy() - got).mean() > 3 * err.mean()


def test_reference_states_follow_the_float_states_step_by_step():
    model = random_model([6])
    x = np.random.default_rng(2).normal(size=(50, 20, 3)).astype(np.float32)
    cfg = QuantConfig()
    q = post_training_quantize_from(model, x, cfg)
    trace = []
    with torch.no_grad():
        unrolled_forward(model, torch.from_numpy(x), trace=trace)
    h_float, c_float = trace[0][0].numpy(), trace[0][1].numpy()
    ref = reference.Reference(q, columns=len(x))
    layer = q.layers[0]
    xq = q.quantize_input(x)
    for t in range(20):
        h = ref.step(xq[:, t])
        h_real = (h.astype(float) - layer.output_zero_point) * layer.output_scale
        c_real = ref.states[0].c.T * 2.0**layer.cell_scale_power
        assert np.abs(h_real - h_float[:, t]).mean() < 4 * layer.output_scale
        assert np.abs(c_real - c_float[:, t]).mean() < 0.05 * max(1.0, np.abs(c_float).max())


def post_training_quantize_from(model, x, cfg):
    return convert(model, calibrate(model, x, cfg), InputSpec(features=x.shape[2], window=x.shape[1], scale=1.0,
                                                              zero_point=0), cfg.per_channel)


def test_forecast_int8_within_3_percent_and_better_than_naive(forecaster):
    ds, ckpt = forecaster
    result = quantize_checkpoint(ckpt, QuantConfig(), dataset=ds)
    f, q = result.comparison.fp32, result.comparison.int8
    assert q["rmse"] <= 1.03 * f["rmse"]
    assert f["rmse"] < f["naive_rmse"] and q["rmse"] < q["naive_rmse"]
    meta = result.qmodel.meta
    assert meta["accuracy_gap"] == pytest.approx(q["rmse"] - f["rmse"])
    assert meta["target_norm"]["offset"] == pytest.approx(ds.target_norm.offset.tolist())
    # the input specification carries the normalisation to the device
    assert result.qmodel.input.norm_kind == "zscore"
    assert result.qmodel.input.norm_offset == pytest.approx(ds.input_norm.offset.tolist())


def test_per_channel_and_percentile_models_are_valid_and_close(forecaster):
    ds, ckpt = forecaster
    for cfg in (QuantConfig(per_channel=True), QuantConfig(calibration="percentile")):
        q = post_training_quantize(ckpt.model, ds, cfg)
        assert q.layers[0].per_channel == cfg.per_channel
        err = np.abs(int8_outputs(q, ds, ds.test) - fp32_outputs(ckpt.model, ds, ds.test))
        assert err.mean() < 0.1 * ds.test.y.std()


def test_qat_fine_tuning_runs_and_keeps_the_gap_small(forecaster):
    ds, ckpt = forecaster
    result = quantize_checkpoint(ckpt, QuantConfig(), dataset=ds, qat_epochs=2, qat_lr=3e-4)
    assert result.qat is not None and len(result.qat.history) == 2
    assert result.float_model is not ckpt.model  # the checkpoint's own model is left as it was
    assert result.comparison.int8["rmse"] <= 1.05 * result.comparison.fp32["rmse"]
    assert result.qmodel.meta["quantization"]["qat_epochs"] == 2


def test_anomaly_is_flagged_without_false_alarms(tmp_path):
    path = sine_csv(tmp_path, n=1500, anomaly_at=1300)
    ds = load_dataset(DataSpec(task="anomaly", path=str(path), features=["v"], target="v", label="label",
                               window=24, normal_rows=800))
    ckpt, _ = train_model(ds, [12], TrainConfig(epochs=40, lr=1e-2, batch_size=64, patience=10),
                          threshold_margin=2.0)
    result = quantize_checkpoint(ckpt, QuantConfig(), dataset=ds)
    for side in (result.comparison.fp32, result.comparison.int8):
        assert side["anomalies"] == [[1300, 1302]]
        assert side["anomalies_detected"] == 1 and side["false_alarms"] == 0
    assert result.qmodel.meta["anomaly_threshold"] > 0


def test_quantize_and_evaluate_cli(tmp_path, forecaster):
    ds, ckpt = forecaster
    save_checkpoint(ckpt, tmp_path / "f.pt")
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(tmp_path / "f.pt"), "--out", str(tmp_path / "q.npz"), "--report",
                             str(tmp_path / "r.json"), "--per-channel"])
    assert r.exit_code == 0, r.output
    assert "RMSE FP32" in r.output
    q = qmodel.load(tmp_path / "q.npz")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gap"] == pytest.approx(q.meta["accuracy_gap"])
    r = runner.invoke(main, ["evaluate", str(tmp_path / "f.pt"), str(tmp_path / "q.npz"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["int8"]["rmse"] == pytest.approx(report["int8"]["rmse"])
    r = runner.invoke(main, ["quantize", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.npz")])
    assert r.exit_code != 0 and "no such checkpoint" in r.output and not (tmp_path / "x.npz").exists()


def test_evaluate_plot(tmp_path, forecaster):
    pytest.importorskip("matplotlib")
    ds, ckpt = forecaster
    save_checkpoint(ckpt, tmp_path / "f.pt")
    qmodel.save(post_training_quantize(ckpt.model, ds, QuantConfig()), tmp_path / "q.npz")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "f.pt"), str(tmp_path / "q.npz"), "--plot",
                                  str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


DEMO_SEEDS = (0, 1, 2, 3, 4)


@pytest.mark.slow
def test_basic_motions_demo_recipe_over_seeds_fits_uno_and_int8_keeps_its_accuracy():
    """The demo's recipe (tinylstm.pipeline.DEMOS) over five seeds, not one: float kernels differ between CPUs, so
    a given seed's figures only repeat on the same kind of machine. Over 20 seeds on one CPU the recipe gave FP32
    and INT8 test accuracy 90.0% to 100% (median 97.5%) and |INT8 - FP32| <= 2.5 pp (docs/training.md)."""
    recipe = DEMOS["basic_motions"]
    ds = load_dataset(DataSpec.for_dataset("basic_motions"))
    quant = QuantConfig(calibration=recipe["quantization"]["calibration"])
    fp32, int8 = [], []
    for seed in DEMO_SEEDS:
        ckpt, _ = train_model(ds, recipe["model"]["hidden"], TrainConfig(**recipe["train"], seed=seed))
        assert check_budget("uno_sim", ckpt.config).fits
        result = quantize_checkpoint(ckpt, quant, dataset=ds, qat_epochs=recipe["quantization"].get("qat_epochs", 0))
        f, q = result.comparison.fp32["accuracy"], result.comparison.int8["accuracy"]
        assert abs(q - f) <= 0.05, f"seed {seed}: INT8 {q:.3f} against FP32 {f:.3f}"
        assert min(f, q) >= 0.8, f"seed {seed}: FP32 {f:.3f}, INT8 {q:.3f}"
        fp32.append(f)
        int8.append(q)
    assert np.median(fp32) >= 0.9 and np.median(int8) >= 0.9, (fp32, int8)
