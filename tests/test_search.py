"""The model search: the latency cost model, ranking, and small searches on one shared local Ray instance."""

import json
import os
import signal
import tempfile
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from ray import tune

from tests.random_models import random_model
from tinylstm import budget, costmodel, evaluate, pipeline, qmodel, search
from tinylstm.boards import load_board
from tinylstm.cli import main
from tinylstm.data import DataSpec, load_dataset
from tinylstm.export import ModelShape
from tinylstm.quantize import QuantConfig, quantize_checkpoint
from tinylstm.train import TrainConfig, train_model

# CMSIS-NN arm_lstm_unidirectional_s8 instructions per step on mps2-an386, as published in the kernel speed issue.
CMSIS_NN = [(3, 16, 12_810), (6, 32, 28_967), (12, 64, 73_492), (32, 128, 226_009)]


def records(points, board="mps2_an386", variant="cmsis_nn", layers=1):
    return [{"board": board, "variant": variant, "input": i, "hidden": h, "layers": layers, "per_step": y,
             "unit": "instructions"} for i, h, y in points]


def test_cost_model_predicts_published_cmsis_nn_counts_left_out_of_the_fit():
    fit = costmodel.CostModel(costmodel.parse_measurements(records(CMSIS_NN))).fits[("mps2_an386", "cmsis_nn")]
    assert len(fit.loo_errors) == 4
    assert fit.loo_max < 0.10


def test_cost_model_recovers_the_coefficients_of_synthetic_counts():
    a, b, c = 9.5, 400.0, 1500.0  # cycles per MAC, per hidden unit, per layer
    shapes = [(3, 16, 1), (6, 32, 1), (12, 64, 1), (6, 24, 2), (6, 16, 3)]
    points = []
    for i, h, n in shapes:
        macs = 4 * h * (i + h) + (n - 1) * 4 * h * 2 * h
        points.append({"board": "uno_sim", "variant": "avr", "input": i, "hidden": h, "layers": n,
                       "per_step": a * macs + b * h * n + c * n})
    model = costmodel.CostModel(costmodel.parse_measurements(points))
    fit = model.fits[("uno_sim", "avr")]
    assert fit.coefficients == pytest.approx((a, b, c), rel=1e-6)
    assert fit.loo_max < 1e-6
    est = model.estimate(load_board("uno_sim"), ModelShape(input_size=6, hidden_sizes=(32,), window=100, outputs=4))
    step = a * 4 * 32 * 38 + b * 32 + c
    assert est.variant == "avr"
    assert est.per_step == pytest.approx(step)
    assert est.per_window == pytest.approx(100 * step + a * 4 * 32)


def test_cost_model_rejects_a_record_without_per_step(tmp_path):
    bad = records(CMSIS_NN)
    del bad[2]["per_step"]
    path = tmp_path / "perf.json"
    path.write_text(json.dumps({"measurements": bad}))
    with pytest.raises(costmodel.CostModelError, match="record 2 lacks per_step"):
        costmodel.CostModel.from_files([path])


def _record(rid, int8, per_window, ram):
    return {"id": rid, "status": "completed", "result": {"metric": "accuracy", "val_int8": int8},
            "latency": {"per_window": per_window}, "plan": {"ram": ram}}


def test_pareto_front_and_the_pick_of_each_objective():
    rs = [_record("big", 0.975, 8e6, 900), _record("mid", 0.97, 2e6, 600), _record("small", 0.90, 1e5, 400),
          _record("worse", 0.90, 3e6, 700), _record("failed", 0, 0, 0) | {"status": "failed"}]
    assert [r["id"] for r in search.pareto_front(rs)] == ["small", "mid", "big"]
    picks = {o: search.recommend(rs, o)["id"] for o in search.OBJECTIVES}
    # latency: the fastest within 1 point of the best; balanced: 1 point is worth a halving of the counts
    # (mid: 0.5 + 0 = 0.5 points; big: 0 + 2 = 2; small: 7.5 - 4.3 = 3.2 points).
    assert picks == {"accuracy": "big", "latency": "mid", "balanced": "mid"}


