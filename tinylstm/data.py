"""The data pipeline: CSV series, NPZ windows and the bundled demo sets, cut into normalised windows.

Series (CSV, one row per time step) are split walk-forward: training rows come first, then validation, then
test, and time is never shuffled. Sets of independent windows (NPZ) are split stratified by class. The
normaliser is fitted on the training part only and travels with the model.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("classification", "forecasting", "anomaly")
NORMS = ("zscore", "minmax", "none")
FILLNA = ("none", "ffill", "linear", "zero")
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
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
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
    for name, role in ((spec.label, "label"), (target, "target")):
        if name:
            _column_index(path, header, name, role)
    features = spec.features or [h for h in header if h != spec.label]
    if not features:
        raise DataError(f"{path}: no feature columns")
    cols = [_column_index(path, header, name, "feature") for name in features]
    series = np.stack([_numeric_column(path, rows, c, name) for c, name in zip(cols, features, strict=True)], 1)
    series = fill_missing(series, features, spec.fillna, str(path))
    window = spec.window
    if window is None:
        raise DataError("a CSV series needs the window length (--window)")
    n = len(series)

    if task == "classification":
        labels = [r[header.index(spec.label)].strip() for r in rows]
        classes = _classes(labels, f"{path}: label column {spec.label!r}")
        y_all = np.array([classes.index(v) for v in labels], dtype=np.int64)
        need = window
        _check_length(path, n, need, window)
        bounds = _walk_forward_bounds(n, spec)
        splits = []
        for lo, hi in bounds:  # whole windows inside each part, labelled by their last row
            starts = np.arange(lo, hi - window + 1, spec.stride)
            last = starts + window - 1
            splits.append(Split(x=_gather(series, starts, window), y=y_all[last], row=last))
        _check_splits(path, splits, bounds, window)
        norm = Normalizer.fit(series[bounds[0][0]:bounds[0][1]], spec.norm)
        return Dataset(spec, task, features, [], classes, norm, None, *splits)

    t_col = _numeric_column(path, rows, header.index(target), target)[:, None]
    t_col = fill_missing(t_col, [target], spec.fillna, str(path))[:, 0]
    horizon = spec.horizon if task == "forecasting" else 1
    _check_length(path, n, window + horizon, window)
    truth_all = None
    if task == "anomaly":
        normal = spec.normal_rows or int(round(n * (1 - spec.test_fraction)))
        if not window + 2 <= normal < n:
            raise DataError(f"normal_rows = {normal} must leave at least one window before it and one row after it"
                            f" (series of {n} rows, window {window})")
        cut = int(round(normal * (1 - spec.val_fraction)))
        bounds = [(0, cut), (cut, normal), (normal, n)]
        if spec.label:
            truth_all = _numeric_column(path, rows, header.index(spec.label), spec.label)
            truth_all = (np.nan_to_num(truth_all) != 0).astype(np.int64)
    else:
        bounds = _walk_forward_bounds(n, spec)
    splits = []
    for k, (lo, hi) in enumerate(bounds):
        # Each window's targets lie inside the part; its inputs may reach back into the past.
        first = max(lo, window)
        stride = 1 if (task == "anomaly" and k == 2) else spec.stride  # score every test point
        rows_t = np.arange(first, hi - horizon + 1, stride)
        starts = rows_t - window
        y = np.stack([t_col[rows_t + j] for j in range(horizon)], 1).astype(np.float32)
        naive = np.repeat(t_col[rows_t - 1][:, None], horizon, 1).astype(np.float32)
        truth = truth_all[rows_t] if truth_all is not None else None
        splits.append(Split(x=_gather(series, starts, window), y=y, row=rows_t, naive=naive, truth=truth))
    _check_splits(path, splits, bounds, window + horizon)
    train_rows = series[: bounds[0][1]]
    norm = Normalizer.fit(train_rows, spec.norm)
    if target in features:
        i = features.index(target)
        target_norm = Normalizer(norm.kind, norm.offset[i:i + 1].copy(), norm.scale[i:i + 1].copy())
    else:
        target_norm = Normalizer.fit(t_col[: bounds[0][1], None], spec.norm)
    meta = {"normal_rows": bounds[1][1]} if task == "anomaly" else {}
    return Dataset(spec, task, features, [target], None, norm, target_norm, *splits, meta=meta)


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


def _check_splits(path: Path, splits: list[Split], bounds: list[tuple[int, int]], need: int) -> None:
    for name, split, (lo, hi) in zip(("training", "validation", "test"), splits, bounds, strict=True):
        if len(split) == 0:
            raise DataError(f"{path}: the {name} part (rows {lo}-{hi - 1}) is shorter than one window"
                            f" ({need} rows); use a shorter --window or more data")


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
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable NPZ file ({e})") from None
    if "X_train" in arrays:
        names = {"X_train", "y_train", "X_test", "y_test"}
    else:
        names = {"X", "y"}
    missing = sorted(names - arrays.keys())
    if missing:
        raise DataError(f"{path}: array(s) {', '.join(missing)} missing; expected X and y,"
                        " or X_train, y_train, X_test and y_test")
    parts = {}
    for key in sorted(names):
        a = arrays[key]
        if key.startswith("X"):
            if a.ndim != 3:
                raise DataError(f"{path}: {key} has shape {list(a.shape)}; expected [N, T, F] or [N, F, T]")
            if not np.issubdtype(a.dtype, np.number):
                raise DataError(f"{path}: {key} has non-numeric dtype {a.dtype}")
            a = _to_ntf(a, spec, path, key)
            a = np.stack([fill_missing(w, [f"feature {i}" for i in range(a.shape[2])], spec.fillna,
                                       f"{path}: {key} window {n}") for n, w in enumerate(a)])
        parts[key] = a
    stored = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    all_y = np.concatenate([parts[k] for k in sorted(names) if k.startswith("y")])
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

    rng = np.random.default_rng(spec.seed)
    if "X_train" in parts:
        x_tr, y_tr = parts["X_train"], encode(parts["y_train"])
        test = Split(x=parts["X_test"].astype(np.float32), y=encode(parts["y_test"]))
    else:
        x_all, y_all = parts["X"], encode(parts["y"])
        _check_pairs(path, x_all, y_all, "X", "y")
        tr, te = _stratified(y_all, spec.test_fraction, rng)
        x_tr, y_tr = x_all[tr], y_all[tr]
        test = Split(x=x_all[te].astype(np.float32), y=y_all[te])
    _check_pairs(path, x_tr, y_tr, "X_train", "y_train")
    _check_pairs(path, test.x, test.y, "X_test", "y_test")
    tr, va = _stratified(y_tr, spec.val_fraction, rng)
    train = Split(x=x_tr[tr].astype(np.float32), y=y_tr[tr])
    val = Split(x=x_tr[va].astype(np.float32), y=y_tr[va])
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise DataError(f"{path}: too few windows for a training, validation and test split")
    norm = Normalizer.fit(train.x, spec.norm)
    features = [f"feature {i}" for i in range(train.x.shape[2])]
    return Dataset(spec, "classification", features, [], classes, norm, None, train, val, test)


def _to_ntf(a: np.ndarray, spec: DataSpec, path: Path, key: str) -> np.ndarray:
    layout = spec.layout
    if layout == "auto":
        if spec.window is not None and a.shape[1] != a.shape[2] and spec.window in a.shape[1:]:
            layout = "NTF" if a.shape[1] == spec.window else "NFT"
        elif a.shape[1] == a.shape[2]:
            raise DataError(f"{path}: {key} is {list(a.shape)}: cannot tell time from features; pass --layout NTF|NFT")
        else:  # fewer features than time steps is the usual case
            layout = "NFT" if a.shape[1] < a.shape[2] else "NTF"
    if layout not in ("NTF", "NFT"):
        raise DataError(f"unknown layout {layout!r}; choose NTF, NFT or auto")
    a = a.transpose(0, 2, 1) if layout == "NFT" else a
    if spec.window is not None and a.shape[1] != spec.window:
        raise DataError(f"{path}: {key} windows have {a.shape[1]} steps, not --window {spec.window}")
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
