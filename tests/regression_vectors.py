"""The regression vectors (tests/data/vectors/regressions): CMSIS-NN-layout cases with the final cell state and h
that an integer model of CMSIS-NN gives, recorded in each case's ``note``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.cmsis_vectors import VectorCase, load_case

REGRESSION_ROOT = Path(__file__).resolve().parent / "data" / "vectors" / "regressions"
REGRESSION_FILES = sorted(REGRESSION_ROOT.glob("*.json"))


@dataclass
class RegressionCase:
    case: VectorCase
    final_cell: np.ndarray  # int16 values [batch, H]: the cell state after the last step
    final_h: np.ndarray  # int8 values [batch, H]: h after the last step


def load_regression(path: Path) -> RegressionCase:
    note = json.loads(path.read_text())["note"]
    return RegressionCase(load_case(path), np.array(note["final_cell_expected"], dtype=np.int64),
                          np.array(note["final_h_expected"], dtype=np.int64))


def regression_cases() -> list[RegressionCase]:
    assert REGRESSION_FILES, f"no regression vectors in {REGRESSION_ROOT}"
    return [load_regression(path) for path in REGRESSION_FILES]
