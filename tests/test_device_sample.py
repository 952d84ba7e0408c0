"""The device's sample of test windows and the figures shown for it: a seeded sample stratified by class that
covers every labelled anomaly, the Wilson interval of a device accuracy, and the headline strings."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from tinylstm import bench, evaluate, pipeline, reference, report
from tinylstm.cli import main
from tinylstm.data import DataSpec, Split
from tinylstm.qmodel import save
from tinylstm.sampling import allocate, sample_indices


def classes_split(sizes: list[int], seed: int = 0) -> Split:
    """Windows whose labels are shuffled classes of the given sizes."""
    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))
    return Split(np.zeros((len(y), 2, 1), np.float32), y)


def anomaly_split(n: int, events: list[tuple[int, int]]) -> Split:
    """n windows, one per row; the target rows of each (first, last) event are labelled anomalous."""
    truth = np.zeros(n, np.int64)
    for lo, hi in events:
        truth[lo:hi + 1] = 1
    return Split(np.zeros((n, 2, 1), np.float32), np.zeros((n, 1), np.float32), np.arange(n), truth=truth)


def test_stratified_sample_is_proportional_with_every_class():
    split = classes_split([50, 30, 15, 5])
    picked = sample_indices(split, "classification", 20, seed=7)
    # 20 of 100 windows: 10, 6, 3 and 1 of the four classes, as 20 x 50 %, 30 %, 15 %, 5 %.
    assert np.bincount(split.y[picked], minlength=4).tolist() == [10, 6, 3, 1]
    assert len(set(picked.tolist())) == 20 and np.all(np.diff(picked) > 0)


def test_stratified_sample_keeps_a_rare_class():
    split = classes_split([90, 9, 1])
    for seed in range(5):
        picked = sample_indices(split, "classification", 10, seed=seed)
        assert set(split.y[picked].tolist()) == {0, 1, 2}  # proportionally the last class would get 0.1 windows


def test_stratified_sample_is_seeded():
    split = classes_split([40, 40, 20])
    first = sample_indices(split, "classification", 12, seed=3)
    np.testing.assert_array_equal(first, sample_indices(split, "classification", 12, seed=3))
    assert not np.array_equal(first, sample_indices(split, "classification", 12, seed=4))


def test_sample_smaller_than_the_number_of_classes():
    split = classes_split([10, 10, 10, 10])
    picked = sample_indices(split, "classification", 3, seed=1)
    assert len(picked) == 3 and len(set(split.y[picked].tolist())) == 3  # three different classes


def test_first_all_and_a_sample_as_large_as_the_split():
    split = classes_split([5, 5])
    assert sample_indices(split, "classification", 4, "first").tolist() == [0, 1, 2, 3]
    assert sample_indices(split, "classification", 4, "all").tolist() == list(range(10))
    assert sample_indices(split, "classification", 50).tolist() == list(range(10))
    with pytest.raises(ValueError, match="unknown sample 'random'; choose one of stratified, first, all"):
        sample_indices(split, "classification", 4, "random")


def test_forecasting_sample_is_evenly_spaced():
    split = Split(np.zeros((100, 2, 1), np.float32), np.zeros((100, 1), np.float32), np.arange(100))
    assert sample_indices(split, "forecasting", 8, seed=1).tolist() == [0, 12, 25, 37, 50, 62, 75, 87]


def test_anomaly_sample_covers_every_labelled_event():
    split = anomaly_split(300, [(100, 104), (250, 251)])
    for seed in range(5):
        picked = sample_indices(split, "anomaly", 10, seed=seed)
        # Half the sample on the 7 labelled windows: at least one in each event; the other half normal.
        assert np.any((picked >= 100) & (picked <= 104)) and np.any((picked >= 250) & (picked <= 251))
        assert int(split.truth[picked].sum()) == 5 and len(set(picked.tolist())) == 10
    draws = [sample_indices(split, "anomaly", 10, seed=seed) for seed in (0, 0, 1)]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


def test_anomaly_sample_when_anomalies_outnumber_normal_windows():
    split = anomaly_split(20, [(2, 17)])  # 16 labelled, 4 normal windows
    picked = sample_indices(split, "anomaly", 12, seed=0)
    assert len(picked) == 12 and int(split.truth[picked].sum()) == 8


def test_allocate_refuses_more_than_there_is():
    with pytest.raises(ValueError, match="cannot draw 7 windows from 6"):
        allocate([3, 3], 7, np.random.default_rng(0))


def test_wilson_interval_against_hand_computed_values():
    # z = 1.96: 38/40 gives centre 39.92/43.84 = 0.9106, half-width 1.96 sqrt(2.860) / 43.84 = 0.0756.
    assert evaluate.wilson_interval(38, 40) == pytest.approx((0.8350, 0.9862), abs=1e-4)
    # 0 of n: [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415].
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    # 1 of 1: [1 / (1 + z^2), 1].
    assert evaluate.wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    with pytest.raises(ValueError, match="need 0 <= successes <= n"):
        evaluate.wilson_interval(3, 2)


def test_headline_strings():
    assert report.bit_exact(40, 0) == "40/40 windows bit-exact on the device"
    assert report.bit_exact(40, 2) == "38/40 windows bit-exact on the device"
    acc = {"accuracy": 0.95}
    assert (report.device_figure("classification", acc, 40, list(evaluate.wilson_interval(38, 40)))
            == "device accuracy 95.0% on 40 windows (95% CI 83.5%–98.6%)")
    assert report.device_figure("forecasting", {"rmse": 0.123456}, 50, None) == "device RMSE 0.1235 on 50 windows"
    anomaly = {"f1": 0.8, "anomalies": [[10, 20]], "anomalies_detected": 1, "false_alarms": 2, "events": []}
    assert report.headline("anomaly", anomaly) == "1/1 event, 2 false alarms, point-F1 0.80"
    assert report.headline("anomaly", {"events": [[1, 2], [5, 9]]}) == "2 events flagged"
    assert report.sample_text({"method": "stratified", "seed": 3}, 40, 400) == \
        "a stratified sample of 40 of 400 test windows, seed 3"
    assert report.sample_text({"method": "first", "seed": None}, 40, 400) == "the first 40 of 400 test windows"
    assert report.sample_text({"method": "stratified", "seed": 3}, 40, 40) == "all 40 test windows"


def _summaries(task: str, int8: dict, device: dict, interval: list[float] | None) -> dict:
    bench = {"board": "uno_sim", "windows": 40, "mismatches": 0, "test_windows": 400, "device": device,
             "device_interval": interval, "sample": {"method": "stratified", "seed": 0, "indices": list(range(40))},
             "unit": "cycles", "cpu_hz": 16_000_000, "stats": {"median": 1.6e6, "per_step_median": 16_000}}
    return {"data": {"task": task, "windows": {"test": 400}}, "bench": bench,
            "quantize": {"comparison": {"task": task, "fp32": int8, "int8": int8}}}


def test_run_summary_quality_is_the_whole_test_split_and_device_has_its_sample():
    """The quality line is FP32 / INT8 host on all test windows; the device line counts windows bit-exact and
    gives the device's accuracy only with its sample size and interval."""
    summaries = _summaries("classification", {"accuracy": 0.9}, {"accuracy": 0.5}, [0.35, 0.65])
    text = pipeline.summary_text(pipeline.RunResult(Path("/out"), [], [], [], summaries))
    assert "  quality    FP32 90.0%   INT8 host 90.0%   (all 400 test windows)" in text
    assert ("  device     40/40 windows bit-exact on the device (uno_sim; a stratified sample of 40 of 400 test "
            "windows, seed 0)") in text
    assert "device accuracy 50.0% on 40 windows (95% CI 35.0%–65.0%)" in text
    cards = report.summary_cards("classification", summaries["quantize"], summaries["bench"], None, None, 400)
    assert cards[0]["values"] == [("FP32", "90.0%"), ("INT8 host", "90.0%")]  # no device figure among them
    assert cards[-1]["values"] == [("windows bit-exact", "40 / 40")]
    assert cards[-1]["detail"].startswith("device accuracy 50.0% on 40 windows (95% CI 35.0%–65.0%)")


