"""The whole journey as cached stages: data -> plan -> train -> quantize -> firmware -> bench -> report.

A project is one TOML file (``tinylstm init`` writes a commented example) with the sections data, task, model,
train, quantization, board and bench. ``run`` writes each stage's artefacts into its own directory under the
output directory and records, in ``pipeline.json``, a content hash of each stage's inputs: its config sections
and the hashes of the upstream artefacts it reads. A rerun skips every stage whose input hash is unchanged and
whose artefacts are intact, so editing only the board rebuilds only the plan, the firmware, the benchmark and
the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinylstm import __version__
from tinylstm.data import CLASS_WEIGHTS, DATASETS, FILLNA, NORMS, SPLITS, TASKS, DataError, check_class_weight
from tinylstm.qmodel import MAX_LAYERS
from tinylstm.report import bit_exact, build_label, device_figure, headline, sample_text
from tinylstm.sampling import SAMPLES, labelled_events, take

MANIFEST = "pipeline.json"
CONFIG_COPY = "config.toml"
REPORT = "report.html"
MANIFEST_FORMAT = "tinylstm-pipeline"
MANIFEST_VERSION = 1
SERIES_POINTS = 400  # forecast/anomaly points kept for the report's plot
BENCH_TIMEOUT = 120.0  # seconds one RUN may take on the device (a big model on a slow emulated core)

_UNSET = object()
# Every config key: (type, default). A default of None means "not set"; _UNSET means "required".
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "data": {"path": (str, None), "dataset": (str, None), "features": (list, None), "window": (int, None),
             "stride": (int, 1), "norm": (str, "zscore"), "fillna": (str, "none"), "val_fraction": (float, 0.15),
             "test_fraction": (float, 0.15), "layout": (str, "auto"), "seed": (int, 0), "recording": (str, None),
             "group": (str, None), "split": (str, "auto"), "sample_rate_hz": (float, None)},
    "task": {"kind": (str, None), "label": (str, None), "target": (str, None), "horizon": (int, 1),
             "normal_rows": (int, None), "threshold_margin": (float, 1.5)},
    "model": {"name": (str, None), "hidden": (list, [32])},
    "train": {"epochs": (int, 200), "lr": (float, 3e-3), "batch_size": (int, 32), "patience": (int, 50),
              "lr_patience": (int, 10), "optimizer": (str, "adam"), "weight_decay": (float, 0.0),
              "clip_norm": (float, 1.0), "schedule": (str, "plateau"), "seed": (int, 0), "threads": (int, 1),
              "class_weight": (str, "none")},
    "quantization": {"calibration": (str, "minmax"), "percentile": (float, 99.9), "per_channel": (bool, False),
                     "qat_epochs": (int, 0), "qat_lr": (float, 1e-3)},
    "board": {"name": (str, _UNSET), "build": (bool, True)},
    "bench": {"windows": (int, 50), "sample": (str, "stratified"), "seed": (int, None), "port": (str, None)},
}

# The demo's settings per bundled dataset: models that fit the Uno and train in seconds on two cores.
# basic_motions has 32 training and 8 validation windows: too few to stop early on, so its recipe runs a fixed
# budget (full batch, a cosine schedule, weight decay) and keeps the last weights; its post-training gap is
# small enough without QAT (docs/training.md, "Repeatability", gives the spread over seeds).
DEMOS: dict[str, dict[str, dict[str, Any]]] = {
    "basic_motions": {
        "model": {"hidden": [32]},
        "train": {"epochs": 400, "lr": 1e-2, "batch_size": 32, "schedule": "cosine", "optimizer": "adamw",
                  "weight_decay": 0.1},
        "quantization": {"calibration": "percentile"},
        "bench": {"windows": 40},
    },
    "taylor_demand": {
        "model": {"hidden": [16]},
        "train": {"epochs": 150, "lr": 1e-2, "batch_size": 64, "patience": 25, "lr_patience": 8},
        "bench": {"windows": 50},
    },
    "kdd_tsad_135": {
        "task": {"threshold_margin": 2.0},
        "model": {"hidden": [16]},
        "train": {"epochs": 150, "lr": 1e-2, "batch_size": 64, "patience": 25, "lr_patience": 8},
        "bench": {"windows": 50},
    },
}


# What each value may be, checked before any stage runs: (test, what it must be). Keys not listed take any value
# of their type.
def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


_POSITIVE = ((lambda v: v > 0), "> 0")
_SHARE = ((lambda v: 0 < v < 1), "between 0 and 1 (exclusive)")
RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "data": {"window": _at_least(1), "stride": _at_least(1), "norm": _one_of(*NORMS), "fillna": _one_of(*FILLNA),
             "val_fraction": _SHARE,
             "test_fraction": _SHARE, "layout": _one_of("auto", "NTF", "NFT"), "split": _one_of(*SPLITS),
             "sample_rate_hz": _POSITIVE},
    "task": {"kind": _one_of(*TASKS), "horizon": _at_least(1),
             "normal_rows": _at_least(1), "threshold_margin": _POSITIVE},
    "train": {"epochs": _at_least(1), "lr": _POSITIVE, "batch_size": _at_least(1), "patience": _at_least(1),
              "lr_patience": _at_least(1), "optimizer": _one_of("adam", "adamw"), "weight_decay": _at_least(0),
              "clip_norm": _POSITIVE, "schedule": _one_of("plateau", "cosine"), "threads": _at_least(1),
              "class_weight": _one_of(*CLASS_WEIGHTS)},
    "quantization": {"calibration": _one_of("minmax", "percentile"),
                     "percentile": ((lambda v: 50 < v <= 100), "in (50, 100]"), "qat_epochs": _at_least(0),
                     "qat_lr": _POSITIVE},
    "bench": {"windows": _at_least(0), "sample": _one_of(*SAMPLES), "seed": _at_least(0)},
}


class PipelineError(RuntimeError):
    """A config, data, model or build problem that stops the pipeline; the message says which stage and why."""


# ------------------------------------------------------------------------------------------------- config


@dataclass
class Config:
    """A project: every section with its defaults filled in, and the command that reproduces the run."""

    sections: dict[str, dict[str, Any]]
    command: str  # e.g. "tinylstm run project.toml"

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def to_toml(self) -> str:
        """The config as TOML (keys that are not set are left out), so `tinylstm run` can repeat the run."""
        lines = [f"# tinylstm project; reproduce with: {self.command}"]
        for section, values in self.sections.items():
            lines.append(f"\n[{section}]")
            lines.extend(f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None)
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _type_name(kind: type | tuple[type, ...]) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}[kind]


def make_config(raw: dict[str, Any], command: str, base_dir: Path = Path(".")) -> Config:
    """Check a parsed config against SCHEMA, fill in defaults, and resolve the data path against ``base_dir``."""
    unknown = set(raw) - set(SCHEMA)
    if unknown:
        raise PipelineError(f"unknown config section [{sorted(unknown)[0]}]; known: {', '.join(SCHEMA)}")
    sections: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise PipelineError(f"[{section}] must be a table")
        extra = set(given) - set(keys)
        if extra:
            raise PipelineError(f"unknown key {sorted(extra)[0]!r} in [{section}]; known: {', '.join(keys)}")
        values = {}
        for key, (kind, default) in keys.items():
            if key not in given:
                if default is _UNSET:
                    raise PipelineError(f"[{section}] {key} is required")
                values[key] = list(default) if isinstance(default, list) else default
                continue
            v = given[key]
            ok = isinstance(v, int | float) if kind is float else isinstance(v, kind)
            if isinstance(v, bool) and kind is not bool:
                ok = False
            if not ok:
                raise PipelineError(f"[{section}] {key} must be {_type_name(kind)} (got {v!r})")
            values[key] = float(v) if kind is float else v
        sections[section] = values
    for section, rules in RULES.items():
        for key, (test, must_be) in rules.items():
            v = sections[section][key]
            if v is not None and not test(v):
                raise PipelineError(f"[{section}] {key} must be {must_be} (got {v!r})")
    data, model = sections["data"], sections["model"]
    if data["val_fraction"] + data["test_fraction"] >= 1:
        raise PipelineError("[data] val_fraction + test_fraction must be below 1: nothing would be left to train on")
    if (data["path"] is None) == (data["dataset"] is None):
        raise PipelineError("[data] needs either path (your CSV or NPZ file) or dataset (a bundled set)")
    if data["path"] is not None:
        data["path"] = str((base_dir / data["path"]).resolve())
        if sections["task"]["kind"] is None:
            raise PipelineError("[task] kind is required with a data file: classification, forecasting or anomaly")
    if not model["hidden"] or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                      for h in model["hidden"]):
        raise PipelineError(f"[model] hidden must be a list of positive sizes, one per layer (got {model['hidden']!r})")
    if len(model["hidden"]) > MAX_LAYERS:
        raise PipelineError(f"[model] hidden lists {len(model['hidden'])} layers; 1 to {MAX_LAYERS} are supported")
    if data["features"] is not None and not all(isinstance(f, str) for f in data["features"]):
        raise PipelineError("[data] features must be a list of column names")
    kind = sections["task"]["kind"] or DATASETS.get(data["dataset"], {}).get("task")
    try:
        if kind is not None:
            check_class_weight(kind, sections["train"]["class_weight"])
    except DataError as e:
        raise PipelineError(str(e)) from None
    return Config(sections, command)


def _check_board(name: str, port: str | None) -> None:
    """The board exists, and a serial port is set only for a real one (an emulated board gets its own)."""
    from tinylstm.boards import BoardError, load_board

    try:
        board = load_board(name)
    except BoardError as e:
        raise PipelineError(f"[board] name: {e}") from None
    if board.emulated and port is not None:
        raise PipelineError(f"[bench] port is set, but {name} is an emulated board: tinylstm starts its emulator "
                            "and connects to it; remove port, or name the real board it is connected to")


def load_config(path: str | Path) -> Config:
    """Read a project TOML file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such config file (tinylstm init writes an example)") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not valid TOML: not UTF-8 text") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"{path}: not valid TOML: {e}") from None
    return make_config(raw, f"tinylstm run {path}", path.resolve().parent)


