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
    # rows 0-139 train, 140-169 validate, 170-199 test (15 windows of 16 rows): the last class never trains
    "class missing from training": (["v", "label"], [(i, "normal" if i < 170 else "abnormal") for i in range(200)],
                                    ["--task", "classification", "--label", "label"],
                                    "class 'abnormal' has no window in the training part (0 in validation, 15 in "
                                    "test); a later class needs rows in the training part: split by groups"),
    "normal rows overlap an anomaly": (["v", "label"], [(i % 5, int(i in (30, 31))) for i in range(80)],
                                       ["--task", "anomaly", "--target", "v", "--label", "label", "--normal-rows",
                                        "40"], "normal_rows = 40 overlaps a labelled anomaly, first at line 32 "
                                               "(label column 'label')"),
    "balanced class weights for a forecast": (["v"], [(i % 5,) for i in range(80)],
                                              ["--task", "forecasting", "--target", "v", "--class-weight",
                                               "balanced"], "weights the classes of a classification task; this is "
                                                            "a forecasting task"),
    "a group split by a missing column": (["v", "label"], [(i, i % 2) for i in range(80)],
                                          ["--task", "classification", "--label", "label", "--group", "subject"],
                                          "group column 'subject' is missing"),
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


# ------------------------------------------------------------------------------- recordings, groups and splits


def subjects_csv(path, groups, recordings=2, rows=40, classes=lambda g, k: "abc"[(g + k) % 3]):
    """Subjects s0, s1, ... with `recordings` recordings of `rows` rows each; the feature v is the row's own index,
    so a window's content tells which rows, and hence which subject and recording, it came from."""
    table, subject, rec = [], [], []
    for g in range(groups):
        for k in range(recordings):
            for _ in range(rows):
                table.append((f"s{g}", g * recordings + k, len(table), classes(g, k)))
                subject.append(f"s{g}")
                rec.append(g * recordings + k)
    write_csv(path, ["subject", "rec", "v", "label"], table)
    return path, np.array(subject), np.array(rec), np.array([r[3] for r in table])


def assert_windows_stay_inside(split, window, *keys):
    rows = split.x[:, :, 0].astype(int)
    np.testing.assert_array_equal(np.diff(rows, axis=1), 1)  # consecutive rows
    for key in keys:  # never across a change of a key column
        assert (key[rows] == key[rows[:, :1]]).all()
    assert rows.shape[1] == window


def test_group_split_keeps_groups_apart_and_windows_inside_recordings(tmp_path):
    path, subject, rec, labels = subjects_csv(tmp_path / "imu.csv", groups=10)
    d = load_dataset(DataSpec(task="classification", path=str(path), features=["v"], label="label",
                              group="subject", recording="rec", window=8, stride=3))
    # 20 recordings of 40 rows: window starts 0, 3, ..., 30 in each, 11 windows; none is lost or shared.
    assert len(d.train) + len(d.val) + len(d.test) == 20 * 11
    parts = []
    for split in (d.train, d.val, d.test):
        assert_windows_stay_inside(split, 8, subject, rec)
        last = split.x[:, -1, 0].astype(int)
        np.testing.assert_array_equal(split.y, [d.classes.index(v) for v in labels[last]])
        parts.append(set(subject[last]))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # 10 groups: round(1.5) = 2 each for validation and test, 6 for training
    assert [len(p) for p in parts] == [6, 2, 2]
    # the dataset names each part's groups as the windows show them
    assert [set(d.meta["groups"][k]) for k in ("train", "val", "test")] == parts
    # the normaliser saw the training subjects' rows only
    train_rows = np.flatnonzero(np.isin(subject, list(parts[0])))
    assert d.input_norm.offset[0] == pytest.approx(train_rows.mean())
    again = load_dataset(DataSpec(task="classification", path=str(path), features=["v"], label="label",
                                  group="subject", recording="rec", window=8, stride=3))
    np.testing.assert_array_equal(again.test.x, d.test.x)  # seeded


