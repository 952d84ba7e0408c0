"""Budget-aware model search: the best LSTM among those that fit the board, on a local Ray instance or a cluster.

1. Enumerate candidates over hidden size, layers, window, stride and learning rate; sample ``budget_trials``.
2. Plan each with the memory-budget planner (and, given ``[data] sample_rate_hz``, its deadline check). Candidates
   that do not fit the board, or cannot keep up with the sample rate, are pruned and never trained.
3. Train and quantize every remaining candidate as a Ray Tune trial (the same recipe ``tinylstm run`` uses), and
   evaluate it in INT8 through the integer reference on the validation split. ASHA stops trials whose validation
   loss lags.
4. Estimate each model's latency on the board with the cost model calibrated by the kernel benchmark suite.
5. Report the Pareto front (validation INT8 quality against counts per inference against RAM), recommend one model,
   evaluate that model alone on the test split, and write its project config for ``tinylstm run``; optionally run
   that project (retrain, build, benchmark) to confirm it.

The driver (this process) plans, schedules, writes the records and prints progress; trials run in Ray workers,
which need nothing from the driver's disk: the package travels as a Ray runtime-env module and a user's data file
through the object store. Every finished trial is recorded under ``<out>/trials`` (with its quantized model), so a
stopped search resumes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tinylstm import __version__, boards, budget, costmodel, evaluate
from tinylstm.export import ModelShape, default_variant

OBJECTIVES = ("accuracy", "latency", "balanced")
DEFAULT_HIDDEN = (4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)
DEFAULT_LAYERS = (1, 2, 3)
# The kernel benchmark suite's measurements (docs/performance.md), the default calibration of the cost model.
DEFAULT_CALIBRATION = costmodel.DEFAULT_CALIBRATION
# Quality the latency and balanced objectives give up: 1 point of accuracy/F1 (1% of RMSE) for the fastest model,
# and the same for each halving of the counts per inference (balanced).
TOLERANCE = 0.01
STATE_FILE = "search.json"
RESULTS_FILE = "results.json"
RECOMMENDED_CONFIG = "recommended.toml"
RECOMMENDED_DIR = "recommended"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
FINISHED = ("completed", "stopped", "failed")  # "crashed" (worker lost after every retry) reruns on --resume
# 2: trials ranked on the validation split (version 1 ranked them on the test split, and cannot be resumed).
STATE_VERSION = 2


class SearchError(RuntimeError):
    """A search that cannot start or continue; the message says why."""


class TrialFailure(RuntimeError):
    """A trial whose own settings fail (NaN loss, a setting the trainer or quantizer rejects)."""


# ----------------------------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    hidden: tuple[int, ...]
    window: int
    stride: int
    lr: float

    @property
    def id(self) -> str:
        return f"h{'-'.join(map(str, self.hidden))}_w{self.window}_s{self.stride}_lr{self.lr:g}"

    def shape(self, input_size: int, outputs: int) -> ModelShape:
        return ModelShape(input_size=input_size, hidden_sizes=self.hidden, window=self.window, outputs=outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), "window": self.window, "stride": self.stride, "lr": self.lr}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(tuple(int(h) for h in d["hidden"]), int(d["window"]), int(d["stride"]), float(d["lr"]))


@dataclass
class SearchSpace:
    """The values to combine. ``None`` for windows, strides or lrs: the project's own value only."""

    hidden: Sequence[int] = DEFAULT_HIDDEN
    layers: Sequence[int] = DEFAULT_LAYERS
    windows: Sequence[int] | None = None
    strides: Sequence[int] | None = None
    lrs: Sequence[float] | None = None

    def candidates(self, window: int, stride: int, lr: float, fixed_windows: bool) -> list[Candidate]:
        """Every combination, smallest first. Sets of ready windows (NPZ) keep their window and stride."""
        windows = [window] if fixed_windows or not self.windows else sorted(set(self.windows))
        strides = [stride] if fixed_windows or not self.strides else sorted(set(self.strides))
        lrs = sorted(set(self.lrs)) if self.lrs else [lr]
        return [Candidate((h,) * n, w, s, r) for n in sorted(set(self.layers)) for h in sorted(set(self.hidden))
                for w in windows for s in strides for r in lrs]


@dataclass
class SearchSettings:
    """What to search and how. ``project`` holds the `tinylstm run` config sections the candidates share."""

    board: str
    project: dict[str, dict[str, Any]]
    space: SearchSpace = field(default_factory=SearchSpace)
    objective: str = "accuracy"
    budget_trials: int | None = None  # at most this many candidates are trained (a seeded sample of those that fit)
    seed: int = 0
    report_every: int = 10  # epochs between the reports ASHA decides on
    early_stop: bool = True  # ASHA
    grace_fraction: float = 0.25  # ASHA's grace period, as a share of the epochs
    reduction_factor: float = 3.0
    retries: int = 1  # reruns of a trial whose worker died
    cpus_per_trial: float = 1.0
    calibration: Sequence[Path] = (DEFAULT_CALIBRATION,)  # measurement files for the cost model
    variant: str | None = None  # the kernel planned and costed (export.VARIANTS); None: the board's fastest, which
    # `tinylstm run` builds

    def key(self) -> dict[str, Any]:
        """The settings that decide the candidates and their results: a resumed search must match them."""
        return {"board": self.board, "project": self.project, "space": asdict(self.space),
                "budget_trials": self.budget_trials, "seed": self.seed, "report_every": self.report_every,
                "early_stop": self.early_stop, "grace_fraction": self.grace_fraction,
                "reduction_factor": self.reduction_factor, "variant": self.variant}