def test_cli_refuses_a_search_without_data_or_over_an_existing_one(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["search", "--board", "uno_sim", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "give either a data file or --dataset" in result.output
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / search.STATE_FILE).write_text("{}")
    result = runner.invoke(main, ["search", "--dataset", "basic_motions", "--board", "uno_sim",
                                  "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "already holds a search" in result.output


def _bm_settings(hidden):
    project = search.project_sections("basic_motions", train={"epochs": 1}, quantization={"qat_epochs": 0})
    return search.SearchSettings(board="uno_sim", project=project, space=search.SearchSpace(hidden=hidden, layers=(1,)),
                                 calibration=())


def _strings(value, key):
    """Every value under ``key`` anywhere in a JSON document."""
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == key] + [x for v in value.values() for x in _strings(v, key)]
    if isinstance(value, list):
        return [x for v in value for x in _strings(v, key)]
    return []


def test_the_search_chooses_on_validation_and_evaluates_only_the_recommended_model_on_test(tmp_path, monkeypatch):
    # Validation ranks hidden 12 first; the test split would rank it last.
    val = {"h4_w100_s1_lr0.01": 0.75, "h8_w100_s1_lr0.01": 0.875, "h12_w100_s1_lr0.01": 1.0}
    test = {"h4_w100_s1_lr0.01": 0.95, "h8_w100_s1_lr0.01": 0.9, "h12_w100_s1_lr0.01": 0.8}
    tested = []

    def fake_trials(settings, todo, entries, records, store, *rest):
        for entry in todo:
            v = val[entry["id"]]
            record = {**entry, "status": "completed", "error": None, "retries": 0,
                      "result": {"metric": "accuracy", "val_fp32": v, "val_int8": v, "epochs_run": 1, "seconds": 0.0}}
            store.save_model(entry["id"], b"a model")
            store.save(record)
            records[entry["id"]] = record

    def fake_test(path, dataset):
        tested.append(path.name)
        return {"split": "test", "metric": "accuracy", "int8": test[path.stem], "windows": len(dataset.test)}

    monkeypatch.setattr(search, "_run_trials", fake_trials)
    monkeypatch.setattr(search, "recommended_test_quality", fake_test)
    result = search.search(_bm_settings([4, 8, 12]), tmp_path / "s", verify=False)

    assert result.recommended["id"] == "h12_w100_s1_lr0.01"
    assert tested == ["h12_w100_s1_lr0.01.npz"]
    assert result.test == {"id": "h12_w100_s1_lr0.01", "split": "test", "metric": "accuracy", "int8": 0.8,
                           "windows": 40}
    summary = json.loads((tmp_path / "s" / search.RESULTS_FILE).read_text())
    assert _strings(summary, "int8") == [0.8]  # the one test figure; the trials carry val_int8 only
    assert sorted(_strings(summary, "val_int8")) == [0.75, 0.875, 1.0, 1.0]  # the records, and the recommended one
    assert search.summary_text(result).count("test split: INT8 accuracy 80.0% over 40 windows") == 1


def test_recommended_test_quality_evaluates_the_trial_model_on_the_test_split(tmp_path):
    dataset = load_dataset(DataSpec.for_dataset("basic_motions"))
    model = random_model(5, input_size=6, hidden_sizes=(4,), outputs=4, window=100, extreme=0.0)
    # A head with no weights and the largest bias on class 2: every window is class 2.
    model.head = replace(model.head, weights=np.zeros_like(model.head.weights),
                         bias=np.array([0, 0, 1 << 20, 0], dtype=np.int32))
    path = qmodel.save(model, tmp_path / "m.npz")
    quality = search.recommended_test_quality(path, dataset)
    assert quality == {"split": "test", "metric": "accuracy", "int8": float(np.mean(dataset.test.y == 2)),
                       "windows": 40}
    with pytest.raises(search.SearchError, match="recommended trial's model is missing"):
        search.recommended_test_quality(tmp_path / "gone.npz", dataset)


def test_a_search_ranked_on_the_test_split_is_not_resumed(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / search.STATE_FILE).write_text(json.dumps({"format": "tinylstm-search", "version": 1}))
    with pytest.raises(search.SearchError, match="ranked its trials on the test split; start a new search"):
        search.search(_bm_settings([4]), out, resume=True, verify=False)


# ------------------------------------------------------------------------------------------ on Ray


@pytest.fixture(scope="module")
def ray_instance():
    with search.ray_session(num_cpus=2) as where:
        yield where


def _settings(hidden, layers=(1,), lrs=None, epochs=1):
    project = search.project_sections("basic_motions", train={"epochs": epochs, "lr": 3e-3},
                                      quantization={"qat_epochs": 0})
    return search.SearchSettings(board="uno_sim", project=project, report_every=1, early_stop=False,
                                 space=search.SearchSpace(hidden=hidden, layers=layers, lrs=lrs), calibration=())


class Counter(search.Progress):
    def __init__(self):
        self.done = []

    def trial_done(self, record, records, total):
        self.done.append(record["id"])


@pytest.mark.slow
def test_tiny_search_prunes_what_does_not_fit_and_repeats_on_resume(ray_instance, tmp_path):
    out = tmp_path / "search"
    counter = Counter()
    result = search.search(_settings([4, 8, 400], layers=(1, 2)), out, verify=False, progress=counter)

    # hidden 400 needs 4*400*(6+400) = 649,600 bytes of weights for one layer: far over the Uno's 32 KB of flash.
    assert sorted(p["id"] for p in result.pruned) == ["h400-400_w100_s1_lr0.003", "h400_w100_s1_lr0.003"]
    assert all("flash" in p["reason"] for p in result.pruned)
    trained = {"h4_w100_s1_lr0.003", "h8_w100_s1_lr0.003", "h4-4_w100_s1_lr0.003", "h8-8_w100_s1_lr0.003"}
    assert set(counter.done) == trained  # the pruned candidates never reached a worker
    assert {p.stem for p in (out / search.TRIALS_DIR).glob("*.json")} == trained
    assert {r["status"] for r in result.records} == {"completed"}

    # The recommended trial's validation accuracy, and the search's test accuracy of it, are what the same recipe
    # gives when trained here, outside Ray. No other trial has a test figure.
    record = result.recommended
    config = pipeline.make_config(tomllib.loads((out / search.RECOMMENDED_CONFIG).read_text()), "test")
    assert config["model"]["hidden"] == record["candidate"]["hidden"]
    dataset = pipeline.Context(config, out, pipeline.Reporter()).dataset()
    recipe = dict(config["train"], epochs=1, lr=0.003)
    checkpoint, _ = train_model(dataset, record["candidate"]["hidden"], TrainConfig(**recipe))
    quant = quantize_checkpoint(checkpoint, QuantConfig(calibration="percentile"), dataset=dataset)
    assert record["result"]["digest"] == quant.qmodel.digest()
    assert record["result"]["val_int8"] == evaluate.compare(quant.float_model, quant.qmodel, dataset,
                                                             dataset.val).int8["accuracy"]
    assert result.test["id"] == record["id"] and result.test["int8"] == quant.comparison.int8["accuracy"]
    assert all("int8" not in r["result"] for r in result.records)
    record = next(r for r in result.records if r["id"] == "h8_w100_s1_lr0.003")

    # A stopped search resumes: only the trial without a record runs again, and it repeats exactly.
    (out / search.TRIALS_DIR / "h8_w100_s1_lr0.003.json").unlink()
    counter = Counter()
    again = search.search(_settings([4, 8, 400], layers=(1, 2)), out, resume=True, verify=False, progress=counter)
    assert counter.done == ["h8_w100_s1_lr0.003"]
    rerun = next(r for r in again.records if r["id"] == "h8_w100_s1_lr0.003")
    assert rerun["result"]["digest"] == record["result"]["digest"]


class KillWorker(tune.Callback):
    """Kills the worker process of the hidden-8 trial with a good learning rate at its first report (epoch 1)."""

    def __init__(self):
        self.killed = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and trial.config["candidate"] == {"hidden": [8], "window": 100, "stride": 1,
                                                                 "lr": 3e-3} and result.get("epoch") == 1:
            self.killed = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_a_bad_trial_fails_without_stopping_the_search(ray_instance, tmp_path):
    killer = KillWorker()
    settings = _settings([4, 8], lrs=[3e-3, -1.0], epochs=30)  # the kill lands long before epoch 30
    result = search.search(settings, tmp_path / "search", verify=False, callbacks=[killer])
    assert killer.killed is not None
    by_id = {r["id"]: r for r in result.records}
    killed = by_id["h8_w100_s1_lr0.003"]
    assert killed["status"] == "completed" and killed["retries"] == 1
    assert killed["result"]["pid"] != killer.killed
    assert killed["result"]["epochs_run"] == 30
    for rid in ("h4_w100_s1_lr-1", "h8_w100_s1_lr-1"):
        assert by_id[rid]["status"] == "failed" and "[train] lr must be > 0" in by_id[rid]["error"]
    assert by_id["h4_w100_s1_lr0.003"]["status"] == "completed"
    assert np.isfinite(result.recommended["result"]["val_int8"]) and np.isfinite(result.test["int8"])


@pytest.mark.slow
def test_cost_model_predicts_cycles_measured_in_simavr_for_a_shape_left_out():
    shapes = ((6, 4, 1), (6, 16, 1), (6, 8, 2), (6, 32, 1))
    with tempfile.TemporaryDirectory() as work:
        measured = costmodel.calibrate(load_board("uno_sim"), "reference", shapes, Path(work), Path(work) / "cache",
                                       log=lambda line: None)
    fit = costmodel.CostModel(costmodel.parse_measurements(measured)).fits[("uno_sim", "reference")]
    assert fit.unit == "cycles" and len(fit.loo_errors) == 4
    assert fit.loo_max < 0.05


def test_candidates_that_cannot_keep_up_with_the_sample_rate_are_pruned(tmp_path):
    board = load_board("uno_sim")
    steps = {h: budget.plan(board, ModelShape(6, (h,), 100, 4), sample_rate_hz=1.0).deadline.step_seconds
             for h in (4, 32)}
    rate = 1.0 / (steps[4] * steps[32]) ** 0.5  # hidden 4 keeps up, hidden 32 does not
    settings = _settings([4, 32])
    settings = replace(settings, project={**settings.project,
                                          "data": {**settings.project["data"], "sample_rate_hz": rate}})
    probe = search.project_config(settings.project, search.Candidate((1,), 1, 1, 1e-3), "uno_sim", True, "x", "")
    dataset = pipeline.Context(probe, tmp_path, pipeline.Reporter()).dataset()
    fitting, pruned = search._candidate_entries(settings, dataset, board, False, costmodel.default_model())
    assert [e["candidate"]["hidden"] for e in fitting] == [[4]]
    assert [p["id"] for p in pruned] == ["h32_w100_s1_lr0.003"]
    assert pruned[0]["reason"].startswith("does not fit uno_sim: time: step") and "too slow" in pruned[0]["reason"]