def test_group_split_puts_every_class_in_every_part_when_it_can(tmp_path):
    # 9 subjects recorded doing a, b and a third time a, except subjects 0, 4 and 8, whose third recording is the
    # class "rare": one of them is needed in each of training, validation (1 subject) and test (1 subject).
    path, *_ = subjects_csv(tmp_path / "rare.csv", groups=9, recordings=3,
                            classes=lambda g, k: "rare" if k == 2 and g % 4 == 0 else "aba"[k])
    for seed in range(5):
        d = load_dataset(DataSpec(task="classification", path=str(path), features=["v"], label="label",
                                  group="subject", recording="rec", window=8, stride=4, seed=seed))
        for split in (d.train, d.val, d.test):
            assert set(split.y.tolist()) == {0, 1, 2}, seed
    # in one subject only: it cannot be everywhere, and training is the part that gets it
    path, *_ = subjects_csv(tmp_path / "one.csv", groups=9, recordings=3,
                            classes=lambda g, k: "rare" if k == 2 and g == 5 else "aba"[k])
    for seed in range(5):
        d = load_dataset(DataSpec(task="classification", path=str(path), features=["v"], label="label",
                                  group="subject", recording="rec", window=8, stride=4, seed=seed))
        assert d.classes.index("rare") in d.train.y


def test_recordings_cut_walk_forward_windows(tmp_path):
    path, subject, rec, _ = subjects_csv(tmp_path / "rec.csv", groups=3, recordings=3, rows=30)
    d = load_dataset(DataSpec(task="forecasting", path=str(path), features=["v"], target="v", recording="rec",
                              window=6, horizon=2))
    for split in (d.train, d.val, d.test):
        assert_windows_stay_inside(split, 6, rec)
        # the targets follow the inputs inside the same recording
        np.testing.assert_array_equal(split.y, split.row[:, None] + np.arange(2))
        assert (rec[split.row + 1] == rec[split.x[:, 0, 0].astype(int)]).all()
    # 9 recordings of 30 rows, 8 rows per window: at most 23 windows each, fewer where a part boundary cuts one
    assert len(d.train) + len(d.val) + len(d.test) <= 9 * 23
    assert len(d.train) + len(d.val) + len(d.test) > 9 * 23 - 2 * 8


def test_forecasting_group_split(tmp_path):
    path, subject, _, _ = subjects_csv(tmp_path / "f.csv", groups=7, recordings=1, rows=30)
    d = load_dataset(DataSpec(task="forecasting", path=str(path), features=["v"], target="v", group="subject",
                              window=6))
    seen = [set(subject[s.row]) for s in (d.train, d.val, d.test)]
    assert [len(s) for s in seen] == [5, 1, 1] and len(set.union(*seen)) == 7
    for split in (d.train, d.val, d.test):
        assert_windows_stay_inside(split, 6, subject)
        assert (subject[split.row] == subject[split.x[:, 0, 0].astype(int)]).all()


@pytest.mark.parametrize(("spec", "message"), [
    ({"task": "anomaly", "target": "v", "label": "label", "group": "subject", "split": "group"},
     'split = "group" does not apply to anomaly detection'),
    ({"task": "classification", "label": "label", "split": "stratified"}, 'split = "stratified" is for independent'),
    ({"task": "classification", "label": "label", "split": "group"}, "needs the column of groups"),
    ({"task": "classification", "label": "label", "group": "subjekt"}, "group column 'subjekt' is missing"),
])
def test_split_settings_that_cannot_work_are_refused(tmp_path, spec, message):
    path, *_ = subjects_csv(tmp_path / "s.csv", groups=4, recordings=1)
    with pytest.raises(DataError, match=message):
        load_dataset(DataSpec(path=str(path), features=["v"], window=8, **spec))


def test_too_few_groups_are_refused(tmp_path):
    path, *_ = subjects_csv(tmp_path / "s.csv", groups=2, recordings=2)
    with pytest.raises(DataError, match="2 groups are too few"):
        load_dataset(DataSpec(task="classification", path=str(path), features=["v"], label="label",
                              group="subject", window=8))


def test_default_features_leave_out_group_and_recording(tmp_path):
    path, *_ = subjects_csv(tmp_path / "s.csv", groups=4, recordings=2)
    d = load_dataset(DataSpec(task="classification", path=str(path), label="label", group="subject",
                              recording="rec", window=8))
    assert d.feature_names == ["v"]


# ---------------------------------------------------------------------------------------------- NPZ parts


def numbered_windows(n, start=0, steps=10, features=2):
    """Windows whose every value is the window's number: a split's content tells which windows it holds."""
    return np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None, None], steps, 1).repeat(features, 2)