def demo_config(dataset: str, board: str, out_dir: Path) -> Config:
    """The demo's project for a bundled dataset on a board."""
    if dataset not in DEMOS:
        raise PipelineError(f"no demo for dataset {dataset!r}; choose one of {', '.join(DEMOS)}")
    raw: dict[str, Any] = {section: dict(values) for section, values in DEMOS[dataset].items()}
    raw.setdefault("data", {})["dataset"] = dataset
    raw["board"] = {"name": board}
    raw.setdefault("model", {})["name"] = dataset
    return make_config(raw, f"tinylstm demo --dataset {dataset} --board {board} --out {out_dir}")


EXAMPLE_CONFIG = """\
# A tinylstm project: `tinylstm run {name}` trains, quantizes, builds, benchmarks and writes
# <out>/report.html. A rerun only redoes the stages whose inputs changed.

[data]
{data_line}
# dataset = "basic_motions"     # or a bundled set instead: basic_motions, taylor_demand, kdd_tsad_135
{features}
{window}
stride = 1                      # steps between window starts
norm = "zscore"                 # zscore | minmax | none (fitted on the training part only)
fillna = "none"                 # none (refuse NaN/inf) | ffill | linear | zero
{recording}
{group}
split = "auto"                  # auto | walk-forward | group | stratified (auto: group when groups are given,
                                # else walk-forward for a CSV series, stratified for NPZ windows)
val_fraction = 0.15             # walk-forward: train, then validation, then test rows; group: shares of groups
test_fraction = 0.15
# sample_rate_hz = 100          # the sensor's rate: the planner checks one model step per sample keeps up

[task]
kind = "classification"         # classification | forecasting | anomaly
{label}
# target = "temperature"        # forecasting / anomaly: the column to predict
# horizon = 1                   # forecasting: steps ahead
# normal_rows = 1000            # anomaly: rows known to be normal at the start (train + calibration)
# threshold_margin = 1.5        # anomaly: threshold = margin x largest error on normal data

[model]
hidden = [32]                   # LSTM hidden size per layer (1 to 3 layers); the planner checks the board

[train]
epochs = 200
lr = 0.003
batch_size = 32
patience = 50                   # early stopping on the validation loss
schedule = "plateau"            # plateau (early stopping, best weights) | cosine (fixed budget, last weights)
class_weight = "none"           # none | balanced (classification: weight each class by n / (classes x its count))
seed = 0

[quantization]
calibration = "minmax"          # minmax | percentile
per_channel = false             # one weight scale per gate row
qat_epochs = 0                  # > 0: quantization-aware fine-tuning when INT8 falls short of FP32

[board]
name = "uno_sim"                # `tinylstm boards` lists them; uno_sim and mps2_* run here in an emulator
build = true                    # false: only generate the PlatformIO project (real boards need internet to build)

[bench]
windows = 50                    # test windows run on the device and checked bit for bit (0: no benchmark)
sample = "stratified"           # stratified (seeded; every class, every labelled anomaly) | first | all
# seed = 0                      # the sample's seed (default: [data] seed)
# port = "/dev/ttyACM0"         # a real board's serial port (emulated boards need none)
"""


