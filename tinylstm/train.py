"""Models and the trainer.

Every model is exactly what the integer kernel runs: 1 to 3 stacked unidirectional ``torch.nn.LSTM`` layers
(batch_first) and a dense head on the last hidden state. Nothing else: no dropout, no projection, no
bidirectional layers. The two PyTorch biases (b_ih + b_hh) are summed when the model is quantized.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinylstm import boards, budget, evaluate
from tinylstm.data import Dataset, DataSpec, Normalizer, check_class_weight, load_dataset
from tinylstm.export import ModelShape

CHECKPOINT_FORMAT = "tinylstm-checkpoint"
CHECKPOINT_VERSION = 1
MAX_LAYERS = 3
SCHEDULES = ("plateau", "cosine")


class TrainError(ValueError):
    """A model or training setting that cannot work, or an unreadable checkpoint."""


@dataclass
class ModelConfig:
    task: str
    input_size: int
    hidden_sizes: list[int]
    outputs: int
    window: int

    def validate(self) -> None:
        if not 1 <= len(self.hidden_sizes) <= MAX_LAYERS:
            raise TrainError(f"{len(self.hidden_sizes)} LSTM layers; 1 to {MAX_LAYERS} are supported")
        if any(h < 1 for h in self.hidden_sizes) or self.input_size < 1 or self.outputs < 1:
            raise TrainError("input size, hidden sizes and outputs must be >= 1")


class LSTMModel(nn.Module):
    """Stacked LSTM layers, then a dense layer on the last time step's hidden state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        sizes = [config.input_size, *config.hidden_sizes]
        self.lstms = nn.ModuleList(nn.LSTM(sizes[n], sizes[n + 1], batch_first=True) for n in range(len(sizes) - 1))
        self.head = nn.Linear(sizes[-1], config.outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lstm in self.lstms:
            x, _ = lstm(x)
        return self.head(x[:, -1])


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    optimizer: str = "adam"  # "adam" or "adamw"
    clip_norm: float = 1.0
    patience: int = 30  # early stopping: epochs without a better validation loss
    lr_patience: int = 10  # ReduceLROnPlateau
    # "plateau": ReduceLROnPlateau and early stopping on the validation loss, the best weights restored.
    # "cosine": the learning rate falls from lr to 0 over all the epochs and the last weights are kept (no
    # decision rests on the validation loss, which is noisy on a small validation split).
    schedule: str = "plateau"
    lr_factor: float = 0.5
    seed: int = 0
    threads: int = 1
    class_weight: str = "none"  # "balanced": classification losses weighted by class_weights()


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    lr: float


@dataclass
class TrainResult:
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seed every generator and fix the thread count, so a CPU run repeats exactly."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced class weights: windows / (classes x windows of the class); a class without windows gets 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.divide(len(y), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)


def loss_function(task: str, weights: np.ndarray | None = None) -> nn.Module:
    """Cross-entropy (optionally weighted per class) for classification, else mean squared error."""
    if task != "classification":
        return nn.MSELoss()
    return nn.CrossEntropyLoss(weight=None if weights is None else torch.as_tensor(weights, dtype=torch.float32))


def tensors(dataset: Dataset, split_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    split = getattr(dataset, split_name)
    x = torch.from_numpy(dataset.inputs(split))
    y = torch.from_numpy(np.ascontiguousarray(dataset.targets(split)))
    return x, y


def fit(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[EpochLog], None] | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train on the training split; with the "plateau" schedule, stop early on the validation loss and restore
    the best weights, with "cosine", run every epoch and keep the last weights. With class_weight "balanced",
    the training and validation losses weight each class by the training split's class_weights().

    ``forward`` replaces ``model(x)`` (quantization-aware fine-tuning passes a fake-quant forward).
    """
    seed_everything(config.seed, config.threads)
    forward = forward or model
    x_tr, y_tr = tensors(dataset, "train")
    x_va, y_va = tensors(dataset, "val")
    check_class_weight(dataset.task, config.class_weight)
    weights = class_weights(dataset.train.y, dataset.outputs) if config.class_weight == "balanced" else None
    criterion = loss_function(dataset.task, weights)
    opt_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(config.optimizer)
    if opt_class is None:
        raise TrainError(f"unknown optimizer {config.optimizer!r}; choose adam or adamw")
    if config.schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {config.schedule!r}; choose {' or '.join(SCHEDULES)}")
    optimizer = opt_class(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    plateau = config.schedule == "plateau"
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.lr_factor,
                                                            patience=config.lr_patience) if plateau
                 else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs))
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(x_tr), generator=generator)
        total = 0.0
        for lo in range(0, len(order), config.batch_size):
            idx = order[lo:lo + config.batch_size]
            optimizer.zero_grad()
            loss = criterion(forward(x_tr[idx]), y_tr[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            val_loss = criterion(forward(x_va), y_va).item()
        if plateau:
            scheduler.step(val_loss)
        else:
            scheduler.step()
        log = EpochLog(epoch, total / len(x_tr), val_loss, optimizer.param_groups[0]["lr"])
        result.history.append(log)
        if on_epoch:
            on_epoch(log)
        if not plateau:
            result.best_val_loss, result.best_epoch = val_loss, epoch  # the last epoch's weights are kept
            best_state = model.state_dict()
        elif val_loss < result.best_val_loss - 1e-7:
            result.best_val_loss, result.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - result.best_epoch >= config.patience:
            result.stopped_early = True
            break
    model.load_state_dict(best_state)
    model.eval()
    return result


def model_config_for(dataset: Dataset, hidden_sizes: list[int]) -> ModelConfig:
    return ModelConfig(task=dataset.task, input_size=dataset.features, hidden_sizes=list(hidden_sizes),
                       outputs=dataset.outputs, window=dataset.window)


def plan_for(board_name: str, config: ModelConfig, per_channel: bool = False,
             sample_rate_hz: float | None = None) -> budget.Plan:
    """The plan of the model this config describes, on a board of the catalogue: memory, and the step time
    against the sample period when ``sample_rate_hz`` is given."""
    shape = ModelShape(input_size=config.input_size, hidden_sizes=tuple(config.hidden_sizes), window=config.window,
                       outputs=config.outputs, per_channel=per_channel)
    return budget.plan(boards.load_board(board_name), shape, sample_rate_hz=sample_rate_hz)


def budget_advice(plan: budget.Plan) -> str:
    """What to change when a plan does not fit: the largest hidden size that does, or what else to try."""
    layers = len(plan.shape.hidden_sizes)
    rate = plan.deadline.sample_rate_hz if plan.deadline else None
    largest = budget.max_hidden(plan.board, plan.shape, variant=plan.variant, sample_rate_hz=rate)
    if largest:
        return f"the largest hidden size that fits with {layers} layer(s) is {largest}"
    slow = " or a lower sample rate" if "time" in plan.overflowing else ""
    return (f"no hidden size fits with {layers} layer(s), input {plan.shape.input_size} and window "
            f"{plan.shape.window}; use fewer layers, a bigger or faster board{slow}")


def check_budget(board_name: str, config: ModelConfig, per_channel: bool = False,
                 sample_rate_hz: float | None = None) -> budget.Plan:
    """Plan the model on the board before any training; raise TrainError saying what to change if it does not fit
    (or, with ``sample_rate_hz``, cannot keep up)."""
    plan = plan_for(board_name, config, per_channel, sample_rate_hz)
    if plan.fits:
        return plan
    raise TrainError(f"hidden {list(config.hidden_sizes)} does not fit {board_name}: {'; '.join(plan.reasons)}; "
                     f"{budget_advice(plan)} (or pass --force to train anyway)")


def train_model(dataset: Dataset, hidden_sizes: list[int], config: TrainConfig,
                on_epoch: Callable[[EpochLog], None] | None = None,
                threshold_margin: float = evaluate.DEFAULT_THRESHOLD_MARGIN) -> tuple[Checkpoint, TrainResult]:
    """Train a model on the dataset and return its checkpoint, with the FP32 test metrics in ``extra``.

    An anomaly model's threshold is calibrated on the known-normal validation windows.
    """
    seed_everything(config.seed, config.threads)
    model = LSTMModel(model_config_for(dataset, hidden_sizes))
    result = fit(model, dataset, config, on_epoch=on_epoch)
    extra: dict[str, Any] = {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                             "epochs_run": len(result.history), "stopped_early": result.stopped_early}
    threshold = None
    if dataset.task == "anomaly":
        threshold = evaluate.calibrate_threshold(evaluate.fp32_outputs(model, dataset, dataset.val), dataset.val,
                                                 threshold_margin)
        extra["anomaly_threshold"] = threshold
        extra["threshold_margin"] = threshold_margin
    outputs = evaluate.fp32_outputs(model, dataset, dataset.test)
    extra["fp32_test"] = evaluate.metrics(dataset.task, outputs, dataset, dataset.test, threshold)
    return Checkpoint.from_training(model, dataset, config, result, extra), result


# ------------------------------------------------------------------------------------------------ checkpoint


@dataclass
class Checkpoint:
    """A trained float model with everything later stages need to rebuild it and its held-out windows."""

    model: LSTMModel
    data_spec: DataSpec
    input_norm: Normalizer
    target_norm: Normalizer | None
    classes: list[str] | None
    feature_names: list[str]
    target_names: list[str]
    train_config: TrainConfig
    history: list[EpochLog] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # task details (anomaly threshold), fp32 metrics, board

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def dataset(self) -> Dataset:
        """Reload the data the model was trained on, with the same splits; check the normaliser matches."""
        dataset = load_dataset(self.data_spec)
        if not np.allclose(dataset.input_norm.offset, self.input_norm.offset) or \
                not np.allclose(dataset.input_norm.scale, self.input_norm.scale):
            raise TrainError("the data no longer matches the checkpoint (normalisation differs); was it changed?")
        return dataset

    @classmethod
    def from_training(cls, model: LSTMModel, dataset: Dataset, config: TrainConfig, result: TrainResult,
                      extra: dict[str, Any] | None = None) -> Checkpoint:
        return cls(model, dataset.spec, dataset.input_norm, dataset.target_norm, dataset.classes,
                   dataset.feature_names, dataset.target_names, config, result.history, extra or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": asdict(self.config),
            "state_dict": self.model.state_dict(),
            "data_spec": self.data_spec.to_dict(),
            "input_norm": self.input_norm.to_dict(),
            "target_norm": self.target_norm.to_dict() if self.target_norm else None,
            "classes": self.classes,
            "feature_names": self.feature_names,
            "target_names": self.target_names,
            "train_config": asdict(self.train_config),
            "history": [asdict(h) for h in self.history],
            "extra": self.extra,
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """torch.save the checkpoint atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint.to_dict(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise TrainError(f"{path}: not a tinylstm checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tinylstm checkpoint")
    if d.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path}: checkpoint version {d.get('version')!r} is not supported")
    model = LSTMModel(ModelConfig(**d["model_config"]))
    model.load_state_dict(d["state_dict"])
    model.eval()
    return Checkpoint(
        model=model,
        data_spec=DataSpec.from_dict(d["data_spec"]),
        input_norm=Normalizer.from_dict(d["input_norm"]),
        target_norm=Normalizer.from_dict(d["target_norm"]) if d["target_norm"] else None,
        classes=d["classes"],
        feature_names=d["feature_names"],
        target_names=d["target_names"],
        train_config=TrainConfig(**d["train_config"]),
        history=[EpochLog(**h) for h in d["history"]],
        extra=d["extra"],
    )
