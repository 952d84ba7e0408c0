"""Bad input through the command line, as a user meets it: one line on stderr, exit code 1, no traceback, and
nothing written. The whole config is checked before any stage runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOOD = {
    "data": 'dataset = "taylor_demand"',
    "model": "hidden = [4]",
    "train": "epochs = 2",
    "quantization": 'calibration = "minmax"',
    "board": 'name = "uno"\nbuild = false',
    "bench": "windows = 5",
}


def tinylstm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinylstm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def project(directory: Path, **changes: str) -> Path:
    sections = {**GOOD, **changes}
    path = directory / "project.toml"
    path.write_text("".join(f"[{name}]\n{body}\n" for name, body in sections.items()))
    return path


@pytest.mark.parametrize(("section", "body", "words"), [
    ("train", "epochs = 0", ["[train] epochs", ">= 1"]),
    ("train", "batch_size = 0", ["[train] batch_size", ">= 1"]),
    ("bench", "windows = -5", ["[bench] windows", ">= 0"]),
    ("bench", 'port = "/dev/ttyACM0"', ["[bench] port", "emulated"]),
    ("quantization", 'calibration = "median"', ["[quantization] calibration", "minmax, percentile"]),
    ("model", "hidden = [8, 8, 8, 8]", ["4 layers", "1 to 3"]),
    ("data", 'dataset = "taylor_demand"\nval_fraction = 0.6\ntest_fraction = 0.5', ["val_fraction + test_fraction"]),
    ("board", 'name = "unoo"', ["[board] name", "did you mean uno"]),
    ("data", 'dataset = "taylor_demand"\nsplit = "random"', ["[data] split", "walk-forward, stratified, group"]),
    ("train", 'class_weight = "balanced"', ["class_weight", "this is a forecasting task"]),
])
def test_a_bad_value_stops_the_run_before_any_stage(tmp_path, section, body, words):
    changes = {section: body}
    if words[0] == "[bench] port":
        changes["board"] = 'name = "uno_sim"'
    config = project(tmp_path, **changes)
    result = tinylstm("run", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out").exists()


def test_a_binary_or_latin1_config_is_a_one_line_error(tmp_path):
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.toml").write_bytes('[data]\ndataset = "caf\xe9"\n'.encode("latin-1"))
    for name in ("binary.toml", "latin1.toml"):
        result = tinylstm("run", name, "--out", "out", cwd=tmp_path)
        assert_one_line_error(result, name, "not valid TOML")
    assert not (tmp_path / "out").exists()


def test_an_npz_window_that_disagrees_with_the_project_names_the_key(tmp_path):
    import numpy as np

    np.savez(tmp_path / "w.npz", X=np.zeros((20, 25, 3)), y=np.arange(20) % 2)
    config = project(tmp_path, data='path = "w.npz"\nwindow = 50', task='kind = "classification"')
    result = tinylstm("run", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "data: ", "X windows have 25 steps but the window is set to 50", "[data] window")


def test_init_with_a_latin1_or_binary_csv_is_a_one_line_error(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("temp\xe9rature,label\n1,a\n".encode("latin-1"))
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\x02\xff\xfe\n\x00")
    for name in ("latin1.csv", "binary.csv"):
        result = tinylstm("init", "p.toml", "--data", name, cwd=tmp_path)
        assert_one_line_error(result, name, "UTF-8 CSV")
        assert not (tmp_path / "p.toml").exists()


def _model_with(tmp_path: Path, where: str, key: str, value: object) -> Path:
    """A valid random model file whose metadata field ``where.key`` is replaced by ``value``."""
    import json

    import numpy as np

    from tests.random_models import random_model
    from tinylstm import qmodel

    path = qmodel.save(random_model(5, layers=1, window=4), tmp_path / "good.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    record = meta["input"] if where == "input" else meta["layers"][0]
    record[key] = value
    bad = tmp_path / f"bad_{key}.npz"
    np.savez(bad, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return bad


@pytest.mark.parametrize(("where", "key", "value"), [
    ("input", "scale", "0.1"), ("layer", "cell_scale_power", "-11"), ("input", "window", 2.5),
    ("layer", "input_scale", None), ("layer", "cell_clip", True),
])
@pytest.mark.parametrize("command", [["export", "--format", "c", "--out", "gen"], ["build", "--board", "uno_sim"],
                                     ["bench", "--board", "uno_sim"]])
def test_a_model_file_with_a_mistyped_field_is_a_one_line_error(tmp_path, where, key, value, command):
    bad = _model_with(tmp_path, where, key, value)
    result = tinylstm(*command, "--model", str(bad), cwd=tmp_path)
    assert_one_line_error(result, str(bad), key)
    assert not (tmp_path / "gen").exists()


def test_search_offers_the_fillna_its_data_error_names(tmp_path):
    (tmp_path / "s.csv").write_text("v\n" + "".join(f"{i % 7}\n" if i != 50 else "nan\n" for i in range(300)))
    result = tinylstm("search", "s.csv", "--task", "forecasting", "--target", "v", "--board", "uno", "--hidden", "4",
                      "--layers", "1", "--window", "8", "--out", "o", "--no-verify", cwd=tmp_path)
    assert_one_line_error(result, "NaN", "--fillna")
    assert "--fillna [none|ffill|linear|zero]" in tinylstm("search", "--help", cwd=tmp_path).stdout


def _csv(path: Path, labels: list[str], values: list[str] | None = None) -> Path:
    values = values or [f"{(i * 37) % 11}" for i in range(len(labels))]
    path.write_text("x,y\n" + "".join(f"{v},{label}\n" for v, label in zip(values, labels, strict=True)))
    return path


@pytest.mark.parametrize(("labels", "values", "words"), [
    ([f"{0.5 + i * 0.37:.2f}" for i in range(300)], None, ["fractional numbers", "300 distinct values"]),
    (["a", "b"] * 100 + [""] + ["a", "b"] * 49, None, ["label 201 is empty"]),
    (["a", "b"] * 100 + ["nan"] + ["a", "b"] * 49, None, ["label 201 is 'nan'"]),
    (["a", "b"] * 150, [str(i % 5) for i in range(299)] + ["1e300"], ["1e+300", "float32"]),
])
def test_training_data_that_makes_no_sense_is_refused(tmp_path, labels, values, words):
    data = _csv(tmp_path / "d.csv", labels, values)
    result = tinylstm("train", str(data), "--task", "classification", "--label", "y", "--window", "4",
                      "--hidden", "4", "--epochs", "1", "--out", "m.pt", cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "m.pt").exists()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two small forecasting checkpoints of different shapes, and the quantized model of the first."""
    directory = tmp_path_factory.mktemp("checkpoints")
    for name, hidden in (("a", "4"), ("b", "6")):
        result = tinylstm("train", "--dataset", "taylor_demand", "--window", "8", "--hidden", hidden, "--epochs", "1",
                          "--out", f"{name}.pt", "--quiet", cwd=directory)
        assert result.returncode == 0, result.stderr
    result = tinylstm("quantize", "a.pt", "--out", "a.npz", cwd=directory)
    assert result.returncode == 0, result.stderr
    return directory