def example_config(name: str = "tinylstm.toml", data: str | None = None, source: Any = None) -> str:
    """The commented example config ``tinylstm init`` writes; ``data`` is the path of your CSV or NPZ and
    ``source`` the tinylstm.data.SourceSummary of it: its feature columns, label and ids, or its window length."""
    def line(setting: str, comment: str) -> str:
        return f"{setting:<31} # {comment}"

    data_line = line(f"path = {json.dumps(data or 'my_sensor_log.csv')}", "your CSV (one row per time step) or NPZ")
    features = line('# features = ["ax", "ay", "az"]', "input columns (default: all but label, group, recording)")
    window = line("window = 50", "time steps per window")
    label = "label"
    ids = source.ids if source is not None else []
    if source is not None and source.columns:
        data_line += f"\n# columns in {data}: {', '.join(source.columns)}"
        if ids:
            data_line += f"\n# {', '.join(ids)}: look like ids, so they are not features (see recording, group)"
        features = line("features = [", "input columns, one per line") + "\n" + \
            "".join(f"    {json.dumps(f)},\n" for f in source.features) + "]"
        label = source.label or label
    label_line = line(f"label = {json.dumps(label)}", "classification: the class column (anomaly: optional "
                      "ground truth)")
    if source is not None and not source.columns:  # an NPZ brings its classes and its window length
        label_line = line("# label = \"label\"", "not used: the NPZ's y holds the classes")
        if source.window:
            window = line(f"window = {source.window}", "time steps per window: the NPZ's own")
    recording = line(f"# recording = {json.dumps(ids[-1] if ids else 'rec')}",
                     "CSV: a column that changes between recordings; no window crosses a change")
    group = line(f"# group = {json.dumps(ids[0] if ids else 'subject')}",
                 "CSV: a column of groups (e.g. subjects); each part then holds whole groups")
    return EXAMPLE_CONFIG.format(name=name, data_line=data_line, features=features, window=window, label=label_line,
                                 recording=recording, group=group)


# --------------------------------------------------------------------------------------------- reporting


class Reporter:
    """Progress of a run. The base class is silent; ConsoleReporter prints one line per stage."""

    def start(self, config: Config, out_dir: Path) -> None:
        """The run begins."""

    def stage(self, index: int, total: int, name: str) -> None:
        """A stage begins (or is checked for a cached result)."""

    def done(self, name: str, status: str, line: str, seconds: float) -> None:
        """A stage finished: status is "ran", "cached" or "skipped"; line is its one-line result."""

    @contextlib.contextmanager
    def bar(self, total: int, label: str) -> Iterator[Callable[..., None]]:
        """A progress bar over ``total`` steps; yields ``advance(info, steps=1)``."""
        yield lambda info, steps=1: None