def test_npz_validation_arrays_are_the_validation_set(tmp_path):
    y = np.arange(40) % 2
    np.savez(tmp_path / "v.npz", X=numbered_windows(40), y=y, X_val=numbered_windows(6, 1000), y_val=np.arange(6) % 2)
    d = load_dataset(DataSpec(task="classification", path=str(tmp_path / "v.npz"), layout="NTF"))
    assert sorted(d.val.x[:, 0, 0].tolist()) == list(range(1000, 1006))
    train, test = d.train.x[:, 0, 0].astype(int), d.test.x[:, 0, 0].astype(int)
    assert sorted([*train, *test]) == list(range(40))  # X went to training and test only
    assert len(test) == 6  # 15 % of each class of 20: 3


def test_npz_groups_split_by_group(tmp_path):
    groups = np.repeat(np.arange(10), 6)  # 10 subjects of 6 windows, each holding both classes
    y = np.tile([0, 1, 0, 1, 0, 1], 10)
    np.savez(tmp_path / "g.npz", X_train=numbered_windows(60), y_train=y, groups=groups)
    d = load_dataset(DataSpec(task="classification", path=str(tmp_path / "g.npz"), layout="NTF"))
    parts = [set(groups[s.x[:, 0, 0].astype(int)]) for s in (d.train, d.val, d.test)]
    assert [len(p) for p in parts] == [6, 2, 2] and len(set.union(*parts)) == 10
    for split in (d.train, d.val, d.test):
        assert set(split.y.tolist()) == {0, 1}
    np.savez(tmp_path / "bad.npz", X=numbered_windows(60), y=y, groups=groups[:50])
    with pytest.raises(DataError, match="groups has shape"):
        load_dataset(DataSpec(task="classification", path=str(tmp_path / "bad.npz"), layout="NTF"))
    np.savez(tmp_path / "none.npz", X=numbered_windows(60), y=y)
    with pytest.raises(DataError, match="needs a `groups` array"):
        load_dataset(DataSpec(task="classification", path=str(tmp_path / "none.npz"), layout="NTF", split="group"))


def test_npz_lengths_pad_short_windows_in_front_with_their_first_step(tmp_path):
    x = np.full((4, 5, 1), np.nan)  # padding after the valid steps may be anything, even NaN
    for n, length in enumerate([5, 3, 1, 4]):
        x[n, :length, 0] = np.arange(1, length + 1) + 10 * n
    np.savez(tmp_path / "l.npz", X_train=x, y_train=np.array([0, 1, 0, 1]), X_val=x[:2], y_val=[0, 1],
             X_test=x[2:], y_test=[0, 1], lengths=[5, 3, 1, 4], lengths_val=[5, 3], lengths_test=[1, 4])
    d = load_dataset(DataSpec(task="classification", path=str(tmp_path / "l.npz"), layout="NTF"))
    expect = [[1, 2, 3, 4, 5], [11, 11, 11, 12, 13], [21, 21, 21, 21, 21], [31, 31, 32, 33, 34]]
    assert d.train.x[:, :, 0].tolist() == expect
    assert d.val.x[:, :, 0].tolist() == expect[:2] and d.test.x[:, :, 0].tolist() == expect[2:]
    np.savez(tmp_path / "bad.npz", X=x, y=[0, 1, 0, 1], lengths=[5, 3, 0, 4])
    with pytest.raises(DataError, match=r"lengths\[2\] = 0; a window's valid steps are 1 to 5"):
        load_dataset(DataSpec(task="classification", path=str(tmp_path / "bad.npz"), layout="NTF"))


def test_npz_window_length_mismatch_names_the_setting(tmp_path):
    np.savez(tmp_path / "w.npz", X=np.zeros((10, 25, 3)), y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"X windows have 25 steps but the window is set to 50 \(\[data\] window in "
                                        r"a project, --window on the command line\); set it to 25"):
        load_dataset(DataSpec(task="classification", path=str(tmp_path / "w.npz"), window=50))


def test_npz_window_that_disagrees_with_window_is_refused_naming_the_option(tmp_path):
    np.savez(tmp_path / "w.npz", X=np.zeros((20, 25, 3)), y=np.arange(20) % 2)
    result = run_train([str(tmp_path / "w.npz"), "--task", "classification", "--window", "50"], tmp_path / "m.pt")
    assert result.exit_code == 1
    assert "X windows have 25 steps but the window is set to 50" in result.output
    assert "--window" in result.output and not (tmp_path / "m.pt").exists()
