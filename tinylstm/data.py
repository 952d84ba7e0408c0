"""The data pipeline: CSV series, NPZ windows and the bundled demo sets, cut into normalised windows.

Series (CSV, one row per time step) are split walk-forward: training rows come first, then validation, then
test, and time is never shuffled. Sets of independent windows (NPZ) are split stratified by class. Either can
instead be split by groups (subjects, sessions): each part then holds whole groups. A CSV may hold many
recordings: no window crosses a change of the recording or group column. The normaliser is fitted on the
training part only and travels with the model.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("classification", "forecasting", "anomaly")
PARTS = ("train", "val", "test")  # the splits, in the order the loaders return them
NORMS = ("zscore", "minmax", "none")
FILLNA = ("none", "ffill", "linear", "zero")
# auto: group when groups are given, else walk-forward for a CSV series and stratified for NPZ windows.
SPLITS = ("auto", "walk-forward", "stratified", "group")
CLASS_WEIGHTS = ("none", "balanced")
GROUP_DEALS = 200  # seeded random deals of groups into parts tried by a group split
ID_WORDS = ("id", "subject", "subj", "rec", "recording", "session", "user", "participant")
ID_RUN = 20  # an integer column whose value holds for this many rows on average looks like an id
LABEL_NAMES = ("label", "labels", "class", "activity", "y", "anomaly", "is_anomaly")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # training runs in float32
DATA_DIR = Path(__file__).resolve().parent / "data"


class DataError(ValueError):
    """Input data that cannot be turned into windows: the message says what and where."""


# The bundled demo sets (tinylstm/data, see NOTICE.md there) and the settings that suit them.
DATASETS: dict[str, dict[str, Any]] = {
    "basic_motions": {"file": "basic_motions.npz", "task": "classification", "layout": "NFT"},
    "taylor_demand": {"file": "taylor_demand.csv", "task": "forecasting", "features": ["demand"],
                      "target": "demand", "window": 48},
    "kdd_tsad_135": {"file": "kdd_tsad_135.csv", "task": "anomaly", "features": ["value"], "target": "value",
                     "label": "label", "window": 32, "normal_rows": 1200},
}


@dataclass
class DataSpec:
    """Everything needed to rebuild the same windows and splits from the same source."""

    task: str
    path: str | None = None  # a CSV or NPZ file
    dataset: str | None = None  # or a bundled demo set
    features: list[str] | None = None  # CSV feature columns; default: every column but label/target-only ones
    target: str | None = None  # forecasting/anomaly: the column to predict
    label: str | None = None  # classification: the class column; anomaly: the ground-truth column (evaluation)
    window: int | None = None
    stride: int = 1
    horizon: int = 1  # forecasting: how many future steps to predict
    norm: str = "zscore"
    fillna: str = "none"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    normal_rows: int | None = None  # anomaly: length of the known-normal prefix used for training/calibration
    layout: str = "auto"  # NPZ: "NTF", "NFT" or "auto"
    seed: int = 0
    recording: str | None = None  # CSV: a column whose value changes between recordings
    group: str | None = None  # CSV: a column of groups (subjects) for split = "group"
    split: str = "auto"  # one of SPLITS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)

    @classmethod
    def for_dataset(cls, name: str, **overrides: Any) -> DataSpec:
        """The spec of a bundled demo set, with the given fields (when not None) overriding its defaults."""
        if name not in DATASETS:
            raise DataError(f"unknown dataset {name!r}; bundled: {', '.join(DATASETS)}")
        preset = {k: v for k, v in DATASETS[name].items() if k != "file"}
        preset.update({k: v for k, v in overrides.items() if v is not None})
        return cls(dataset=name, **preset)

    def source_path(self) -> Path:
        if self.dataset is not None:
            if self.dataset not in DATASETS:
                raise DataError(f"unknown dataset {self.dataset!r}; bundled: {', '.join(DATASETS)}")
            return DATA_DIR / DATASETS[self.dataset]["file"]
        if self.path is None:
            raise DataError("no data given: pass a CSV/NPZ file or --dataset")
        return Path(self.path)


@dataclass
class Normalizer:
    """x_norm = (x - offset) / scale, per column."""

    kind: str
    offset: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, kind: str) -> Normalizer:
        """Fit on training values [..., F]; a constant column gets scale 1."""
        v = np.asarray(values, dtype=np.float64).reshape(-1, values.shape[-1])
        if kind == "zscore":
            offset, scale = v.mean(axis=0), v.std(axis=0)
        elif kind == "minmax":
            offset, scale = v.min(axis=0), v.max(axis=0) - v.min(axis=0)
        elif kind == "none":
            offset, scale = np.zeros(v.shape[1]), np.ones(v.shape[1])
        else:
            raise DataError(f"unknown normalisation {kind!r}; choose one of {', '.join(NORMS)}")
        scale = np.where(scale > 1e-12, scale, 1.0)
        return cls(kind, offset, scale)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.offset) / self.scale).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * self.scale + self.offset

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": self.offset.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        return cls(d["kind"], np.asarray(d["offset"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64))


@dataclass
class Split:
    """Windows of one split, in original units.

    x: float32 [N, T, F]. y: int64 class indices [N] (classification) or float32 targets [N, O].
    For series, row holds the index of each window's (first) target or label row, naive the last-value
    forecast [N, O], and truth the anomaly ground truth of the target row (0/1) when a label column is given.
    """

    x: np.ndarray
    y: np.ndarray
    row: np.ndarray | None = None
    naive: np.ndarray | None = None
    truth: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Dataset:
    spec: DataSpec
    task: str
    feature_names: list[str]
    target_names: list[str]
    classes: list[str] | None
    input_norm: Normalizer
    target_norm: Normalizer | None
    train: Split
    val: Split
    test: Split
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> int:
        return self.train.x.shape[1]

    @property
    def features(self) -> int:
        return self.train.x.shape[2]

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else self.train.y.shape[1]

    def inputs(self, split: Split) -> np.ndarray:
        """Normalised model inputs, float32 [N, T, F]."""
        return self.input_norm.apply(split.x)

    def targets(self, split: Split) -> np.ndarray:
        """Model targets: class indices, or normalised target values."""
        if self.task == "classification":
            return split.y
        assert self.target_norm is not None
        return self.target_norm.apply(split.y[..., None])[..., 0]

    def to_units(self, y_norm: np.ndarray) -> np.ndarray:
        """Normalised model outputs back to the target's original units."""
        assert self.target_norm is not None
        return self.target_norm.invert(np.asarray(y_norm)[..., None])[..., 0]