class ConsoleReporter(Reporter):
    """One line per stage on stdout, and a progress bar on stderr where a stage takes time."""

    def __init__(self) -> None:
        import click

        self.click = click
        self.prefix = ""

    def start(self, config: Config, out_dir: Path) -> None:
        self.click.echo(f"{config.command}\n  artefacts in {out_dir}")

    def stage(self, index: int, total: int, name: str) -> None:
        self.prefix = f"[{index}/{total}] {name:<9}"

    def done(self, name: str, status: str, line: str, seconds: float) -> None:
        tag = {"ran": f"{seconds:6.1f} s", "cached": "  cached", "skipped": " skipped"}[status]
        self.click.echo(f"{self.prefix} {tag}  {line}")

    @contextlib.contextmanager
    def bar(self, total: int, label: str) -> Iterator[Callable[..., None]]:
        if total <= 0:
            yield lambda info, steps=1: None
            return
        with self.click.progressbar(length=total, label=f"{self.prefix}  {label}", file=sys.stderr,
                                    show_eta=True, item_show_func=lambda info: info) as progress:
            yield lambda info, steps=1: progress.update(steps, info)


# ------------------------------------------------------------------------------------------------ helpers


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, value: Any) -> Path:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_plain) + "\n")
    tmp.replace(path)
    return path


def _plain(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def series_indices(split: Any, task: str) -> np.ndarray:
    """The test windows the report plots: the first SERIES_POINTS; for labelled anomalies a stretch centred on
    them, or the whole split thinned evenly when they lie further apart than that."""
    n = len(split)
    events = labelled_events(split) if task == "anomaly" else []
    if n <= SERIES_POINTS or not events:
        return np.arange(min(n, SERIES_POINTS))
    lo, hi = int(events[0][0]), int(events[-1][-1])
    if hi - lo >= SERIES_POINTS:
        return np.arange(SERIES_POINTS) * n // SERIES_POINTS
    start = min(max(0, (lo + hi) // 2 - SERIES_POINTS // 2), n - SERIES_POINTS)
    return np.arange(start, start + SERIES_POINTS)


# ------------------------------------------------------------------------------------------------- stages


@dataclass
class Context:
    """What stages share during one run: the config, the output directory, and artefacts loaded once."""

    config: Config
    out_dir: Path
    reporter: Reporter
    _cache: dict[str, Any] = field(default_factory=dict)

    def data_spec(self) -> Any:
        from tinylstm.data import DataSpec

        data, task = self.config["data"], self.config["task"]
        fields = {"task": task["kind"], "features": data["features"], "target": task["target"],
                  "label": task["label"], "window": data["window"], "stride": data["stride"],
                  "horizon": task["horizon"], "norm": data["norm"], "fillna": data["fillna"],
                  "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"],
                  "normal_rows": task["normal_rows"], "layout": data["layout"], "seed": data["seed"],
                  "recording": data["recording"], "group": data["group"], "split": data["split"]}
        if data["dataset"] is not None:
            return DataSpec.for_dataset(data["dataset"], **fields)
        return DataSpec(path=data["path"], **{k: v for k, v in fields.items() if v is not None})

    def dataset(self) -> Any:
        if "dataset" not in self._cache:
            from tinylstm.data import load_dataset

            self._cache["dataset"] = load_dataset(self.data_spec())
        return self._cache["dataset"]

    def checkpoint(self) -> Any:
        from tinylstm.train import load_checkpoint

        return load_checkpoint(self.out_dir / "train" / "model.pt")

    def qmodel(self) -> Any:
        from tinylstm import qmodel

        return qmodel.load(self.out_dir / "quantize" / "model.npz")

    def board(self) -> Any:
        from tinylstm.boards import load_board

        return load_board(self.config["board"]["name"])

    def model_name(self) -> str:
        data = self.config["data"]
        return self.config["model"]["name"] or data["dataset"] or Path(data["path"]).stem


def _source_hash(config: Config) -> str | None:
    """The content hash of the data file (None if it is missing: the data stage then reports the error)."""
    from tinylstm.data import DATA_DIR, DATASETS

    data = config["data"]
    path = Path(data["path"]) if data["path"] else DATA_DIR / DATASETS.get(data["dataset"], {}).get("file", "")
    return file_hash(path) if path.is_file() else None


def stage_data(ctx: Context, out: Path) -> tuple[dict[str, Any], str]:
    ds = ctx.dataset()
    source = ds.spec.source_path()
    summary = {"source": str(source), "source_sha256": file_hash(source), "task": ds.task,
               "features": ds.feature_names, "targets": ds.target_names, "classes": ds.classes,
               "window": ds.window, "input_size": ds.features, "outputs": ds.outputs,
               "windows": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)},
               "groups": ds.meta.get("groups"), "spec": ds.spec.to_dict()}
    write_json(out / "summary.json", summary)
    w = summary["windows"]
    what = f"{len(ds.classes)} classes" if ds.classes else f"target {', '.join(ds.target_names)}"
    line = (f"{source.name}: {ds.task}, windows {ds.window} x {ds.features}, {what}; "
            f"train/val/test {w['train']}/{w['val']}/{w['test']}")
    if summary["groups"]:
        line += "; groups " + " / ".join(", ".join(summary["groups"][part]) for part in ("train", "val", "test"))
    return summary, line