def test_evaluate_with_a_model_from_another_checkpoint_is_a_one_line_error(two_checkpoints):
    result = tinylstm("evaluate", "b.pt", "a.npz", cwd=two_checkpoints)
    assert_one_line_error(result, "not made from this checkpoint", "hidden [4]", "hidden [6]")


def test_quantize_of_a_diverged_checkpoint_is_a_one_line_error(two_checkpoints, tmp_path):
    import torch

    from tinylstm import train as tr

    checkpoint = tr.load_checkpoint(two_checkpoints / "a.pt")
    with torch.no_grad():
        next(checkpoint.model.parameters()).fill_(float("inf"))
    tr.save_checkpoint(checkpoint, tmp_path / "diverged.pt")
    result = tinylstm("quantize", "diverged.pt", "--out", "d.npz", "--json", cwd=tmp_path)
    assert_one_line_error(result, "not finite", "diverged")
    assert not (tmp_path / "d.npz").exists()


def test_training_that_diverges_writes_no_checkpoint(tmp_path):
    result = tinylstm("train", "--dataset", "taylor_demand", "--window", "8", "--hidden", "4", "--epochs", "2",
                      "--lr", "1e30", "--clip-norm", "1e30", "--out", "x.pt", "--json", cwd=tmp_path)
    assert_one_line_error(result, "training diverged", "--lr")
    assert not (tmp_path / "x.pt").exists()


def test_json_reports_stay_valid_json_with_non_finite_figures(capsys):
    import json

    from tinylstm.cli import _emit

    def no_constants(name: str) -> None:
        raise AssertionError(f"invalid JSON constant {name}")

    _emit({"loss": float("inf"), "history": [1.0, float("nan")], "nested": {"rmse": float("-inf")}}, True, "", False)
    assert json.loads(capsys.readouterr().out, parse_constant=no_constants) == {
        "loss": None, "history": [1.0, None], "nested": {"rmse": None}}


def test_a_window_beyond_the_protocols_16_bits_is_refused_before_building(tmp_path):
    from tests.random_models import random_model
    from tinylstm import qmodel

    model = random_model(2, layers=1, input_size=2, hidden_sizes=(4,), window=4)
    model.input.window = 10**9
    qmodel.save(model, tmp_path / "long.npz")
    result = tinylstm("build", "--model", "long.npz", "--board", "mps2_an386", cwd=tmp_path)
    assert_one_line_error(result, "1,000,000,000 steps", "16-bit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.npz"]