def load_dataset(spec: DataSpec) -> Dataset:
    """Read the source the spec names, check it, window it, split it and fit the normaliser."""
    if spec.task not in TASKS:
        raise DataError(f"unknown task {spec.task!r}; choose one of {', '.join(TASKS)}")
    if spec.norm not in NORMS:
        raise DataError(f"unknown normalisation {spec.norm!r}; choose one of {', '.join(NORMS)}")
    if spec.fillna not in FILLNA:
        raise DataError(f"unknown --fillna {spec.fillna!r}; choose one of {', '.join(FILLNA)}")
    if spec.split not in SPLITS:
        raise DataError(f"unknown split {spec.split!r}; choose one of {', '.join(SPLITS)}")
    for name in ("window", "stride", "horizon"):
        v = getattr(spec, name)
        if v is not None and v < 1:
            raise DataError(f"{name} must be >= 1 (got {v})")
    path = spec.source_path()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if spec.task != "classification":
            raise DataError(f"{path}: NPZ windows are supported for classification only; use a CSV series")
        return _load_npz(spec, path)
    if suffix in (".csv", ".txt"):
        return _load_csv(spec, path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .npz")


# ---------------------------------------------------------------------------------------------------- CSV


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file, as strings."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 CSV file (save it as UTF-8 text with a header row of column "
                        "names)") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({e})") from None
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header line and at least one data row")
    header = [h.strip() for h in rows[0]]
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {n} has {len(r)} fields, the header has {len(header)}")
    return header, rows[1:]


def _column_index(path: Path, header: list[str], name: str, role: str) -> int:
    if name not in header:
        raise DataError(f"{path}: {role} column {name!r} is missing (columns: {', '.join(header)})")
    return header.index(name)