def stage_plan(ctx: Context, out: Path) -> tuple[dict[str, Any], str]:
    from tinylstm import budget
    from tinylstm import train as tr

    ds = ctx.dataset()
    hidden = ctx.config["model"]["hidden"]
    config = tr.model_config_for(ds, hidden)
    rate = ctx.config["data"]["sample_rate_hz"]
    plan = tr.plan_for(ctx.config["board"]["name"], config, ctx.config["quantization"]["per_channel"], rate)
    if not plan.fits:
        largest = budget.max_hidden(plan.board, plan.shape, variant=plan.variant, sample_rate_hz=rate)
        slow = " or a lower [data] sample_rate_hz" if "time" in plan.overflowing else ""
        advice = (f"set [model] hidden = {[largest] * len(hidden)}{slow}" if largest
                  else f"use fewer layers, a shorter window, a bigger or faster board{slow}")
        raise PipelineError(f"{plan.summary()}; {advice}")
    write_json(out / "plan.json", plan.to_dict())
    line = (f"{plan.verdict} {plan.board.name}: RAM {plan.ram.total:,}/{plan.ram.capacity:,} B, "
            f"flash {plan.flash.total:,}/{plan.flash.capacity:,} B (planner)")
    if plan.deadline:
        line += f"; {plan.deadline.line()}"
    return plan.to_dict(), line


def stage_train(ctx: Context, out: Path) -> tuple[dict[str, Any], str]:
    from tinylstm import train as tr

    t = ctx.config["train"]
    config = tr.TrainConfig(epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"], patience=t["patience"],
                            lr_patience=t["lr_patience"], optimizer=t["optimizer"], weight_decay=t["weight_decay"],
                            clip_norm=t["clip_norm"], schedule=t["schedule"], seed=t["seed"], threads=t["threads"],
                            class_weight=t["class_weight"])
    ds = ctx.dataset()
    with ctx.reporter.bar(config.epochs, "training") as advance:
        checkpoint, result = tr.train_model(
            ds, ctx.config["model"]["hidden"], config, threshold_margin=ctx.config["task"]["threshold_margin"],
            on_epoch=lambda log: advance(f"epoch {log.epoch} loss {log.train_loss:.4f} val {log.val_loss:.4f}"))
    tr.save_checkpoint(checkpoint, out / "model.pt")
    params = sum(p.numel() for p in checkpoint.model.parameters())
    summary = {"hidden": ctx.config["model"]["hidden"], "parameters": params, "best_epoch": result.best_epoch,
               "epochs_run": len(result.history), "stopped_early": result.stopped_early,
               "history": [asdict(h) for h in result.history], "fp32_test": checkpoint.extra["fp32_test"]}
    write_json(out / "training.json", summary)
    fp32 = headline(ds.task, checkpoint.extra["fp32_test"], with_name=True)
    return summary, (f"hidden {summary['hidden']}, {params:,} parameters, best epoch {result.best_epoch}/"
                     f"{len(result.history)}; FP32 test {fp32}")


def stage_quantize(ctx: Context, out: Path) -> tuple[dict[str, Any], str]:
    from tinylstm import evaluate, qmodel
    from tinylstm import quantize as qz

    q = ctx.config["quantization"]
    ds = ctx.dataset()
    config = qz.QuantConfig(per_channel=q["per_channel"], calibration=q["calibration"], percentile=q["percentile"])
    with ctx.reporter.bar(q["qat_epochs"], "QAT") as advance:
        result = qz.quantize_checkpoint(
            ctx.checkpoint(), config, qat_epochs=q["qat_epochs"], qat_lr=q["qat_lr"], dataset=ds,
            name=ctx.model_name(), on_epoch=lambda log: advance(f"epoch {log.epoch} val {log.val_loss:.4f}"))
    qmodel.save(result.qmodel, out / "model.npz")
    summary: dict[str, Any] = {"name": ctx.model_name(), "digest": result.qmodel.digest(),
                               "comparison": result.comparison.to_dict(),
                               "qat_history": [asdict(h) for h in result.qat.history] if result.qat else [],
                               "quantization": q}
    if ds.task != "classification":
        split = take(ds.test, series_indices(ds.test, ds.task))
        summary["series"] = {
            "row": split.row.tolist(), "truth": split.y[:, 0].tolist(),
            "fp32": evaluate.fp32_outputs(result.float_model, ds, split)[:, 0].tolist(),
            "int8": evaluate.int8_outputs(result.qmodel, ds, split)[:, 0].tolist(),
            "target": ds.target_names[0], "truth_flags": None if split.truth is None else split.truth.tolist()}
    write_json(out / "evaluation.json", summary)
    line = result.comparison.summary().splitlines()[0]
    if result.qat:  # the FP32 figure is then the fine-tuned float model's, not the trained checkpoint's
        line = f"after {len(result.qat.history)} QAT epochs: {line}"
    return summary, line