def project_sections(dataset: str | None = None, path: str | None = None, **sections: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """The shared project sections: the demo's recipe for a bundled dataset, the defaults otherwise, then
    ``sections`` (per-section overrides; values of None are ignored)."""
    from tinylstm import pipeline

    raw: dict[str, dict[str, Any]] = {}
    if dataset is not None:
        raw = {name: dict(values) for name, values in pipeline.DEMOS.get(dataset, {}).items()}
    raw.setdefault("data", {}).update({"dataset": dataset, "path": path})
    for name, values in sections.items():
        raw.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
    raw.pop("model", None)
    raw.pop("board", None)
    return {name: {k: v for k, v in values.items() if v is not None} for name, values in raw.items()}


def project_config(project: dict[str, dict[str, Any]], candidate: Candidate, board: str, fixed_windows: bool,
                   name: str, command: str) -> Any:
    """The complete `tinylstm run` config (a tinylstm.pipeline.Config) of one candidate."""
    from tinylstm import pipeline

    raw = {section: dict(values) for section, values in project.items()}
    data = raw.setdefault("data", {})
    if not fixed_windows:
        data.update(window=candidate.window, stride=candidate.stride)
    raw.setdefault("train", {})["lr"] = candidate.lr
    raw["model"] = {"name": name, "hidden": list(candidate.hidden)}
    raw["board"] = {"name": board, **raw.get("board", {})}
    try:
        return pipeline.make_config(raw, command)
    except pipeline.PipelineError as e:
        raise SearchError(str(e)) from None


# --------------------------------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs, sent once through the object store."""

    project: dict[str, dict[str, Any]]
    board: str
    fixed_windows: bool
    name: str
    report_every: int
    source_name: str | None = None  # a user's data file travels as bytes: the workers may not see the driver's disk
    source_bytes: bytes | None = None


def _materialize(job: TrialJob) -> dict[str, dict[str, Any]]:
    """The project with the data path pointing at a local copy of the driver's data file."""
    project = {section: dict(values) for section, values in job.project.items()}
    if job.source_bytes is None:
        return project
    digest = hashlib.sha256(job.source_bytes).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "tinylstm-search-data" / digest
    path = folder / str(job.source_name)
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(job.source_bytes)
        os.replace(tmp, path)
    project["data"]["path"] = str(path)
    return project


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """One Ray Tune trial: train, quantize and evaluate a candidate exactly as `tinylstm run` would.

    Reports the best validation loss so far every ``report_every`` epochs (ASHA decides on it), then a final
    result with the FP32 and INT8 (integer reference) validation metrics (``validation_quality``), the model's
    digest and the quantized model itself; the test split is left for the recommended model. A failure of the
    candidate's own settings ends the trial with a ``failed`` result instead of an exception, so it is recorded
    once and not retried; retries are for workers that die.
    """
    from ray import tune

    from tinylstm import pipeline, qmodel, quantize, train

    candidate = Candidate.from_dict(params["candidate"])
    start = time.monotonic()
    best = math.inf

    def on_epoch(log: train.EpochLog) -> None:
        nonlocal best
        if not (math.isfinite(log.train_loss) and math.isfinite(log.val_loss)):
            raise TrialFailure(f"loss is {log.train_loss if not math.isfinite(log.train_loss) else log.val_loss} "
                               f"at epoch {log.epoch}")
        best = min(best, log.val_loss)
        if log.epoch % job.report_every == 0:
            tune.report({"val_loss": best, "epoch": log.epoch})

    try:
        config = project_config(_materialize(job), candidate, job.board, job.fixed_windows, job.name, "")
        ctx = pipeline.Context(config, Path("."), pipeline.Reporter())
        dataset = ctx.dataset()
        t, q = config["train"], config["quantization"]
        checkpoint, result = train.train_model(dataset, list(candidate.hidden), train.TrainConfig(**t),
                                               on_epoch=on_epoch, threshold_margin=config["task"]["threshold_margin"])
        quant = quantize.quantize_checkpoint(
            checkpoint, quantize.QuantConfig(per_channel=q["per_channel"], calibration=q["calibration"],
                                             percentile=q["percentile"]),
            qat_epochs=q["qat_epochs"], qat_lr=q["qat_lr"], dataset=dataset, name=job.name, split=dataset.val)
        with tempfile.TemporaryDirectory() as tmp:
            model = qmodel.save(quant.qmodel, Path(tmp) / "model.npz").read_bytes()
    except (TrialFailure, SearchError, ValueError, qmodel.ModelFormatError, RuntimeError) as e:
        tune.report({"val_loss": math.inf, "failed": f"{type(e).__name__}: {e}",
                     "seconds": time.monotonic() - start})
        return
    tune.report({"val_loss": result.best_val_loss, "epoch": len(result.history), **validation_quality(quant, dataset),
                 "digest": quant.qmodel.digest(), "model": base64.b64encode(model).decode("ascii"),
                 "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                 "seconds": time.monotonic() - start})


def validation_quality(quant: Any, dataset: Any) -> dict[str, Any]:
    """The metric a trial is ranked on, FP32 and INT8, on the validation split: the task's headline metric, except
    for anomaly detection, whose validation windows are known-normal (no anomaly to score): its forecast RMSE."""
    if dataset.task != "anomaly":
        c = quant.comparison
        return {"metric": c.headline, "val_fp32": c.fp32[c.headline], "val_int8": c.int8[c.headline]}
    outputs = {"fp32": evaluate.fp32_outputs(quant.float_model, dataset, dataset.val),
               "int8": evaluate.int8_outputs(quant.qmodel, dataset, dataset.val)}
    return {"metric": "rmse", **{f"val_{side}": evaluate.forecasting_metrics(out, dataset.val)["rmse"]
                                 for side, out in outputs.items()}}


def recommended_test_quality(model_path: Path, dataset: Any) -> dict[str, Any]:
    """The INT8 (integer reference) headline metric of a trial's model on the test split: computed once, for the
    recommended model."""
    from tinylstm import qmodel

    try:
        model = qmodel.load(model_path)
    except qmodel.ModelFormatError as e:
        raise SearchError(f"{e}; the recommended trial's model is missing: run the search again into another --out"
                          ) from None
    metric = evaluate.HEADLINE[dataset.task]
    out = evaluate.metrics(dataset.task, evaluate.int8_outputs(model, dataset, dataset.test), dataset, dataset.test,
                           model.meta.get("anomaly_threshold"))
    return {"split": "test", "metric": metric, "int8": out[metric], "windows": len(dataset.test)}


# ---------------------------------------------------------------------------------------------------- ranking


def quality_loss(metric: str, value: float, best: float) -> float:
    """How far a result is from the best: points of accuracy/F1, or relative RMSE above the best."""
    if metric == "rmse":
        return value / best - 1.0 if best > 0 else value - best
    return best - value


def best_value(metric: str, values: Sequence[float]) -> float:
    return min(values) if metric == "rmse" else max(values)


def pareto_front(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials no other trial beats on validation INT8 quality, counts per inference and RAM at
    once."""
    done = [r for r in records if r["status"] == "completed"]
    if not done:
        return []
    metric = done[0]["result"]["metric"]
    sign = -1.0 if metric == "rmse" else 1.0

    def axes(r: dict[str, Any]) -> tuple[float, float, float]:
        return (-sign * r["result"]["val_int8"], r["latency"]["per_window"], r["plan"]["ram"])

    front = []
    for r in done:
        a = axes(r)
        dominated = any(all(x <= y for x, y in zip(axes(o), a, strict=True)) and axes(o) != a for o in done)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["latency"]["per_window"], r["plan"]["ram"]))


def recommend(records: Sequence[dict[str, Any]], objective: str) -> dict[str, Any] | None:
    """The recommended completed trial for an objective (docs/search.md defines each), by validation quality."""
    done = [r for r in records if r["status"] == "completed"]
    if not done:
        return None
    metric = done[0]["result"]["metric"]
    best = best_value(metric, [r["result"]["val_int8"] for r in done])
    fastest = min(r["latency"]["per_window"] for r in done)

    def loss(r: dict[str, Any]) -> float:
        return quality_loss(metric, r["result"]["val_int8"], best)

    def tie(r: dict[str, Any]) -> tuple[float, int, str]:
        return (r["latency"]["per_window"], r["plan"]["ram"], r["id"])

    if objective == "accuracy":
        return min(done, key=lambda r: (loss(r), *tie(r)))
    if objective == "latency":
        near = [r for r in done if loss(r) <= TOLERANCE + 1e-12]
        return min(near, key=lambda r: (r["latency"]["per_window"], loss(r), r["plan"]["ram"], r["id"]))
    return min(done, key=lambda r: (round(loss(r) + TOLERANCE * math.log2(r["latency"]["per_window"] / fastest), 9),
                                    *tie(r)))


# --------------------------------------------------------------------------------------------------- progress


class Progress:
    """Progress of a search: the base class is silent; ConsoleProgress prints."""

    def message(self, text: str) -> None:
        """A line about the search (planning, Ray, verification)."""

    def trial_done(self, record: dict[str, Any], records: Sequence[dict[str, Any]], total: int) -> None:
        """A trial finished (completed, stopped, failed or crashed)."""

    def table(self, records: Sequence[dict[str, Any]], total: int) -> None:
        """The final table of the best trials."""


def format_count(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def format_metric(metric: str, value: float) -> str:
    return f"{value:.4g}" if metric == "rmse" else f"{value:.1%}"


def best_table(records: Sequence[dict[str, Any]], objective: str, total: int, rows: int = 8) -> list[str]:
    """The best completed trials, ranked as the objective ranks them, with the search's counts."""
    done = [r for r in records if r["status"] == "completed"]
    counts = {s: sum(r["status"] == s for r in records) for s in ("completed", "stopped", "failed", "crashed")}
    head = (f"{len(records)}/{total} trials finished: {counts['completed']} completed, {counts['stopped']} stopped "
            f"early, {counts['failed']} failed, {counts['crashed']} lost")
    if not done:
        return [head]
    metric = done[0]["result"]["metric"]
    ranked, rest = [], list(done)
    while rest and len(ranked) < rows:
        pick = recommend(rest, objective)
        ranked.append(pick)
        rest.remove(pick)
    unit = done[0]["latency"]["unit"]
    lines = [head, f"  {'candidate':<26} {'val INT8 ' + metric:>16} {'FP32':>8} {unit + '/inference':>20} "
                   f"{'RAM B':>7} {'flash B':>8} {'epochs':>6}"]
    for r in ranked:
        res = r["result"]
        lines.append(f"  {r['id']:<26} {format_metric(metric, res['val_int8']):>16} "
                     f"{format_metric(metric, res['val_fp32']):>8}"
                     f" {format_count(r['latency']['per_window']):>20} {r['plan']['ram']:>7,} "
                     f"{r['plan']['flash']:>8,} {res['epochs_run']:>6}")
    return lines


class ConsoleProgress(Progress):
    """A live table of the best trials: redrawn in place on a terminal, one line per trial otherwise."""

    def __init__(self, objective: str, stream: TextIO | None = None) -> None:
        self.objective = objective
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.drawn = 0

    def _print(self, lines: Sequence[str]) -> None:
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()

    def message(self, text: str) -> None:
        self.drawn = 0
        self._print([text])

    def trial_done(self, record: dict[str, Any], records: Sequence[dict[str, Any]], total: int) -> None:
        if not self.live:
            self._print([f"  {describe_record(record)}"])
            return
        lines = [f"  last: {describe_record(record)}", *best_table(records, self.objective, total)]
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
        self._print(lines)
        self.drawn = len(lines)

    def table(self, records: Sequence[dict[str, Any]], total: int) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0
        self._print(best_table(records, self.objective, total))


def describe_record(r: dict[str, Any]) -> str:
    res = r.get("result") or {}
    where = f" on {res['node']}" if res.get("node") else ""
    retried = f", after {r['retries']} retr{'y' if r['retries'] == 1 else 'ies'}" if r.get("retries") else ""
    if r["status"] == "completed":
        metric = res["metric"]
        return (f"{r['id']}: validation INT8 {metric} {format_metric(metric, res['val_int8'])} (FP32 "
                f"{format_metric(metric, res['val_fp32'])}), {res['epochs_run']} epochs, {res['seconds']:.1f} s"
                f"{where}{retried}")
    if r["status"] == "stopped":
        return f"{r['id']}: stopped early by ASHA at epoch {res.get('epoch', '?')} (val loss {res['val_loss']:.4g})"
    return f"{r['id']}: {r['status']}: {r.get('error')}{retried}"


# ------------------------------------------------------------------------------------------------------ Ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int = 2) -> Iterator[str]:
    """Attach to the Ray cluster at ``address``, or start a local instance (``num_cpus``, no dashboard, a short
    temporary directory) that is shut down on exit. Reuses an instance this process already started."""
    import ray

    if ray.is_initialized():
        yield "the Ray instance this process started"
        return
    package = str(Path(__file__).resolve().parent)
    options: dict[str, Any] = {"runtime_env": {"py_modules": [package], "env_vars": {"OMP_NUM_THREADS": "1"}},
                               "log_to_driver": False, "logging_level": logging.WARNING}
    temp_dir = None
    # No usage reporting, Tune's classic (quiet) output, no TensorBoard/CSV loggers: the records are ours.
    quiet = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        if address:
            ray.init(address=address, **options)
            where = f"the Ray cluster at {address}"
        else:
            temp_dir = tempfile.mkdtemp(prefix="tlray-", dir="/tmp" if Path("/tmp").is_dir() else None)
            ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, **options)
            where = f"a local Ray instance ({num_cpus} CPUs)"
    except Exception as e:  # Ray raises ConnectionError, RuntimeError or its own types
        for k, v in saved.items():
            _restore_env(k, v)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise SearchError(f"cannot start Ray{' at ' + address if address else ''}: {e}") from None
    try:
        yield where
    finally:
        ray.shutdown()
        for k, v in saved.items():
            _restore_env(k, v)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


# ----------------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    out_dir: Path
    records: list[dict[str, Any]]
    pruned: list[dict[str, Any]]
    front: list[dict[str, Any]]
    picks: dict[str, dict[str, Any] | None]
    recommended: dict[str, Any] | None
    test: dict[str, Any] | None  # the recommended model's INT8 metric on the test split (the only test figure)
    config_path: Path | None
    verification: dict[str, Any] | None
    summary: dict[str, Any]


def _write_json(path: Path, value: Any) -> None:
    evaluate.write_report(json.loads(json.dumps(value, default=_plain)), path)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


class _Store:
    """The trial records in ``<out>/trials``, one JSON file each (and a completed trial's model, ``<id>.npz``),
    written as trials finish."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = out_dir / TRIALS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict[str, Any]]:
        records = {}
        for path in sorted(self.folder.glob("*.json")):
            record = json.loads(path.read_text())
            records[record["id"]] = record
        return records

    def save(self, record: dict[str, Any]) -> None:
        _write_json(self.folder / f"{record['id']}.json", record)

    def model_path(self, rid: str) -> Path:
        return self.folder / f"{rid}.npz"

    def save_model(self, rid: str, data: bytes) -> None:
        """A completed trial's quantized model, written before its record."""
        path = self.model_path(rid)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def _tune_callback(store: _Store, entries: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]],
                   progress: Progress, total: int) -> Any:
    """A Tune callback that records each trial as it finishes and updates the progress table."""
    from ray import tune

    class Recorder(tune.Callback):
        def __init__(self) -> None:
            self.retries: dict[str, int] = {}

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = dict(trial.last_result or {})
            if "failed" in result:
                self._finish(trial, "failed", result, result["failed"])
            else:
                self._finish(trial, "completed" if "val_int8" in result else "stopped", result, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            text = trial.get_error() or "the trial's worker failed"
            lines = [line.strip() for line in str(text).splitlines() if line.strip()]
            self._finish(trial, "crashed", dict(trial.last_result or {}), lines[-1][:400] if lines else str(text))

        def _finish(self, trial: Any, status: str, result: dict[str, Any], error: str | None) -> None:
            entry = entries[Candidate.from_dict(trial.config["candidate"]).id]
            keep = ("val_loss", "epoch", "metric", "val_fp32", "val_int8", "digest", "best_epoch", "epochs_run",
                    "seconds", "pid", "hostname", "node_ip")
            if status == "completed":
                store.save_model(entry["id"], base64.b64decode(result["model"]))
            result = {k: result[k] for k in keep if k in result}
            if "node_ip" in result:
                result["node"] = f"{result.pop('hostname', '?')} ({result.pop('node_ip')})"
            record = {**entry, "status": status, "result": result, "error": error,
                      "retries": self.retries.get(trial.trial_id, 0)}
            records[record["id"]] = record
            store.save(record)
            progress.trial_done(record, list(records.values()), total)

    return Recorder()


def _candidate_entries(settings: SearchSettings, dataset: Any, board: boards.Board, fixed: bool,
                       cost: costmodel.CostModel | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Plan every candidate: (fitting entries with their plan and latency estimate, pruned entries)."""
    lr = settings.project.get("train", {}).get("lr")
    if lr is None:
        from tinylstm import pipeline

        lr = pipeline.SCHEMA["train"]["lr"][1]
    candidates = settings.space.candidates(dataset.window, dataset.spec.stride, lr, fixed)
    rate = settings.project.get("data", {}).get("sample_rate_hz")
    fitting, pruned = [], []
    for c in candidates:
        shape = c.shape(dataset.features, dataset.outputs)
        try:
            plan = budget.plan(board, shape, variant=settings.variant, sample_rate_hz=rate, cost=cost)
        except budget.PlanError as e:
            pruned.append({"id": c.id, "candidate": c.to_dict(), "reason": str(e)})
            continue
        if not plan.fits:
            pruned.append({"id": c.id, "candidate": c.to_dict(), "reason": plan.summary()})
            continue
        fitting.append({"id": c.id, "candidate": c.to_dict(), "latency": _latency(cost, board, shape,
                                                                                settings.variant),
                        "plan": {"verdict": plan.verdict, "ram": plan.ram.total, "flash": plan.flash.total,
                                 "ram_capacity": plan.ram.capacity, "flash_capacity": plan.flash.capacity}})
    return fitting, pruned


def _latency(cost: costmodel.CostModel | None, board: boards.Board, shape: ModelShape, variant: str
             ) -> dict[str, Any]:
    """The cost model's counts per step and per inference; MACs when the board and kernel have no calibration."""
    if cost is not None and (board.name, variant) in cost.fits:
        est = cost.estimate(board, shape, variant)
        return {"per_step": est.per_step, "per_window": est.per_window, "unit": est.fit.unit,
                "variant": est.variant, "calibrated": True}
    macs = float(costmodel.features(shape)[0])
    head = (shape.outputs or 0) * shape.hidden_sizes[-1]
    return {"per_step": macs, "per_window": macs * shape.window + head, "unit": "MACs", "variant": None,
            "calibrated": False}


def _sample(entries: list[dict[str, Any]], budget_trials: int | None, seed: int) -> list[dict[str, Any]]:
    if budget_trials is None or budget_trials >= len(entries):
        return entries
    keep = np.sort(np.random.default_rng(seed).choice(len(entries), budget_trials, replace=False))
    return [entries[i] for i in keep]


def _load_cost_model(settings: SearchSettings) -> costmodel.CostModel | None:
    """The cost model over the calibration files; a missing default file means no calibration."""
    paths = [Path(p) for p in settings.calibration if Path(p) != DEFAULT_CALIBRATION or Path(p).is_file()]
    if not paths:
        return None
    try:
        return costmodel.CostModel.from_files(paths)
    except costmodel.CostModelError as e:
        raise SearchError(str(e)) from None


def _model_name(project: dict[str, dict[str, Any]]) -> str:
    data = project.get("data", {})
    return data.get("dataset") or Path(data.get("path") or "model").stem


def search(settings: SearchSettings, out_dir: str | Path, *, address: str | None = None, resume: bool = False,
           verify: bool = True, progress: Progress | None = None, callbacks: Sequence[Any] = (),
           num_cpus: int = 2) -> SearchResult:
    """Run (or resume) a search into ``out_dir``; see the module docstring. ``callbacks``: extra Ray Tune callbacks."""
    from tinylstm import pipeline
    from tinylstm.data import DataError

    progress = progress or Progress()
    if settings.objective not in OBJECTIVES:
        raise SearchError(f"unknown objective {settings.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if settings.budget_trials is not None and settings.budget_trials < 1:
        raise SearchError("the trial budget must be at least 1")
    out_dir = Path(out_dir).resolve()
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not resume:
        raise SearchError(f"{out_dir} already holds a search; pass --resume to continue it, or choose another --out")
    if resume and not state_path.exists():
        raise SearchError(f"{out_dir} holds no search to resume")
    try:
        board = boards.load_board(settings.board)
    except boards.BoardError as e:
        raise SearchError(str(e)) from None
    if settings.variant is None:
        settings = replace(settings, variant=default_variant(board.arch, board.dsp))
    name = _model_name(settings.project)
    # The first candidate's config checks the project sections, and its dataset gives the sizes to plan with.
    probe = project_config(settings.project, Candidate((1,), 1, 1, 1e-3), board.name, True, name, "")
    try:
        dataset = pipeline.Context(probe, out_dir, pipeline.Reporter()).dataset()
    except DataError as e:
        raise SearchError(str(e)) from None
    cost = _load_cost_model(settings)
    fixed = dataset.spec.source_path().suffix.lower() == ".npz"  # sets of ready windows: window and stride fixed
    fitting, pruned = _candidate_entries(settings, dataset, board, fixed, cost)
    chosen = _sample(fitting, settings.budget_trials, settings.seed)
    state = {"format": "tinylstm-search", "version": STATE_VERSION, "tinylstm": __version__, "settings": settings.key(),
             "objective": settings.objective, "candidates": chosen, "pruned": pruned,
             "not_sampled": len(fitting) - len(chosen), "fixed_windows": fixed,
             "cost_model": cost.to_dict() if cost else None}
    if resume:
        old = json.loads(state_path.read_text())
        if old.get("version") != STATE_VERSION:
            raise SearchError(f"{out_dir} holds a search by an earlier tinylstm, which ranked its trials on the test "
                              "split; start a new search with another --out")
        if old.get("settings") != json.loads(json.dumps(settings.key(), default=_plain)):
            raise SearchError(f"{out_dir} holds a search with other settings; resume it with the same options")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(state_path, state)
    progress.message(f"{len(fitting) + len(pruned)} candidates for {board.name}: {len(pruned)} pruned by the "
                     f"planner (not trained), {len(fitting)} fit"
                     + (f", {len(chosen)} sampled for the trial budget" if len(chosen) < len(fitting) else ""))
    if not chosen:
        raise SearchError(f"no candidate fits {board.name}; try smaller hidden sizes or fewer layers")

    store = _Store(out_dir)
    records = {rid: r for rid, r in store.load().items() if r["status"] in FINISHED}
    entries = {e["id"]: e for e in chosen}
    todo = [e for e in chosen if e["id"] not in records]
    if records:
        progress.message(f"resuming: {len(records)} trials already recorded, {len(todo)} to run")
    if todo:
        _run_trials(settings, todo, entries, records, store, progress, board, fixed, name, dataset, out_dir,
                    address, callbacks, num_cpus)
    # Plans and latency estimates come from this run: a resume with a new calibration re-ranks without retraining.
    all_records = [{**records[e["id"]], "latency": e["latency"], "plan": e["plan"]} for e in chosen
                   if e["id"] in records]
    progress.table(all_records, len(chosen))
    return _finish(settings, out_dir, all_records, pruned, chosen, board, fixed, name, verify, progress, cost,
                   store)


def _run_trials(settings: SearchSettings, todo: list[dict[str, Any]], entries: dict[str, dict[str, Any]],
                records: dict[str, dict[str, Any]], store: _Store, progress: Progress, board: boards.Board,
                fixed: bool, name: str, dataset: Any, out_dir: Path, address: str | None, callbacks: Sequence[Any],
                num_cpus: int) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    source = dataset.spec.source_path() if settings.project.get("data", {}).get("path") else None
    job = TrialJob(settings.project, board.name, fixed, name, settings.report_every,
                   source.name if source else None, source.read_bytes() if source else None)
    epochs = settings.project.get("train", {}).get("epochs")
    if epochs is None:
        from tinylstm import pipeline

        epochs = pipeline.SCHEMA["train"]["epochs"][1]
    max_t = epochs // settings.report_every + 1
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                               grace_period=max(1, math.ceil(settings.grace_fraction * max_t)),
                               reduction_factor=settings.reduction_factor)
                 if settings.early_stop else FIFOScheduler())
    recorder = _tune_callback(store, entries, records, progress, len(entries))
    with ray_session(address, num_cpus) as where:
        progress.message(f"running {len(todo)} trials on {where}")
        trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": settings.cpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"candidate": tune.grid_search([e["candidate"] for e in todo])},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, reuse_actors=True,
                                        trial_name_creator=lambda t: Candidate.from_dict(t.config["candidate"]).id,
                                        trial_dirname_creator=lambda t: Candidate.from_dict(
                                            t.config["candidate"]).id),
            run_config=tune.RunConfig(name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(out_dir / TUNE_DIR), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=settings.retries),
                                      callbacks=[recorder, *callbacks]))
        tune_logger = logging.getLogger("ray.tune")
        level = tune_logger.level
        tune_logger.setLevel(logging.CRITICAL)  # a lost worker's traceback: the record keeps its last line
        try:
            tuner.fit()
        except tune.TuneError as e:
            raise SearchError(f"the search stopped: {e}") from None
        finally:
            tune_logger.setLevel(level)