def _numeric_column(path: Path, rows: list[list[str]], col: int, name: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for n, r in enumerate(rows):
        s = r[col].strip()
        if s == "" or s.lower() in ("nan", "na", "null"):
            out[n] = np.nan
            continue
        try:
            out[n] = float(s)
        except ValueError:
            raise DataError(
                f"{path}: column {name!r}, line {n + 2}: {s!r} is not a number"
                " (choose numeric feature columns with --features)"
            ) from None
    return out


def fill_missing(values: np.ndarray, names: list[str], how: str, where: str) -> np.ndarray:
    """Check a [T, F] series for NaN/inf; fill them as `how` says, or raise DataError naming the first one."""
    values = np.array(values, dtype=np.float64)
    huge = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
    if huge.any():
        t, f = np.argwhere(huge)[0]
        raise DataError(f"{where}: column {names[f]!r} has the value {values[t, f]:g} at {_row_name(where, int(t))}, "
                        f"beyond float32's range (|x| <= {FLOAT32_MAX:.3g}) that training uses")
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    if how == "none":
        t, f = np.argwhere(bad)[0]
        kind = "NaN/empty" if np.isnan(values[t, f]) else "infinite"
        raise DataError(
            f"{where}: column {names[f]!r} has {int(bad[:, f].sum())} NaN/inf values, first a {kind} value at "
            f"{_row_name(where, int(t))}; fix the data or pass --fillna ffill|linear|zero"
        )
    for f in range(values.shape[1]):
        col, miss = values[:, f], bad[:, f]
        if not miss.any():
            continue
        if miss.all():
            raise DataError(f"{where}: column {names[f]!r} has no finite value to fill from")
        idx = np.arange(len(col))
        if how == "zero":
            col[miss] = 0.0
        elif how == "linear":
            col[miss] = np.interp(idx[miss], idx[~miss], col[~miss])
        else:  # ffill; a leading gap takes the first valid value
            last = np.maximum.accumulate(np.where(miss, 0, idx))
            first = idx[~miss][0]
            col[:] = np.where(miss & (idx < first), col[first], col[last])
    return values


def _row_name(where: str, t: int) -> str:
    return f"line {t + 2}" if where.lower().endswith((".csv", ".txt")) else f"step {t}"


def _load_csv(spec: DataSpec, path: Path) -> Dataset:
    header, rows = read_csv(path)
    task = spec.task
    if task == "classification" and not spec.label:
        raise DataError("classification from a CSV needs the label column (--label)")
    target = spec.target
    if task in ("forecasting", "anomaly") and not target:
        if spec.features and len(spec.features) == 1:
            target = spec.features[0]
        else:
            raise DataError(f"{task} needs the column to predict (--target)")
    for name, role in ((spec.label, "label"), (target, "target"), (spec.recording, "recording"),
                       (spec.group, "group")):
        if name:
            _column_index(path, header, name, role)
    split = _series_split(spec, path)
    features = spec.features or [h for h in header if h not in (spec.label, spec.recording, spec.group)]
    if not features:
        raise DataError(f"{path}: no feature columns")
    cols = [_column_index(path, header, name, "feature") for name in features]
    series = np.stack([_numeric_column(path, rows, c, name) for c, name in zip(cols, features, strict=True)], 1)
    series = fill_missing(series, features, spec.fillna, str(path))
    window = spec.window
    if window is None:
        raise DataError("a CSV series needs the window length (--window)")
    n = len(series)
    # Runs of rows with one recording and group value: no window crosses a change of either.
    keys = [[r[header.index(c)].strip() for r in rows] for c in (spec.recording, spec.group) if c]
    segments = _segments(n, keys)
    groups = np.array(keys[-1]) if spec.group else None

    if task == "classification":
        labels = [r[header.index(spec.label)].strip() for r in rows]
        classes = _classes(labels, f"{path}: label column {spec.label!r}")
        y_all = np.array([classes.index(v) for v in labels], dtype=np.int64)
        _check_length(path, n, window, window)
        # A window is labelled by its last row (the anchor) and lies wholly inside its part.
        if split == "group":
            anchors = _anchors(segments, (0, n), window - 1, 1, window - 1, spec.stride)
            parts, train_rows, members = _group_split(spec, str(path), groups, anchors, y_all[anchors], len(classes))
            places, meta = _group_places(members), {"groups": dict(zip(PARTS, members, strict=True))}
        else:
            bounds = _walk_forward_bounds(n, spec)
            parts = [_anchors(segments, b, window - 1, 1, window - 1, spec.stride) for b in bounds]
            train_rows, places, meta = slice(*bounds[0]), [f"rows {lo}-{hi - 1}" for lo, hi in bounds], {}
        splits = [Split(x=_gather(series, a - window + 1, window), y=y_all[a], row=a) for a in parts]
        _check_splits(path, splits, places, window, len(segments) > 1)
        _check_training_classes(str(path), classes, splits, split)
        norm = Normalizer.fit(series[train_rows], spec.norm)
        return Dataset(spec, task, features, [], classes, norm, None, *splits, meta=meta)

    t_col = _numeric_column(path, rows, header.index(target), target)[:, None]
    t_col = fill_missing(t_col, [target], spec.fillna, str(path))[:, 0]
    horizon = spec.horizon if task == "forecasting" else 1
    _check_length(path, n, window + horizon, window)
    truth_all = None
    strides = [spec.stride] * 3
    if task == "anomaly":
        normal = spec.normal_rows or int(round(n * (1 - spec.test_fraction)))
        if not window + 2 <= normal < n:
            raise DataError(f"normal_rows = {normal} must leave at least one window before it and one row after it"
                            f" (series of {n} rows, window {window})")
        cut = int(round(normal * (1 - spec.val_fraction)))
        bounds = [(0, cut), (cut, normal), (normal, n)]
        strides[2] = 1  # score every test point
        if spec.label:
            truth_all = _numeric_column(path, rows, header.index(spec.label), spec.label)
            truth_all = (np.nan_to_num(truth_all) != 0).astype(np.int64)
            if truth_all[:normal].any():
                first = int(np.argmax(truth_all))
                raise DataError(f"{path}: normal_rows = {normal} overlaps a labelled anomaly, first at line "
                                f"{first + 2} (label column {spec.label!r}); the model must train on normal rows "
                                f"only: set normal_rows ([task] normal_rows / --normal-rows) to at most {first}")
    else:
        bounds = _walk_forward_bounds(n, spec)
    # A window's anchor is its first target row; the targets lie inside the part, the inputs may reach back.
    if split == "group":
        anchors = _anchors(segments, (0, n), window, horizon, 0, spec.stride)
        parts, train_rows, members = _group_split(spec, str(path), groups, anchors, None, 1)
        places = _group_places(members)
    else:
        parts = [_anchors(segments, b, window, horizon, 0, s) for b, s in zip(bounds, strides, strict=True)]
        train_rows, places = slice(0, bounds[0][1]), [f"rows {lo}-{hi - 1}" for lo, hi in bounds]
    splits = []
    for rows_t in parts:
        y = np.stack([t_col[rows_t + j] for j in range(horizon)], 1).astype(np.float32)
        naive = np.repeat(t_col[rows_t - 1][:, None], horizon, 1).astype(np.float32)
        truth = truth_all[rows_t] if truth_all is not None else None
        splits.append(Split(x=_gather(series, rows_t - window, window), y=y, row=rows_t, naive=naive, truth=truth))
    _check_splits(path, splits, places, window + horizon, len(segments) > 1)
    norm = Normalizer.fit(series[train_rows], spec.norm)
    if target in features:
        i = features.index(target)
        target_norm = Normalizer(norm.kind, norm.offset[i:i + 1].copy(), norm.scale[i:i + 1].copy())
    else:
        target_norm = Normalizer.fit(t_col[train_rows, None], spec.norm)
    meta = {"normal_rows": bounds[1][1]} if task == "anomaly" else {}
    if split == "group":
        meta["groups"] = dict(zip(PARTS, members, strict=True))
    return Dataset(spec, task, features, [target], None, norm, target_norm, *splits, meta=meta)


def _series_split(spec: DataSpec, path: Path) -> str:
    """The split a CSV series gets: auto is group with a group column, else walk-forward."""
    split = spec.split
    if split == "auto":
        split = "group" if spec.group and spec.task != "anomaly" else "walk-forward"
    if split == "stratified":
        raise DataError(f"{path}: split = \"stratified\" is for independent NPZ windows; the overlapping windows "
                        "of a CSV series would share rows across parts: use split = \"walk-forward\" or \"group\"")
    if split == "group" and not spec.group:
        raise DataError(f"{path}: split = \"group\" needs the column of groups, e.g. subjects "
                        "([data] group / --group)")
    if split == "group" and spec.task == "anomaly":
        raise DataError(f"{path}: split = \"group\" does not apply to anomaly detection, which trains on the "
                        "known-normal prefix (normal_rows); use recording to keep windows inside one recording")
    return split


def _segments(n: int, keys: list[list[str]]) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) over which every key column keeps its value (one range without keys)."""
    cuts = np.unique(np.concatenate([np.zeros(0, np.int64)] + [np.flatnonzero(k[1:] != k[:-1]) + 1
                                                               for k in map(np.asarray, keys)]))
    edges = [0, *cuts.tolist(), n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _anchors(segments: list[tuple[int, int]], part: tuple[int, int], before: int, after: int, own: int,
             stride: int) -> np.ndarray:
    """Anchor rows r of windows covering rows [r - before, r + after) inside one segment, with rows
    [r - own, r + after) inside ``part``; every ``stride``-th from the first in each segment."""
    lo, hi = part
    found = [np.arange(max(slo + before, lo + own), min(shi, hi) - after + 1, stride) for slo, shi in segments]
    return np.concatenate([np.zeros(0, np.int64), *found]).astype(np.int64)


def _group_places(members: list[list[str]]) -> list[str]:
    """How an error names each part of a group split: by its groups."""
    return [f"groups {', '.join(m)}" for m in members]


def _group_split(spec: DataSpec, where: str, groups: np.ndarray, anchors: np.ndarray, labels: np.ndarray | None,
                 n_classes: int) -> tuple[list[np.ndarray], np.ndarray, list[list[str]]]:
    """The anchors of the train, validation and test parts, the training rows (a mask), and each part's groups."""
    if not len(anchors):
        raise DataError(f"{where}: no recording or group is long enough for one window; use a shorter --window")
    names, inverse = np.unique(groups[anchors], return_inverse=True)
    part = _deal_groups(names, inverse, labels, n_classes, [spec.val_fraction, spec.test_fraction],
                        np.random.default_rng(spec.seed), where)
    parts = [anchors[part[inverse] == k] for k in range(3)]
    train_rows = np.isin(groups, names[part == 0])
    return parts, train_rows, [sorted(names[part == k].tolist(), key=_natural_key) for k in range(3)]


