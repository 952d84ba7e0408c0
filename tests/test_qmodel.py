"""The on-disk quantized model format: round trip, and clear rejection of bad files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from tests.cmsis_vectors import VECTOR_FILES, load_case
from tinylstm import qmodel
from tinylstm.qmodel import DenseHead, ModelFormatError
from tinylstm.reference import Reference


@pytest.fixture
def model():
    m = load_case(VECTOR_FILES[0]).model
    H = m.layers[0].hidden_size
    rng = np.random.default_rng(0)
    m.head = DenseHead(input_size=H, output_size=3, input_zero_point=m.layers[0].output_zero_point,
                       output_zero_point=-5, output_scale=0.05,
                       weights=rng.integers(-127, 128, (3, H), dtype=np.int8),
                       bias=rng.integers(-1000, 1000, 3).astype(np.int32),
                       multiplier=np.array([1518500250], np.int32), shift=np.array([-8], np.int32))
    m.meta = {"task": "classification", "classes": ["a", "b", "c"]}
    return m


def _rewrite(path, edit_meta=None, edit_arrays=None):
    with np.load(path) as z:
        files = {k: z[k] for k in z.files}
    meta = json.loads(files.pop("__meta__").tobytes())
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(files)
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **files)


def test_round_trip_keeps_every_parameter(model, tmp_path):
    path = qmodel.save(model, tmp_path / "m.npz")
    loaded = qmodel.load(path)
    assert loaded.digest() == model.digest()
    assert loaded.meta == model.meta
    window = load_case(VECTOR_FILES[0]).inputs[0]
    np.testing.assert_array_equal(Reference(loaded).run(window), Reference(model).run(window))
    assert not list(tmp_path.glob("*.tmp"))


def test_digest_changes_with_any_weight(model):
    before = model.digest()
    model.layers[0].hidden_weights[2, 1, 0] ^= 1
    assert model.digest() != before


def test_wrong_array_shape_is_named(model, tmp_path):
    path = qmodel.save(model, tmp_path / "m.npz")
    _rewrite(path, edit_arrays=lambda a: a.update({"layers.0.hidden_weights": a["layers.0.hidden_weights"][:, :-1]}))
    message = r"layers\.0\.hidden_weights has shape \[4, 10, 11\], expected \[4, 11, 11\]"
    with pytest.raises(ModelFormatError, match=message):
        qmodel.load(path)


def test_unsupported_version_is_named(model, tmp_path):
    path = qmodel.save(model, tmp_path / "m.npz")
    _rewrite(path, edit_meta=lambda m: m.update(version=99))
    with pytest.raises(ModelFormatError, match="version 99 is not supported"):
        qmodel.load(path)


def test_wrong_dtype_and_missing_array_are_named(model, tmp_path):
    path = qmodel.save(model, tmp_path / "m.npz")
    _rewrite(path, edit_arrays=lambda a: a.update({"head.bias": a["head.bias"].astype(np.int64)}))
    with pytest.raises(ModelFormatError, match="'head.bias' has dtype int64, expected int32"):
        qmodel.load(path)
    path = qmodel.save(model, tmp_path / "m.npz")
    _rewrite(path, edit_arrays=lambda a: a.pop("layers.0.bias"))
    with pytest.raises(ModelFormatError, match="'layers.0.bias' is missing"):
        qmodel.load(path)


def test_mismatched_head_is_named(model, tmp_path):
    path = qmodel.save(model, tmp_path / "m.npz")
    _rewrite(path, edit_meta=lambda m: m["head"].update(input_zero_point=7))
    with pytest.raises(ModelFormatError, match="head.input_zero_point = 7"):
        qmodel.load(path)


def test_corrupt_and_foreign_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFormatError, match="not a tinylstm model file"):
        qmodel.load(garbage)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(ModelFormatError, match="no __meta__"):
        qmodel.load(foreign)
    truncated = tmp_path / "truncated.npz"
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("__meta__.npy", b"\x93NUMPY")
    with pytest.raises(ModelFormatError):
        qmodel.load(truncated)
    with pytest.raises(ModelFormatError, match="no such file"):
        qmodel.load(tmp_path / "absent.npz")


def test_save_refuses_an_invalid_model(model, tmp_path):
    model.layers[0].cell_clip = 40000
    with pytest.raises(ModelFormatError, match="cell_clip"):
        qmodel.save(model, tmp_path / "m.npz")
    assert not list(tmp_path.iterdir())