def _finish(settings: SearchSettings, out_dir: Path, records: list[dict[str, Any]], pruned: list[dict[str, Any]],
            chosen: list[dict[str, Any]], board: boards.Board, fixed: bool, name: str, verify: bool,
            progress: Progress, cost: costmodel.CostModel | None, store: _Store) -> SearchResult:
    from tinylstm import pipeline

    front = pareto_front(records)
    picks = {objective: recommend(records, objective) for objective in OBJECTIVES}
    pick = picks[settings.objective]
    config_path = verification = test = None
    counts = {s: sum(r["status"] == s for r in records) for s in ("completed", "stopped", "failed", "crashed")}
    unfinished = len(chosen) - len(records)
    partial = unfinished > 0 or counts["crashed"] > 0
    (out_dir / RECOMMENDED_CONFIG).unlink(missing_ok=True)  # a recommendation stands only for a whole search
    if partial:
        progress.message(f"the search is partial: {unfinished + counts['crashed']} of {len(chosen)} trials did not "
                         "finish, so nothing is recommended; finish it with --resume")
    elif pick is not None:
        config_path = out_dir / RECOMMENDED_CONFIG
        config = project_config(settings.project, Candidate.from_dict(pick["candidate"]), board.name, fixed, name,
                                f"tinylstm run {config_path} --out {out_dir / RECOMMENDED_DIR}")
        dataset = pipeline.Context(config, out_dir, pipeline.Reporter()).dataset()
        test = {"id": pick["id"], **recommended_test_quality(store.model_path(pick["id"]), dataset)}
        tmp = config_path.with_name(config_path.name + ".tmp")
        tmp.write_text(config.to_toml())
        tmp.replace(config_path)
        if verify:
            progress.message(f"confirming {pick['id']}: tinylstm run {config_path} (retrain, build, benchmark)")
            verification = _verify(config, out_dir / RECOMMENDED_DIR, pick, progress)
    summary = {
        "board": board.name, "objective": settings.objective, "partial": partial,
        "candidates": len(chosen) + len(pruned), "pruned": len(pruned), "trained": len(records), **counts,
        "unfinished": unfinished,
        "latency_unit": chosen[0]["latency"]["unit"] if chosen else None,
        "cost_model": {"source": cost.source, "fits": [f.to_dict() for f in cost.fits.values()
                                                       if (f.board, f.variant) == (board.name, settings.variant)]}
        if cost else None,
        "pareto_front": [r["id"] for r in front],
        "picks": {objective: (r["id"] if r else None) for objective, r in picks.items()},
        "recommended": None if partial else pick, "test": test,
        "config": str(config_path) if config_path else None,
        "verification": verification,
        "records": records, "pruned_candidates": pruned,
    }
    _write_json(out_dir / RESULTS_FILE, summary)
    return SearchResult(out_dir, records, pruned, front, picks, None if partial else pick, test, config_path,
                        verification, summary)