def _deal_groups(names: np.ndarray, inverse: np.ndarray, labels: np.ndarray | None, n_classes: int,
                 fractions: list[float], rng: np.random.Generator, where: str) -> np.ndarray:
    """The part of every group: 0 (training), or k for the held-out part of ``fractions[k - 1]``.

    Each held-out part gets round(fraction x groups) groups, at least one, and training the rest (at least one).
    Groups are dealt by number, not by size. Of up to GROUP_DEALS seeded random deals, the first in which every
    class has a window in every part is kept; if none has that, the deal whose training part holds the most
    classes, then the most (part, class) pairs. ``inverse`` maps windows to groups; ``labels`` are their classes
    (None: no classes to balance).
    """
    count = len(names)
    sizes = [max(1, int(round(count * f))) for f in fractions]
    if count - sum(sizes) < 1:
        raise DataError(f"{where}: {count} groups are too few to split into training, validation and test by "
                        f"group; each part needs one (more groups, or split = \"walk-forward\")")
    present = np.zeros((count, n_classes), dtype=bool)
    present[inverse, labels if labels is not None else 0] = True
    best, best_score = np.zeros(count, np.int64), (-1, -1)
    for _ in range(GROUP_DEALS):
        order, part = rng.permutation(count), np.zeros(count, np.int64)
        for k, end in enumerate(np.cumsum(sizes), 1):
            part[order[end - sizes[k - 1]:end]] = k
        cover = [present[part == k].any(axis=0).sum() for k in range(len(sizes) + 1)]
        score = (cover[0], sum(cover))
        if score > best_score:
            best, best_score = part, score
        if score[1] == n_classes * len(cover):
            break
    return best