def stage_firmware(ctx: Context, out: Path) -> tuple[dict[str, Any], str]:
    from tinylstm import firmware

    board = ctx.board()
    model = ctx.qmodel()
    try:
        (plan,) = firmware.check_fits(model, board)
        project = firmware.generate_project(model, board, out / "project")
        summary: dict[str, Any] = {"board": board.name, "project": "project", "kernel": project.variant,
                                   "built": False}
        flash, ram = firmware.predicted_sizes(plan)
        summary["planner"] = {"flash": flash, "ram": ram, "stack": board.overhead.ram["stack"]}
        if ctx.config["board"]["build"]:
            result = firmware.build(project)
            sizes = result.sizes
            summary.update(built=True, compiler=result.compiler,
                           elf=str(result.elf.relative_to(out)),
                           linker={"text": sizes.text, "data": sizes.data, "bss": sizes.bss, "flash": sizes.flash,
                                   "ram": sizes.ram})
    except firmware.FirmwareError as e:
        raise PipelineError(str(e)) from None
    write_json(out / "build.json", summary)
    if not summary["built"]:
        return summary, f"generated the PlatformIO project for {board.name} (not built: [board] build = false)"
    linker = summary["linker"]
    return summary, (f"built with {summary['compiler']} ({summary['kernel']} kernel): flash {linker['flash']:,} B, "
                     f"RAM {linker['ram']:,} B "
                     f"(.data+.bss) of {board.flash_bytes:,}/{board.ram_bytes:,} B")


def stage_bench(ctx: Context, out: Path) -> tuple[dict[str, Any], str] | None:
    from tinylstm import bench as hil_bench
    from tinylstm import budget, firmware, hil

    settings, board = ctx.config["bench"], ctx.board()
    build = read_json(ctx.out_dir / "firmware" / "build.json")
    if settings["windows"] <= 0 or not build["built"] or (not board.emulated and not settings["port"]):
        return None
    model = ctx.qmodel()
    test_windows = len(ctx.dataset().test)
    windows = test_windows if settings["sample"] == "all" else min(settings["windows"], test_windows)
    seed = ctx.config["data"]["seed"] if settings["seed"] is None else settings["seed"]
    try:
        with contextlib.ExitStack() as stack:
            if board.emulated:
                url = stack.enter_context(firmware.start_emulator(board, ctx.out_dir / "firmware" / build["elf"])).url
            else:
                firmware.upload(firmware.Project.open(ctx.out_dir / "firmware" / "project"), settings["port"])
                url = settings["port"]
            client = stack.enter_context(hil.connect(url, baudrate=hil_bench.baudrate(board), timeout=BENCH_TIMEOUT))
            with ctx.reporter.bar(windows, "windows on the device") as advance:
                entry = hil_bench.bench_model(client, model, windows=windows, source="data", seed=seed,
                                              sample=settings["sample"], on_progress=lambda n: advance("", n))
            info = client.info
    except (hil_bench.BenchError, hil.HILError) as e:
        raise PipelineError(str(e)) from None
    per_window, accuracy = entry["latency"]["per_window"], entry["accuracy"]
    summary = {
        "board": board.name, "emulator": f"{board.emulator.kind} {board.emulator.machine}" if board.emulated else None,
        "cpu_hz": info.cpu_hz, "counter": info.counter_kind, "unit": info.unit, "method": entry["method"],
        "windows": entry["windows"], "steps_per_window": model.input.window, "mismatches": entry["mismatches"],
        "first_mismatch": entry["first_mismatch"], "counts": entry["counts"],
        "stats": {**{k: per_window[k] for k in ("min", "median", "p99", "max")},
                  "per_step_median": entry["latency"]["per_step"]["median"]},
        "free_ram": info.free_ram, "compiler": build.get("compiler"),
        "test_windows": test_windows, "sample": accuracy["sample"],
        "device": accuracy["device"], "device_interval": accuracy["device_interval"],
        "host_int8": accuracy["host_int8"], "deadline": None,
    }
    rate = ctx.config["data"]["sample_rate_hz"]
    measured = None
    if rate is not None:
        # The measured mean step of the median window (its reset and dense head included) against the period.
        measured = budget.timed(board, summary["stats"]["per_step_median"], info.unit, rate, budget.DEFAULT_MARGIN,
                                "measured (median window / steps)")
        summary["deadline"] = measured.to_dict()
    write_json(out / "bench.json", summary)
    exact = bit_exact(entry["windows"], entry["mismatches"])
    if entry["mismatches"]:
        exact += f": {entry['mismatches']} MISMATCHES"
    device = device_figure(ctx.dataset().task, summary["device"], entry["windows"], summary["device_interval"])
    sample = sample_text(summary["sample"], entry["windows"], test_windows)
    line = f"{exact} ({sample}); median {per_window['median']:,.0f} {info.unit} per window; {device}"
    if measured:
        line += f"; measured mean {measured.text()}"
    return summary, line


def stage_report(ctx: Context, out: Path) -> tuple[dict[str, Any], str]:
    from tinylstm import report

    report.write_report(ctx.out_dir, out / REPORT)
    return {"report": REPORT}, str(ctx.out_dir / REPORT)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections its key covers
    upstream: tuple[str, ...]  # stages whose artefact hashes its key covers
    run: Callable[[Context, Path], tuple[dict[str, Any], str] | None]  # None: nothing to do (skipped)
    root_files: tuple[str, ...] = ()  # files it writes at the top of the output directory instead of its own
    fingerprint: Callable[[Config], Any] | None = None  # more key material (the data file's content hash)


