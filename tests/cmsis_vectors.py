"""The published CMSIS-NN int8 LSTM test vectors (tests/data/vectors, see its NOTICE.md), as tinylstm models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylstm.qmodel import GATES, InputSpec, LSTMLayer, QuantizedModel

VECTOR_ROOT = Path(__file__).resolve().parent / "data" / "vectors"
VECTOR_FILES = sorted(VECTOR_ROOT.glob("cmsis-nn-lstm*/*.json"))
# 3 published cases and 16 random ones. Missing files stop the collection of every module that uses them, rather
# than silently leaving parametrized tests empty (skipped).
if len(VECTOR_FILES) != 19:
    raise RuntimeError(f"{VECTOR_ROOT}: expected the 19 CMSIS-NN vector files (cmsis-nn-lstm*/*.json), "
                       f"found {len(VECTOR_FILES)}; they ship with the repository")


@dataclass
class VectorCase:
    name: str
    model: QuantizedModel
    inputs: np.ndarray  # int8 [batch, T, I]
    expected: np.ndarray  # int8 [batch, T, H]: h after every step


def load_case(path: Path) -> VectorCase:
    d = json.loads(path.read_text())
    c, a = d["config"], d["arrays"]
    B, T, In, H = c["batch_size"], c["time_steps"], c["input_size"], c["hidden_size"]

    def arr(key: str) -> np.ndarray:
        return np.array(a[key]["data"], dtype=a[key]["dtype"])

    def per_gate(kind: str, suffix: str) -> np.ndarray:
        return np.array([c[f"{g}_gate_{kind}_{suffix}"] for g in GATES], dtype=np.int32)

    layer = LSTMLayer(
        input_size=In, hidden_size=H,
        input_zero_point=-c["input_zero_point"], output_zero_point=c["output_zero_point"],
        input_scale=1.0, output_scale=1.0,
        cell_scale_power=c["cell_scale_power"], cell_clip=c["cell_clip"],
        input_weights=np.stack([arr(f"{g}_gate_input_weights").reshape(H, In) for g in GATES]),
        hidden_weights=np.stack([arr(f"{g}_gate_hidden_weights").reshape(H, H) for g in GATES]),
        bias=np.stack([arr(f"{g}_gate_bias") for g in GATES]),
        input_multiplier=per_gate("input", "multiplier"), input_shift=per_gate("input", "shift"),
        hidden_multiplier=per_gate("hidden", "multiplier"), hidden_shift=per_gate("hidden", "shift"),
        forget_to_cell_multiplier=c["forget_to_cell_multiplier"], forget_to_cell_shift=c["forget_to_cell_shift"],
        input_to_cell_multiplier=c["input_to_cell_multiplier"], input_to_cell_shift=c["input_to_cell_shift"],
        output_multiplier=c["output_multiplier"], output_shift=c["output_shift"],
    )
    spec = InputSpec(features=In, window=T, scale=1.0, zero_point=-c["input_zero_point"])
    model = QuantizedModel(input=spec, layers=[layer], name=d["case"].replace("-", "_"))
    x, y = arr("input_tensor"), arr("output")
    if c["time_major"]:
        x = x.reshape(T, B, In).transpose(1, 0, 2)
        y = y.reshape(T, B, H).transpose(1, 0, 2)
    else:
        x, y = x.reshape(B, T, In), y.reshape(B, T, H)
    return VectorCase(d["case"], model, x, y)