def _check_training_classes(where: str, classes: list[str], splits: list[Split], split: str) -> None:
    """Refuse a split whose training part lacks a class: the model could never predict it."""
    train, val, test = (np.bincount(s.y, minlength=len(classes)) for s in splits)
    missing = np.flatnonzero(train == 0)
    if not len(missing):
        return
    c = int(missing[0])
    fix = ("a later class needs rows in the training part: split by groups ([data] group and split = \"group\" / "
           "--group COLUMN --split group) or lower val_fraction/test_fraction" if split == "walk-forward" else
           "change [data] seed / --seed or the fractions, or give more groups or windows of that class")
    raise DataError(f"{where}: class {classes[c]!r} has no window in the training part ({val[c]} in validation, "
                    f"{test[c]} in test); {fix}")


def _check_length(path: Path, n: int, need: int, window: int) -> None:
    if n < need:
        raise DataError(f"{path}: the series has {n} rows but one window needs {need} (window {window});"
                        " use a shorter --window or more data")


def _walk_forward_bounds(n: int, spec: DataSpec) -> list[tuple[int, int]]:
    """Row ranges of the train, validation and test parts, in time order."""
    if not (0 < spec.val_fraction < 1 and 0 < spec.test_fraction < 1 and spec.val_fraction + spec.test_fraction < 1):
        raise DataError("val and test fractions must be in (0, 1) and sum to less than 1")
    a = int(round(n * (1 - spec.val_fraction - spec.test_fraction)))
    b = int(round(n * (1 - spec.test_fraction)))
    return [(0, a), (a, b), (b, n)]


