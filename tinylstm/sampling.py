"""Which test windows the device runs: a seeded sample that represents the test split.

``sample_indices`` picks ``count`` windows of a split. "stratified" (the default) keeps every class of a
classifier in proportion (at least one window each), spends half an anomaly sample on the labelled anomalies
(at least one window in each labelled event) and the rest on normal windows, and spaces a forecaster's windows
evenly over the split. "first" takes the first windows; "all" the whole split. Indices come back sorted, so the
device sees its windows in time order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tinylstm.data import Split

SAMPLES = ("stratified", "first", "all")


def allocate(sizes: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``count`` windows each stratum (of ``sizes`` windows) gets: one each, then the rest in
    proportion to size, largest shortfall first, never more than a stratum holds. With fewer windows than
    strata, ``count`` strata drawn in proportion to size get one each."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if count > sizes.sum():
        raise ValueError(f"cannot draw {count} windows from {sizes.sum()}")
    out = np.zeros(len(sizes), dtype=np.int64)
    if count < len(sizes):
        out[rng.choice(len(sizes), size=count, replace=False, p=sizes / sizes.sum())] = 1
        return out
    out[:] = 1
    quota = count * sizes / sizes.sum()
    for _ in range(count - len(sizes)):
        out[np.argmax(np.where(out < sizes, quota - out, -np.inf))] += 1
    return out


def _draw(strata: list[np.ndarray], counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.choice(s, size=c, replace=False) for s, c in zip(strata, counts, strict=True) if c]
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def labelled_events(split: Split) -> list[np.ndarray]:
    """The window indices of each labelled anomaly: runs of consecutive windows whose target row is labelled."""
    if split.truth is None:
        return []
    idx = np.flatnonzero(split.truth)
    return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []


def seeded(split: Split, task: str) -> bool:
    """Whether a stratified sample of the split is drawn at random (else it is evenly spaced)."""
    return task == "classification" or bool(task == "anomaly" and labelled_events(split))


def sample_indices(split: Split, task: str, count: int, how: str = "stratified", seed: int = 0) -> np.ndarray:
    """Sorted indices of the ``count`` windows of ``split`` the device runs (see the module's docstring)."""
    if how not in SAMPLES:
        raise ValueError(f"unknown sample {how!r}; choose one of {', '.join(SAMPLES)}")
    n = len(split)
    if how == "all" or count >= n:
        return np.arange(n)
    if how == "first":
        return np.arange(count)
    if not seeded(split, task):  # forecasting, or anomaly data without labels: evenly spaced over the split
        return np.arange(count) * n // count
    rng = np.random.default_rng(seed)
    if task == "classification":
        strata = [np.flatnonzero(split.y == c) for c in np.unique(split.y)]
        picked = _draw(strata, allocate([len(s) for s in strata], count, rng), rng)
    else:
        events = labelled_events(split)
        normal = np.flatnonzero(split.truth == 0)
        anomalous = sum(len(e) for e in events)
        on_events = min(count, max(min(anomalous, max(len(events), count // 2)), count - len(normal)))
        picked = np.concatenate([_draw(events, allocate([len(e) for e in events], on_events, rng), rng),
                                 rng.choice(normal, size=count - on_events, replace=False)])
    return np.sort(picked).astype(np.int64)


def take(split: Split, indices: np.ndarray) -> Split:
    """The windows of ``split`` at ``indices``."""
    return Split(*(None if a is None else a[indices] for a in (split.x, split.y, split.row, split.naive, split.truth)))