def _verify(config: Any, run_dir: Path, pick: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Run the recommended project with `tinylstm run`'s pipeline: the retrained model must repeat the trial, fit
    the planner and the linker, and the device's measured counts are set against the cost model's estimate."""
    from tinylstm import pipeline

    try:
        run = pipeline.run(config, run_dir, pipeline.ConsoleReporter() if isinstance(progress, ConsoleProgress)
                           else pipeline.Reporter())
    except pipeline.PipelineError as e:
        return {"ok": False, "error": str(e)}
    s = run.summaries
    quant, firmware, bench = s.get("quantize") or {}, s.get("firmware") or {}, s.get("bench") or {}
    out: dict[str, Any] = {"ok": True, "run_dir": str(run_dir), "digest": quant.get("digest"),
                           "repeats_trial": quant.get("digest") == pick["result"].get("digest"),
                           "planner": s.get("plan", {}).get("verdict"), "linker": firmware.get("linker"),
                           "planner_sizes": firmware.get("planner")}
    if bench:
        measured = bench["stats"]["median"]
        out["device"] = {"unit": bench["unit"], "per_window_median": measured,
                         "per_step_median": bench["stats"]["per_step_median"], "mismatches": bench["mismatches"],
                         "estimate_per_window": pick["latency"]["per_window"],
                         "estimate_error": pick["latency"]["per_window"] / measured - 1.0
                         if pick["latency"]["calibrated"] else None}
    return out


def summary_text(result: SearchResult) -> str:
    """The closing report: pruning, trials, the Pareto front, the picks, the recommended model's test figure, the
    config and its confirmation."""
    s = result.summary
    unit = s["latency_unit"]
    lines = ["", f"Search on {s['board']}: {s['candidates']} candidates, {s['pruned']} pruned by the planner before "
                 f"training, {s['trained']} trials ({s['completed']} completed, {s['stopped']} stopped early by ASHA, "
                 f"{s['failed']} failed, {s['crashed']} lost)"]
    if unit == "MACs":
        lines.append("  latency: no calibration for this board; MACs per inference stand in for cycles")
    elif s["cost_model"]:
        for fit in s["cost_model"]["fits"]:
            loo = (f"leave-one-out error mean {fit['loo_mean_abs']:.2%}, max {fit['loo_max_abs']:.2%} over "
                   f"{fit['points']} shapes" if fit["loo_mean_abs"] is not None else f"{fit['points']} shapes")
            lines.append(f"  latency: {fit['variant']} kernel cost model ({loo})")
    lines.append(f"Pareto front (validation INT8 quality, {unit} per inference, RAM):")
    by_id = {r["id"]: r for r in result.records}
    for rid in s["pareto_front"]:
        r = by_id[rid]
        tags = [o for o, pick in s["picks"].items() if pick == rid]
        lines.append(f"  {rid:<26} val INT8 {format_metric(r['result']['metric'], r['result']['val_int8']):>7}  "
                     f"{format_count(r['latency']['per_window']):>8} {unit}  RAM {r['plan']['ram']:>6,} B  "
                     f"flash {r['plan']['flash']:>7,} B  {'<- ' + ', '.join(tags) if tags else ''}")
    if s["partial"]:
        lines.append(f"PARTIAL: {s['unfinished'] + s['crashed']} trials did not finish; nothing is recommended until "
                     "the search is finished with --resume")
        return "\n".join(lines)
    if result.recommended is None:
        lines.append("no trial completed: nothing to recommend")
        return "\n".join(lines)
    lines.append(f"recommended ({s['objective']}): {result.recommended['id']}; config: {result.config_path}")
    if result.test is not None:
        t = result.test
        lines.append(f"  test split: INT8 {t['metric']} {format_metric(t['metric'], t['int8'])} over {t['windows']} "
                     "windows (the only model evaluated on it; the choice used the validation split)")
    v = result.verification
    if v is not None and not v["ok"]:
        lines.append(f"  confirmation FAILED: {v['error']}")
    elif v is not None:
        linker = v.get("linker") or {}
        lines.append(f"  confirmed by tinylstm run: same model as the trial: "
                     f"{'yes' if v['repeats_trial'] else 'NO'}; planner: {v['planner']}"
                     + (f"; linker: flash {linker['flash']:,} B, RAM {linker['ram']:,} B" if linker else ""))
        if v.get("device"):
            d = v["device"]
            err = f" (cost model: {d['estimate_error']:+.1%})" if d["estimate_error"] is not None else ""
            lines.append(f"  on the device: {d['per_window_median']:,.0f} {d['unit']} per inference{err}, "
                         f"{d['mismatches']} mismatches against the integer reference")
    return "\n".join(lines)
