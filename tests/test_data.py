"""The data pipeline: windowing, walk-forward and stratified splits, normalisation, and bad-data errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from tinylstm.cli import main
from tinylstm.data import DataError, DataSpec, Normalizer, load_dataset


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


@pytest.fixture
def ramp_csv(tmp_path):
    """Two features: a ramp (0, 1, 2, ...) and its square root; rows are their own index."""
    t = np.arange(200)
    return write_csv(tmp_path / "ramp.csv", ["a", "b"], [(v, round(float(np.sqrt(v)), 6)) for v in t])


def test_forecast_windows_and_targets_follow_the_series(ramp_csv):
    d = load_dataset(DataSpec(task="forecasting", path=str(ramp_csv), target="a", window=10, horizon=3))
    for split in (d.train, d.val, d.test):
        # window rows [r - 10, r), targets rows r, r+1, r+2: with a ramp, value == row index.
        np.testing.assert_array_equal(split.x[:, :, 0], split.row[:, None] - 10 + np.arange(10))
        np.testing.assert_array_equal(split.y, split.row[:, None] + np.arange(3))
        np.testing.assert_array_equal(split.naive, np.repeat(split.row[:, None] - 1, 3, 1))


def test_walk_forward_keeps_time_order_and_targets_inside_their_part(ramp_csv):
    d = load_dataset(DataSpec(task="forecasting", path=str(ramp_csv), target="a", window=10, horizon=2,
                              val_fraction=0.2, test_fraction=0.2))
    # 200 rows: train targets in rows 0-119, val in 120-159, test in 160-199; never shuffled.
    for split, lo, hi in ((d.train, 10, 119), (d.val, 120, 159), (d.test, 160, 199)):
        assert np.all(np.diff(split.row) > 0)
        assert split.row[0] == lo and split.row[-1] + 1 == hi
        assert split.y.min() >= lo and split.y.max() <= hi


def test_normaliser_is_fitted_on_training_rows_only(ramp_csv):
    d = load_dataset(DataSpec(task="forecasting", path=str(ramp_csv), target="a", window=10,
                              val_fraction=0.2, test_fraction=0.2))
    train_rows = np.arange(120.0)
    assert d.input_norm.offset[0] == pytest.approx(train_rows.mean())
    assert d.input_norm.scale[0] == pytest.approx(train_rows.std())
    assert d.target_norm.offset[0] == pytest.approx(train_rows.mean())
    mm = load_dataset(DataSpec(task="forecasting", path=str(ramp_csv), target="a", window=10, norm="minmax",
                               val_fraction=0.2, test_fraction=0.2))
    assert mm.input_norm.offset[0] == 0 and mm.input_norm.scale[0] == 119
    x = mm.inputs(mm.test)
    assert x.max() > 1.0  # test rows lie beyond the training range: nothing leaked from them


def test_normaliser_round_trip():
    n = Normalizer.fit(np.array([[1.0, 5.0], [3.0, 5.0]]), "zscore")
    assert n.scale[1] == 1.0  # a constant column
    v = np.array([[2.0, 7.0]])
    np.testing.assert_allclose(n.invert(n.apply(v)), v, rtol=1e-6)


def test_classification_csv_windows_take_the_label_of_their_last_row(tmp_path):
    labels = ["idle"] * 50 + ["walk"] * 50 + ["idle"] * 50 + ["walk"] * 50
    rows = [(i, lab) for i, lab in enumerate(labels)]
    path = write_csv(tmp_path / "act.csv", ["acc", "activity"], rows)
    d = load_dataset(DataSpec(task="classification", path=str(path), label="activity", window=8, stride=4))
    assert d.classes == ["idle", "walk"]
    for split in (d.train, d.val, d.test):
        last = split.x[:, -1, 0].astype(int)
        np.testing.assert_array_equal(split.y, [d.classes.index(labels[r]) for r in last])
    # whole windows inside each part: no window shares rows with another part
    assert d.train.x.max() < d.val.x.min() and d.val.x.max() < d.test.x.min()


def test_npz_layouts_and_stratified_split(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 20, 3)).astype(np.float32)  # [N, T, F]
    y = np.repeat([0, 1, 2], 20)
    np.savez(tmp_path / "ntf.npz", X=x, y=y)
    np.savez(tmp_path / "nft.npz", X=x.transpose(0, 2, 1), y=y)
    a = load_dataset(DataSpec(task="classification", path=str(tmp_path / "ntf.npz"), test_fraction=0.25))
    b = load_dataset(DataSpec(task="classification", path=str(tmp_path / "nft.npz"), test_fraction=0.25))
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert a.window == 20 and a.features == 3
    for split, per_class in ((a.test, 5), (a.val, 2)):
        assert np.bincount(split.y).tolist() == [per_class] * 3
    seen = np.concatenate([a.train.x, a.val.x, a.test.x]).reshape(60, -1)
    assert len(np.unique(seen, axis=0)) == 60  # every window used exactly once


def test_bundled_datasets():
    bm = load_dataset(DataSpec.for_dataset("basic_motions"))
    assert (bm.window, bm.features, bm.classes) == (100, 6, ["badminton", "running", "standing", "walking"])
    assert len(bm.train) + len(bm.val) == 40 and len(bm.test) == 40
    kdd = load_dataset(DataSpec.for_dataset("kdd_tsad_135"))
    assert kdd.train.row.max() < kdd.val.row.min() and kdd.val.row.max() < 1200 <= kdd.test.row.min()
    assert kdd.test.row[kdd.test.truth == 1].tolist() == list(range(4187, 4199))
    td = load_dataset(DataSpec.for_dataset("taylor_demand"))
    assert td.task == "forecasting" and td.outputs == 1


def test_fillna_fills_gaps(tmp_path):
    rows = [(float(i), 1) for i in range(40)]
    rows[5] = ("", 1)
    rows[6] = ("nan", 1)
    path = write_csv(tmp_path / "gap.csv", ["v", "w"], rows)
    for how, expect in (("ffill", (4.0, 4.0)), ("linear", (5.0, 6.0)), ("zero", (0.0, 0.0))):
        d = load_dataset(DataSpec(task="forecasting", path=str(path), features=["v"], target="v", window=10,
                                  fillna=how))
        assert (d.train.x[0, 5, 0], d.train.x[0, 6, 0]) == expect


# ---------------------------------------------------------------------------------- bad data, through the CLI


def run_train(args, out):
    result = CliRunner().invoke(main, ["train", *args, "--epochs", "1", "--quiet", "--out", str(out)])
    return result


BAD_CASES = {
    "missing target column": (["v", "w"], [(1, 2)] * 50, ["--task", "forecasting", "--target", "temp"],
                              "target column 'temp' is missing"),
    "missing feature column": (["v", "w"], [(1, 2)] * 50, ["--task", "forecasting", "--target", "v",
                                                           "--features", "v,x"], "feature column 'x' is missing"),
    "NaN": (["v"], [(i,) for i in range(20)] + [("nan",)] + [(i,) for i in range(30)],
            ["--task", "forecasting", "--target", "v"], "first a NaN/empty value at line 22"),
    "inf": (["v"], [(i,) for i in range(30)] + [("inf",)] + [(i,) for i in range(30)],
            ["--task", "forecasting", "--target", "v"], "infinite value at line 32"),
    "non-numeric": (["v", "w"], [(i, i) for i in range(10)] + [("abc", 1)] + [(i, i) for i in range(30)],
                    ["--task", "forecasting", "--target", "v"], "line 12: 'abc' is not a number"),
    "shorter than one window": (["v"], [(i,) for i in range(12)], ["--task", "forecasting", "--target", "v"],
                                "the series has 12 rows but one window needs 17"),
    "single class": (["v", "label"], [(i, "walk") for i in range(60)],
                     ["--task", "classification", "--label", "label"], "a single class ('walk')"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_refused_clearly(tmp_path, case):
    header, rows, args, message = BAD_CASES[case]
    path = write_csv(tmp_path / "bad.csv", header, rows)
    out = tmp_path / "model.pt"
    result = run_train([str(path), "--window", "16", *args], out)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_nan_in_npz_names_its_window(tmp_path):
    x = np.zeros((10, 30, 2), np.float32)
    x[7, 3, 1] = np.nan
    np.savez(tmp_path / "w.npz", X=x, y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"window 7: column 'feature 1' has 1 NaN/inf values, first a NaN/empty "
                                        r"value at step 3"):
        load_dataset(DataSpec(task="classification", path=str(tmp_path / "w.npz")))


def test_single_class_npz_is_refused(tmp_path):
    np.savez(tmp_path / "w.npz", X=np.zeros((10, 30, 2)), y=np.zeros(10, int))
    with pytest.raises(DataError, match="single class"):
        load_dataset(DataSpec(task="classification", path=str(tmp_path / "w.npz")))