def _check_splits(path: Path, splits: list[Split], places: list[str], need: int, segmented: bool) -> None:
    inside = " inside one recording" if segmented else ""
    for name, split, place in zip(("training", "validation", "test"), splits, places, strict=True):
        if len(split) == 0:
            raise DataError(f"{path}: the {name} part ({place}) holds no whole window of {need} rows{inside}; "
                            "use a shorter --window or more data")


def _gather(series: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    idx = starts[:, None] + np.arange(window)[None, :]
    return series[idx].astype(np.float32)


def _classes(labels: list[Any], where: str) -> list[str]:
    """The sorted class names of ``labels``; a missing label, or numbers that are not whole (a measurement, not a
    class), is a DataError."""
    texts = [str(v).strip() for v in labels]
    for n, text in enumerate(texts):
        if text.lower() in ("", "nan", "none", "null"):
            what = repr(text) if text else "empty"
            raise DataError(f"{where}: label {n + 1} is {what}; every window needs a class")
    numbers = [_natural_key(t)[1] for t in texts if _natural_key(t)[0] == 0]
    if len(numbers) == len(texts) and any(not math.isfinite(x) or not x.is_integer() for x in numbers):
        raise DataError(f"{where} holds fractional numbers ({len(set(texts))} distinct values), not classes; "
                        "use class names or whole-number codes, or a forecasting task for a numeric target")
    classes = sorted(set(texts), key=_natural_key)
    if len(classes) < 2:
        raise DataError(f"{where} has a single class ({classes[0]!r}); classification needs at least two")
    return classes


def _natural_key(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


# ---------------------------------------------------------------------------------------------------- NPZ


def _load_npz(spec: DataSpec, path: Path) -> Dataset:
    if spec.recording or spec.group:
        raise DataError(f"{path}: recording and group name CSV columns; an NPZ gives each window's group in a "
                        "`groups` array instead")
    arrays = _read_npz(path)
    main = "X_train" if "X_train" in arrays else "X"
    names = {"train": (main, "y" + main[1:], "lengths")}
    for part in ("val", "test"):
        if f"X_{part}" in arrays or f"y_{part}" in arrays:
            names[part] = (f"X_{part}", f"y_{part}", f"lengths_{part}")
    missing = sorted({key for xk, yk, _ in names.values() for key in (xk, yk)} - arrays.keys())
    if missing:
        raise DataError(f"{path}: array(s) {', '.join(missing)} missing; expected X and y (or X_train and y_train),"
                        " optionally with X_val and y_val, X_test and y_test")
    xs = {part: _npz_windows(spec, path, arrays, xk, lk) for part, (xk, _, lk) in names.items()}
    for part, (xk, yk, _) in names.items():
        _check_pairs(path, xs[part], arrays[yk], xk, yk)
    stored = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    all_y = np.concatenate([arrays[yk] for _, yk, _ in names.values()])
    if stored is not None and np.issubdtype(all_y.dtype, np.integer):
        if all_y.min() < 0 or all_y.max() >= len(stored):
            raise DataError(f"{path}: labels must index the {len(stored)} classes")
        classes = stored
        if len(np.unique(all_y)) < 2:
            raise DataError(f"{path}: y has a single class ({classes[int(all_y[0])]!r}); "
                            "classification needs at least two")
    else:
        classes = _classes(list(all_y), f"{path}: y")

    def encode(y: np.ndarray) -> np.ndarray:
        if stored is not None and np.issubdtype(y.dtype, np.integer):
            return y.astype(np.int64)
        return np.array([classes.index(str(v)) for v in y], dtype=np.int64)

    ys = {part: encode(arrays[yk]) for part, (_, yk, _) in names.items()}
    split, held = _npz_split(spec, path, arrays, main), [p for p in ("test", "val") if p not in names]
    rng = np.random.default_rng(spec.seed)
    fractions = {"val": spec.val_fraction, "test": spec.test_fraction}
    if split == "group" and held:
        groups = np.asarray(arrays["groups"])
        if groups.shape != ys["train"].shape:
            raise DataError(f"{path}: groups has shape {list(groups.shape)}; it needs one group per window of "
                            f"{main} ({len(ys['train'])})")
        group_names, inverse = np.unique(groups.astype(str), return_inverse=True)
        part = _deal_groups(group_names, inverse, ys["train"], len(classes), [fractions[p] for p in held], rng,
                            f"{path}: groups")[inverse]
        take = {p: np.flatnonzero(part == k) for k, p in enumerate(["train", *held])}
    else:  # stratified: the test part first, then validation from the rest
        take, remaining = {}, np.arange(len(ys["train"]))
        for p in held:
            keep, out = _stratified(ys["train"][remaining], fractions[p], rng)
            take[p], remaining = remaining[out], remaining[keep]
        take["train"] = remaining
    parts = {p: Split(x=xs[p].astype(np.float32), y=ys[p]) for p in names if p != "train"}
    parts.update({p: Split(x=xs["train"][idx].astype(np.float32), y=ys["train"][idx]) for p, idx in take.items()})
    train, val, test = parts["train"], parts["val"], parts["test"]
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise DataError(f"{path}: too few windows for a training, validation and test split")
    _check_training_classes(str(path), classes, [train, val, test], split)
    norm = Normalizer.fit(train.x, spec.norm)
    features = [f"feature {i}" for i in range(train.x.shape[2])]
    return Dataset(spec, "classification", features, [], classes, norm, None, train, val, test)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable NPZ file ({e})") from None


def _npz_split(spec: DataSpec, path: Path, arrays: dict[str, np.ndarray], main: str) -> str:
    """The split NPZ windows get: auto is group with a groups array, else stratified."""
    split = spec.split
    if split == "auto":
        split = "group" if "groups" in arrays else "stratified"
    if split == "walk-forward":
        raise DataError(f"{path}: split = \"walk-forward\" is for a CSV series; NPZ windows are split "
                        "\"stratified\" or by \"group\" (with a groups array)")
    if split == "group" and "groups" not in arrays:
        raise DataError(f"{path}: split = \"group\" needs a `groups` array in the NPZ, one group per window of {main}")
    return split


def _npz_windows(spec: DataSpec, path: Path, arrays: dict[str, np.ndarray], key: str, lengths: str) -> np.ndarray:
    """The windows of array ``key`` as [N, T, F], padded as ``lengths`` says, NaN/inf checked or filled."""
    a = arrays[key]
    if a.ndim != 3:
        raise DataError(f"{path}: {key} has shape {list(a.shape)}; expected [N, T, F] or [N, F, T]")
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{path}: {key} has non-numeric dtype {a.dtype}")
    a = _to_ntf(a, spec.layout, spec.window, path, key)
    if lengths in arrays:
        a = _pad_front(a, arrays[lengths], path, lengths)
    return np.stack([fill_missing(w, [f"feature {i}" for i in range(a.shape[2])], spec.fillna,
                                  f"{path}: {key} window {n}") for n, w in enumerate(a)])


def _pad_front(a: np.ndarray, lengths: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Windows of recordings shorter than T steps: window n holds ``lengths[n]`` valid steps at its start, then
    padding. The padding is dropped, the valid steps move to the end of the window, and the front is filled with
    the first valid step repeated: the model reads its state after the last step, and the device runs all T."""
    lengths = np.asarray(lengths)
    steps = a.shape[1]
    if lengths.shape != (len(a),) or not np.issubdtype(lengths.dtype, np.integer):
        raise DataError(f"{path}: {key} must hold one whole number per window ({len(a)}); it has shape "
                        f"{list(lengths.shape)} and dtype {lengths.dtype}")
    bad = np.flatnonzero((lengths < 1) | (lengths > steps))
    if len(bad):
        raise DataError(f"{path}: {key}[{bad[0]}] = {lengths[bad[0]]}; a window's valid steps are 1 to {steps}")
    return np.stack([np.concatenate([np.repeat(w[:1], steps - n, 0), w[:n]]) for w, n in zip(a, lengths, strict=True)])


def _to_ntf(a: np.ndarray, layout: str, window: int | None, path: Path, key: str) -> np.ndarray:
    if layout == "auto":
        if window is not None and a.shape[1] != a.shape[2] and window in a.shape[1:]:
            layout = "NTF" if a.shape[1] == window else "NFT"
        elif a.shape[1] == a.shape[2]:
            raise DataError(f"{path}: {key} is {list(a.shape)}: cannot tell time from features; pass --layout NTF|NFT")
        else:  # fewer features than time steps is the usual case
            layout = "NFT" if a.shape[1] < a.shape[2] else "NTF"
    if layout not in ("NTF", "NFT"):
        raise DataError(f"unknown layout {layout!r}; choose NTF, NFT or auto")
    a = a.transpose(0, 2, 1) if layout == "NFT" else a
    if window is not None and a.shape[1] != window:
        raise DataError(f"{path}: {key} windows have {a.shape[1]} steps but the window is set to {window} "
                        f"([data] window in a project, --window on the command line); set it to {a.shape[1]} "
                        "or leave it unset")
    return a


def _check_pairs(path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{path}: {xname} has {len(x)} windows but {yname} has {len(y)} labels")


def _stratified(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): `fraction` of every class held out (at least one when the class has two)."""
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(len(idx) - 1, max(1, int(math.floor(len(idx) * fraction + 0.5)))) if len(idx) > 1 else 0
        held.extend(idx[:k])
        keep.extend(idx[k:])
    return np.sort(np.array(keep, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def check_class_weight(task: str, how: str) -> None:
    """Class weights exist for classification only."""
    if how not in CLASS_WEIGHTS:
        raise DataError(f"unknown class_weight {how!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
    if how != "none" and task != "classification":
        raise DataError(f"class_weight = {how!r} ([train] class_weight / --class-weight) weights the classes of a "
                        f"classification task; this is a {task} task: use \"none\"")


# ------------------------------------------------------------------------------------------ first look (init)


@dataclass
class SourceSummary:
    """What ``tinylstm init`` learns from a data file: a CSV's columns and their likely roles, an NPZ's window."""

    columns: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)  # numeric columns that are neither the label nor id-like
    label: str | None = None  # the likely class column: a usual name, else the first non-numeric column
    ids: list[str] = field(default_factory=list)  # columns that look like recording or subject ids
    window: int | None = None  # NPZ: its window length (None when time and features cannot be told apart)


def inspect_source(path: Path) -> SourceSummary:
    """Look at a CSV's columns or an NPZ's windows to fill in a project config."""
    if path.suffix.lower() == ".npz":
        arrays = _read_npz(path)
        key = "X_train" if "X_train" in arrays else "X"
        if key not in arrays or arrays[key].ndim != 3:
            raise DataError(f"{path}: expected windows X (or X_train) of shape [N, T, F] or [N, F, T]")
        try:
            return SourceSummary(window=_to_ntf(arrays[key], "auto", None, path, key).shape[1])
        except DataError:
            return SourceSummary()
    header, rows = read_csv(path)
    numeric = {}
    for i, name in enumerate(header):
        try:
            numeric[name] = _numeric_column(path, rows, i, name)
        except DataError:
            continue
    label = next((h for h in header if h.lower() in LABEL_NAMES), None) or \
        next((h for h in header if h not in numeric), None)
    ids = [h for h in header if h != label and looks_like_id(h, numeric.get(h))]
    features = [h for h in header if h in numeric and h != label and h not in ids]
    return SourceSummary(columns=header, features=features, label=label, ids=ids)


def looks_like_id(name: str, values: np.ndarray | None) -> bool:
    """A column that names recordings or subjects rather than measuring something: an id-like name (subject, rec,
    session, user, ..._id), or whole numbers that hold their value over runs of ID_RUN rows or more on average."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    if any(w in ID_WORDS or w.rstrip("s") in ID_WORDS or (w.endswith("id") and w[:-2] in ID_WORDS) for w in words):
        return True
    if values is None or not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        return False
    runs = 1 + int(np.count_nonzero(values[1:] != values[:-1]))
    return runs > 1 and len(values) / runs >= ID_RUN