def test_anomaly_summary_is_event_level():
    int8 = {"f1": 0.5, "anomalies": [[10, 20]], "anomalies_detected": 1, "false_alarms": 1, "events": []}
    summaries = _summaries("anomaly", int8, {"f1": 0.25, "precision": 2 / 3, "flagged_points": 3}, None)
    text = pipeline.summary_text(pipeline.RunResult(Path("/out"), [], [], [], summaries))
    assert "INT8 host 1/1 event, 1 false alarm, point-F1 0.50   (all 400 test windows)" in text
    # the sample is rich in anomalies by design: the device line counts flags, it gives no point-F1
    assert "device flagged 3 of 40 windows, 2 of them inside labelled anomalies" in text
    assert "device point-F1" not in text
    card = report.summary_cards("anomaly", summaries["quantize"], summaries["bench"], None, None, 400)[0]
    assert card["values"] == [("detected", "1 / 1"), ("false alarms", "1"), ("point-F1", "0.50")]


def test_held_out_sample_and_its_accuracy_entry():
    """A model that carries the BasicMotions spec (40 test windows, 10 per class): 8 windows are 2 per class,
    the entry records them, and the device accuracy comes with its Wilson interval."""
    model = bench.synthetic_model(6, [4], 100, 4)
    model.meta["data_spec"] = DataSpec.for_dataset("basic_motions").to_dict()
    data = bench.held_out(model, 8, "stratified", seed=5)
    assert np.bincount(data.split.y, minlength=4).tolist() == [2, 2, 2, 2]
    np.testing.assert_array_equal(data.split.y, data.dataset.test.y[data.indices])
    outputs = reference.run_batch(model, data.int8)
    entry = bench.accuracy(model, data, outputs)
    assert entry["sample"] == {"method": "stratified", "seed": 5, "indices": data.indices.tolist()}
    correct = int(np.sum(outputs.argmax(axis=1) == data.split.y))
    assert entry["device_interval"] == list(evaluate.wilson_interval(correct, 8))
    schema = json.loads(bench.SCHEMA_PATH.read_text())["$defs"]["model"]["properties"]["accuracy"]
    jsonschema.validate(entry, schema)
    assert bench.planned_windows(model, 8, sample="all") == 40 and bench.planned_windows(model, 8) == 8
    model.meta["evaluation"] = {"int8": {"accuracy": 0.925}}
    stats = bench.summary([1, 2])
    latency = {"note": "", "per_window": stats, "per_step": stats, "us_per_window": None}
    entry = {"name": "bm", "hidden_sizes": [4], "windows": 8, "source": "data", "mismatches": 0, "first_mismatch": None,
             "latency": latency, "firmware": None, "accuracy": bench.accuracy(model, data, outputs)}
    board = {"name": "uno_sim", "unit": "cycles", "device_board": "uno", "url": "", "cpu_hz": 16e6, "counter": "cycles",
             "free_ram": None}
    text = bench.markdown({"board": board, "models": [entry]})
    assert (f"**bm**: quality (INT8 host on the whole test split, from the quantizer) 92.5%; 8/8 windows bit-exact on "
            f"the device (a stratified sample of 8 of 40 test windows, seed 5); device accuracy {correct / 8:.1%} on "
            f"8 windows (95% CI ") in text
    with pytest.raises(bench.BenchError, match="unknown sample 'every'"):
        bench.held_out(model, 8, "every")


