"""The models and the trainer: structure, determinism, early stopping, schedules, checkpoints, the budget check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tinylstm.cli import main
from tinylstm.data import DataSpec, load_dataset
from tinylstm.train import (
    LSTMModel,
    ModelConfig,
    TrainConfig,
    TrainError,
    class_weights,
    fit,
    load_checkpoint,
    loss_function,
    model_config_for,
    save_checkpoint,
    train_model,
)


@pytest.fixture(scope="module")
def shapes_npz(tmp_path_factory):
    """Two classes of windows a small LSTM tells apart easily: a rising and a falling noisy ramp."""
    rng = np.random.default_rng(0)
    t = np.linspace(-1, 1, 30)
    y = np.repeat([0, 1], 60)
    x = np.where(y[:, None] == 0, t, -t)[:, :, None] + rng.normal(0, 0.3, (120, 30, 1))
    x = np.concatenate([x, rng.normal(0, 1, (120, 30, 1))], axis=2).astype(np.float32)
    path = tmp_path_factory.mktemp("npz") / "shapes.npz"
    np.savez(path, X=x, y=np.array(["up", "down"])[y])
    return path


@pytest.fixture(scope="module")
def shapes(shapes_npz):
    return load_dataset(DataSpec(task="classification", path=str(shapes_npz), layout="NTF", test_fraction=0.25))


FAST = TrainConfig(epochs=15, lr=1e-2, batch_size=16, patience=15)


def test_model_is_exactly_what_the_kernel_runs():
    model = LSTMModel(ModelConfig("classification", 6, [8, 5], 4, 100))
    kinds = {type(m) for m in model.modules()} - {LSTMModel, nn.ModuleList}
    assert kinds == {nn.LSTM, nn.Linear}
    for lstm in model.lstms:
        assert lstm.batch_first and not lstm.bidirectional and lstm.proj_size == 0 and lstm.num_layers == 1
        assert lstm.dropout == 0
    assert model(torch.zeros(3, 100, 6)).shape == (3, 4)
    with pytest.raises(TrainError, match="1 to 3 are supported"):
        LSTMModel(ModelConfig("classification", 6, [8] * 4, 4, 100))


def test_training_learns_and_is_deterministic(shapes):
    a, _ = train_model(shapes, [8], FAST)
    b, _ = train_model(shapes, [8], FAST)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert a.extra["fp32_test"]["accuracy"] >= 0.9
    c, _ = train_model(shapes, [8], TrainConfig(**{**vars(FAST), "seed": 1}))
    assert not torch.equal(c.model.head.weight, a.model.head.weight)


def test_early_stopping_restores_the_best_weights(tmp_path):
    rng = np.random.default_rng(3)  # random labels: the validation loss soon stops improving
    np.savez(tmp_path / "noise.npz", X=rng.normal(size=(80, 10, 2)), y=rng.integers(0, 2, 80))
    noise = load_dataset(DataSpec(task="classification", path=str(tmp_path / "noise.npz"), layout="NTF"))
    torch.manual_seed(0)
    model = LSTMModel(model_config_for(noise, [16]))
    result = fit(model, noise, TrainConfig(epochs=100, lr=2e-2, batch_size=16, patience=3, lr_patience=50))
    assert result.stopped_early and len(result.history) == result.best_epoch + 3
    assert result.best_val_loss == min(h.val_loss for h in result.history)
    x, y = torch.from_numpy(noise.inputs(noise.val)), torch.from_numpy(noise.val.y)
    with torch.no_grad():
        assert nn.CrossEntropyLoss()(model(x), y).item() == pytest.approx(result.best_val_loss, rel=1e-5)


def test_cosine_schedule_runs_every_epoch_and_keeps_the_last_weights(shapes):
    torch.manual_seed(0)
    model = LSTMModel(model_config_for(shapes, [8]))
    config = TrainConfig(epochs=12, lr=1e-2, batch_size=16, patience=1, schedule="cosine")
    result = fit(model, shapes, config)
    assert not result.stopped_early and len(result.history) == result.best_epoch == 12
    lrs = [h.lr for h in result.history]  # after each epoch: lr (1 + cos(pi epoch / epochs)) / 2, down to 0
    np.testing.assert_allclose(lrs, [1e-2 * (1 + np.cos(np.pi * e / 12)) / 2 for e in range(1, 13)], atol=1e-12)
    x, y = torch.from_numpy(shapes.inputs(shapes.val)), torch.from_numpy(shapes.val.y)
    with torch.no_grad():
        assert nn.CrossEntropyLoss()(model(x), y).item() == pytest.approx(result.history[-1].val_loss, rel=1e-5)
    with pytest.raises(TrainError, match="unknown schedule 'step'"):
        fit(model, shapes, TrainConfig(epochs=1, schedule="step"))


def test_checkpoint_round_trip(shapes, tmp_path):
    ckpt, _ = train_model(shapes, [6], TrainConfig(epochs=2))
    path = save_checkpoint(ckpt, tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    back = load_checkpoint(path)
    x = torch.from_numpy(shapes.inputs(shapes.test))
    with torch.no_grad():
        assert torch.equal(back.model(x), ckpt.model(x))
    rebuilt = back.dataset()
    np.testing.assert_array_equal(rebuilt.test.x, shapes.test.x)
    assert back.classes == ["down", "up"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="not a tinylstm checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_cli_train_json(shapes_npz, tmp_path):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(main, ["train", str(shapes_npz), "--task", "classification", "--layout", "NTF",
                                  "--hidden", "8", "--epochs", "3", "--schedule", "cosine", "--json",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["model"]["hidden_sizes"] == [8] and report["epochs_run"] == 3
    back = load_checkpoint(out)
    assert back.config.hidden_sizes == [8] and back.train_config.schedule == "cosine"


def test_budget_is_checked_before_training(tmp_path):
    out = tmp_path / "m.pt"
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--dataset", "basic_motions", "--hidden", "400", "--board", "uno_sim",
                             "--epochs", "1", "--quiet", "--out", str(out)])
    assert r.exit_code != 0
    assert "does not fit uno_sim" in r.output and "the largest hidden size that fits with 1 layer(s) is" in r.output
    largest = int(r.output.split("is ")[-1].split()[0])
    assert 1 <= largest < 400 and not out.exists()
    ok = runner.invoke(main, ["train", "--dataset", "basic_motions", "--hidden", str(largest), "--board", "uno_sim",
                              "--epochs", "1", "--json", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["board"]["verdict"] in ("fits", "tight")
    r = runner.invoke(main, ["train", "--dataset", "basic_motions", "--hidden", str(largest + 1), "--board",
                             "uno_sim", "--epochs", "1", "--quiet", "--out", str(tmp_path / "n.pt")])
    assert r.exit_code != 0 and not (tmp_path / "n.pt").exists()
    forced = runner.invoke(main, ["train", "--dataset", "basic_motions", "--hidden", "400", "--board", "uno_sim",
                                  "--force", "--epochs", "1", "--quiet", "--out", str(tmp_path / "f.pt")])
    assert forced.exit_code == 0 and (tmp_path / "f.pt").exists()


def test_balanced_class_weights_follow_the_class_counts(tmp_path, monkeypatch):
    # 9 windows of 4 classes, counted 6, 2, 1, 0: 9 / (4 x count), and 0 for a class without windows
    np.testing.assert_allclose(class_weights(np.array([0, 0, 0, 0, 0, 0, 1, 1, 2]), 4), [9 / 24, 9 / 8, 9 / 4, 0])
    # the weighted cross-entropy: sum of weight x loss over the sum of the weights
    loss = loss_function("classification", np.array([1.0, 3.0]))
    value = loss(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])).item()
    assert value == pytest.approx((np.log(2) + 3 * np.log(1 + np.exp(2))) / 4, rel=1e-6)
    seen = []

    def spy(task, weights=None):
        seen.append(weights)
        return loss_function(task, weights)

    monkeypatch.setattr("tinylstm.train.loss_function", spy)
    # 60 training windows of classes 0, 1, 2 counted 40, 15, 5 (validation and test given apart)
    y = np.repeat([0, 1, 2], [40, 15, 5])
    np.savez(tmp_path / "imb.npz", X_train=np.random.default_rng(0).normal(size=(60, 6, 2)), y_train=y,
             X_val=np.zeros((3, 6, 2)), y_val=[0, 1, 2], X_test=np.zeros((3, 6, 2)), y_test=[0, 1, 2])
    data = load_dataset(DataSpec(task="classification", path=str(tmp_path / "imb.npz"), layout="NTF"))
    fit(LSTMModel(model_config_for(data, [4])), data, TrainConfig(epochs=1, class_weight="balanced"))
    np.testing.assert_allclose(seen[-1], [60 / 120, 60 / 45, 60 / 15])
    fit(LSTMModel(model_config_for(data, [4])), data, TrainConfig(epochs=1))
    assert seen[-1] is None