def _sample_rate(config: Config) -> float | None:
    """[data] sample_rate_hz, which the plan and the bench judge the step time against (no retraining)."""
    return config["data"]["sample_rate_hz"]


# The plan runs before training (budget first) but is not in the training key: a new board retrains nothing.
STAGES = (
    Stage("data", ("data", "task"), (), stage_data, fingerprint=lambda config: _source_hash(config)),
    Stage("plan", ("model", "board", "quantization"), ("data",), stage_plan, fingerprint=_sample_rate),
    Stage("train", ("model", "train", "task"), ("data",), stage_train),
    Stage("quantize", ("quantization", "model"), ("train",), stage_quantize),
    Stage("firmware", ("board",), ("quantize",), stage_firmware),
    Stage("bench", ("bench", "board"), ("firmware", "quantize"), stage_bench, fingerprint=_sample_rate),
    Stage("report", (), ("data", "plan", "train", "quantize", "firmware", "bench"), stage_report, (REPORT,)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ------------------------------------------------------------------------------------------------- runner


@dataclass
class RunResult:
    out_dir: Path
    ran: list[str]
    cached: list[str]
    skipped: list[str]
    summaries: dict[str, dict[str, Any]]

    @property
    def report(self) -> Path:
        return self.out_dir / REPORT


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "stages": {}}
    manifest = read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise PipelineError(f"{path} is not a tinylstm pipeline manifest of version {MANIFEST_VERSION}")
    return manifest


def _outputs(out_dir: Path, stage: Stage) -> dict[str, str]:
    """sha256 of every artefact a stage wrote, by path relative to ``out_dir`` (of PlatformIO's .pio build tree,
    only the ELF)."""
    paths = [out_dir / name for name in stage.root_files]
    if (out_dir / stage.name).is_dir():
        paths += sorted(p for p in (out_dir / stage.name).rglob("*") if p.is_file())
    return {str(p.relative_to(out_dir)): file_hash(p) for p in paths
            if ".pio" not in p.parts or p.name == "firmware.elf"}


def _intact(out_dir: Path, outputs: dict[str, str]) -> bool:
    return all((out_dir / rel).is_file() and file_hash(out_dir / rel) == sha for rel, sha in outputs.items())


def _stage_key(stage: Stage, config: Config, manifest: dict[str, Any]) -> str:
    upstream = {name: manifest["stages"].get(name, {}).get("outputs") for name in stage.upstream}
    extra = stage.fingerprint(config) if stage.fingerprint else None
    return _digest({"stage": stage.name, "tinylstm": __version__, "config": {s: config[s] for s in stage.sections},
                    "upstream": upstream, "extra": extra})


def _foreign(out_dir: Path, manifest: dict[str, Any]) -> str | None:
    """The first path under a name the pipeline writes that its manifest does not list as its own, or None.

    The pipeline only ever replaces what it wrote: a stage directory, a top-level file of a stage, or the config
    copy it made (recorded by hash, so a copy the user has edited is theirs again).
    """
    for stage in STAGES:
        record = manifest["stages"].get(stage.name, {})
        listed = set(record.get("outputs", {}))
        for name in stage.root_files:
            if (out_dir / name).exists() and name not in listed:
                return name
        directory = out_dir / stage.name
        if not directory.exists() and not directory.is_symlink():
            continue
        if not record or directory.is_symlink() or not directory.is_dir():
            return stage.name
        for path in directory.rglob("*"):
            rel = path.relative_to(out_dir)
            if ".pio" in rel.parts or path.is_dir() and not path.is_symlink():
                continue  # PlatformIO's build tree is the firmware stage's own; directories are checked by content
            if str(rel) not in listed:
                return str(rel)
    config_copy = out_dir / CONFIG_COPY
    if config_copy.exists() and (not config_copy.is_file() or file_hash(config_copy) != manifest.get("config_copy")):
        return CONFIG_COPY
    return None


def _install(tmp: Path, out_dir: Path, stage: Stage) -> None:
    """Move a finished stage's files from its temporary directory into place."""
    for name in stage.root_files:
        os.replace(tmp / name, out_dir / name)
    final = out_dir / stage.name
    if stage.root_files:
        shutil.rmtree(tmp)
        return
    old = out_dir / f".{stage.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _run_stage(stage: Stage, ctx: Context, tmp: Path) -> tuple[dict[str, Any], str] | None:
    """Run one stage; library errors become a PipelineError naming the stage."""
    from tinylstm import budget, evaluate, export, firmware, qmodel
    from tinylstm import quantize as qz
    from tinylstm import train as tr
    from tinylstm.boards import BoardError
    from tinylstm.data import DataError

    try:
        return stage.run(ctx, tmp)
    except (PipelineError, DataError, tr.TrainError, qz.QuantizeError, evaluate.EvaluateError,
            qmodel.ModelFormatError, BoardError, budget.PlanError, export.ExportError, firmware.FirmwareError) as e:
        raise PipelineError(f"{stage.name}: {e}") from None


def run(config: Config, out_dir: str | Path, reporter: Reporter | None = None) -> RunResult:
    """Run every stage whose inputs changed since the last run into ``out_dir``; return what ran.

    Each stage works in a temporary directory that replaces ``out_dir/<stage>`` only when it succeeds,
    and the manifest is rewritten after every stage, so a failure leaves the earlier stages usable.
    """
    out_dir = Path(out_dir).resolve()
    reporter = reporter or Reporter()
    _check_board(config["board"]["name"], config["bench"]["port"])
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    foreign = _foreign(out_dir, manifest)
    if foreign:
        raise PipelineError(f"{out_dir / foreign} is not tinylstm output ({MANIFEST} does not list it); "
                            "nothing was changed: move it, or choose another output directory")
    manifest["command"] = config.command
    (out_dir / CONFIG_COPY).write_text(config.to_toml())
    manifest["config_copy"] = file_hash(out_dir / CONFIG_COPY)
    write_json(out_dir / MANIFEST, manifest)
    ctx = Context(config, out_dir, reporter)
    result = RunResult(out_dir, [], [], [], {})
    reporter.start(config, out_dir)
    for index, stage in enumerate(STAGES, 1):
        reporter.stage(index, len(STAGES), stage.name)
        key = _stage_key(stage, config, manifest)
        record = manifest["stages"].get(stage.name)
        if record and record["key"] == key and _intact(out_dir, record["outputs"]):
            result.cached.append(stage.name)
            result.summaries[stage.name] = record["summary"]
            reporter.done(stage.name, "cached", record["line"], 0.0)
            continue
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage.name}.", dir=out_dir))
        try:
            outcome = _run_stage(stage, ctx, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.monotonic() - start
        if outcome is None:
            shutil.rmtree(tmp)
            shutil.rmtree(out_dir / stage.name, ignore_errors=True)
            summary, line, status = {}, _skip_reason(config), "skipped"
            result.skipped.append(stage.name)
        else:
            _install(tmp, out_dir, stage)
            (summary, line), status = outcome, "ran"
            result.ran.append(stage.name)
        result.summaries[stage.name] = summary
        manifest["stages"][stage.name] = {"key": key, "status": status, "line": line, "summary": summary,
                                          "outputs": _outputs(out_dir, stage), "seconds": round(seconds, 2)}
        write_json(out_dir / MANIFEST, manifest)
        reporter.done(stage.name, status, line, seconds)
    return result


def _skip_reason(config: Config) -> str:
    bench, board = config["bench"], config["board"]
    if bench["windows"] <= 0:
        return "no benchmark ([bench] windows = 0)"
    if not board["build"]:
        return "no benchmark: the firmware was not built"
    return f"no benchmark: {board['name']} is a real board and [bench] port is not set"


def summary_text(result: RunResult) -> str:
    """The closing summary: quality (FP32 and INT8 host on the whole test split), the device (windows bit-exact,
    its own figure with the sample size), latency, real time, memory against the board, artefacts."""
    from tinylstm.budget import Deadline

    s = result.summaries
    lines = ["", "Summary"]
    evaluation, bench, build = s.get("quantize"), s.get("bench") or None, s.get("firmware")
    if evaluation:
        c = evaluation["comparison"]
        def show(metrics: dict[str, Any]) -> str:
            return headline(c["task"], metrics, with_name=True)

        lines.append(f"  {'quality':<10} FP32 {show(c['fp32'])}   INT8 host {show(c['int8'])}"
                     f"   (all {s['data']['windows']['test']} test windows)")
    if bench:
        figure = device_figure(s["data"]["task"], bench["device"], bench["windows"], bench["device_interval"])
        lines.append(f"  {'device':<10} {bit_exact(bench['windows'], bench['mismatches'])} ({bench['board']}; "
                     f"{sample_text(bench['sample'], bench['windows'], bench['test_windows'])})")
        lines.append(f"  {'':<10} {figure}")
        stats, unit = bench["stats"], bench["unit"]
        line = (f"  {'latency':<10} {stats['median']:,.0f} {unit} per inference "
                f"({stats['per_step_median']:,.0f} per step")
        if unit == "cycles":
            line += f"; {stats['median'] / bench['cpu_hz'] * 1e3:,.1f} ms at {bench['cpu_hz'] / 1e6:g} MHz"
        line += build_label(build)
        lines.append(line + ")")
    if bench and bench.get("deadline"):
        lines.append(f"  {'real time':<10} measured mean {Deadline.from_dict(bench['deadline']).text()}")
    elif s.get("plan", {}).get("deadline"):
        planned = Deadline.from_dict(s["plan"]["deadline"])
        lines.append(f"  {'real time':<10} {'bound' if planned.upper_bound else 'predicted'} {planned.text()}")
    if build and build.get("linker"):
        linker, plan = build["linker"], s["plan"]
        lines.append(f"  {'memory':<10} RAM {linker['ram']:,} / {plan['ram']['capacity']:,} B (.data+.bss; "
                     f"+{build['planner']['stack']:,} B stack reserve)   flash {linker['flash']:,} / "
                     f"{plan['flash']['capacity']:,} B")
    out = result.out_dir
    lines.append(f"  {'artefacts':<10} model {out / 'quantize' / 'model.npz'}")
    if build:
        lines.append(f"  {'':<10} firmware {out / 'firmware' / 'project'}")
    lines.append(f"  {'':<10} report {result.report}")
    return "\n".join(lines)