def test_bad_sample_is_refused(tmp_path):
    with pytest.raises(pipeline.PipelineError, match=r"\[bench\] sample must be one of stratified, first, all"):
        pipeline.make_config({"data": {"dataset": "basic_motions"}, "board": {"name": "uno_sim"},
                              "bench": {"sample": "random"}}, "tinylstm run x.toml")
    path = save(bench.synthetic_model(2, [3], 4, 2), tmp_path / "m.npz")
    result = CliRunner().invoke(main, ["bench", "--model", str(path), "--board", "uno_sim", "--sample", "random"])
    assert result.exit_code == 2 and "'random' is not one of 'stratified', 'first', 'all'" in result.output


def test_report_series_covers_the_labelled_anomalies():
    split = anomaly_split(1000, [(700, 705)])
    shown = pipeline.series_indices(split, "anomaly")
    assert len(shown) == pipeline.SERIES_POINTS and shown[0] <= 700 and shown[-1] >= 705
    far = pipeline.series_indices(anomaly_split(1000, [(10, 12), (900, 905)]), "anomaly")
    assert len(far) == pipeline.SERIES_POINTS and far[0] <= 10 and far[-1] >= 900
    assert pipeline.series_indices(split, "forecasting").tolist() == list(range(pipeline.SERIES_POINTS))
