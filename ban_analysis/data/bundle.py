"""From arrays to a :class:`DatasetBundle`: shape checks, the fixed digits test split, the stratified
validation split, the optional training subset, and the per-channel statistics.

Split from ``datasets.py`` (which finds and reads the arrays) to keep both short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ban_analysis.data.batches import Split

logger = logging.getLogger("ban_analysis.data.datasets")  # the name users filter on

DIGITS_TEST_SEED = 0  # fixed: the digits test split must be the same for every run and seed
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DatasetBundle:
    """A loaded dataset: three splits plus what models and normalisation need.

    Attributes:
        name: dataset name.
        train, val, test: the splits (``val`` may be empty when ``val_size == 0``).
        num_classes: number of classes.
        input_shape: (C, H, W).
        mean, std: per-channel mean and std of pixel/255 over ``train``.
        classes: readable class names, length ``num_classes``.
        source: where the data was read from (a path), for the run manifest.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    source: str


# ----------------------------------------------------------------------------------- locating


def stratified_pick(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Choose ``count`` positions of ``labels`` with per-class counts proportional to frequency.

    Class c with n_c of the n samples gets floor(count * n_c / n) picks; the leftover picks go
    to the classes with the largest remainders (ties broken by ``rng``), so counts are exact.

    Args:
        labels: (N,) integer labels.
        count: how many to pick, 0 <= count <= N.
        rng: the generator for every random choice.

    Returns:
        (count,) int64 positions into ``labels``, sorted ascending.
    """
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    base = count * counts // n  # integer arithmetic: exact, no float floor surprises
    remainder = count * counts % n
    extra = count - int(base.sum())
    # lexsort: last key is primary -> largest remainder first, random order among equals.
    order = np.lexsort((rng.permutation(len(classes)), -remainder))
    base[order[:extra]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False) for c, k in zip(classes, base)]
    return np.sort(np.concatenate(picks).astype(np.int64)) if picks else np.zeros(0, np.int64)


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 -> contiguous (N, C, H, W) uint8."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{what}: images must be (N, H, W) or (N, H, W, C) with C in (1, 3); got {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
            raise ValueError(f"{what}: images must be uint8 (or integers in 0..255); got {x.dtype}")
        x = x.astype(np.uint8)
    return np.ascontiguousarray(x)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of x/255.

    Args:
        x: (N, C, H, W) uint8.

    Returns:
        (mean, std), each a tuple of C floats.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        # A 256-bin histogram is exact and avoids a float copy of the whole array.
        hist = np.bincount(x[:, c].reshape(-1), minlength=256).astype(np.float64)
        m = float(hist @ values / hist.sum())
        var = float(hist @ (values - m) ** 2 / hist.sum())
        mean.append(m)
        std.append(max(var, 0.0) ** 0.5)
    return tuple(mean), tuple(std)


# ----------------------------------------------------------------------------------- loading


def _train_test_arrays(name: str, arrays: dict, source: str) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) as (N, C, H, W) uint8 and (N,) int64, checked."""
    if "x_train" in arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ValueError(f"{source}: missing arrays {missing}; need x_train, y_train, x_test, y_test (or x, y)")
        x_train, y_train = _to_nchw(arrays["x_train"], source), arrays["y_train"].astype(np.int64)
        x_test, y_test = _to_nchw(arrays["x_test"], source), arrays["y_test"].astype(np.int64)
    elif "x" in arrays and "y" in arrays:
        x_all = arrays["x"]
        if name == "digits" and x_all.max() <= 16:
            # UCI digits store 0..16 ink counts; rescale so uint8 means 0..255 like every dataset.
            x_all = np.round(x_all.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
        x_all, y_all = _to_nchw(x_all, source), arrays["y"].astype(np.int64)
        n_test = round(DIGITS_TEST_FRACTION * len(y_all))
        test_pos = stratified_pick(y_all, n_test, np.random.default_rng(DIGITS_TEST_SEED))
        keep = np.ones(len(y_all), dtype=bool)
        keep[test_pos] = False
        x_train, y_train, x_test, y_test = x_all[keep], y_all[keep], x_all[test_pos], y_all[test_pos]
    else:
        raise ValueError(f"{source}: need arrays x_train, y_train, x_test, y_test (or x, y); got {sorted(arrays)}")
    for x, y, what in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{source}: {what} has {x.shape[0]} images but {y.shape[0]} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{source}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ in shape"
        )
    return x_train, y_train, x_test, y_test


def _checked_classes(name, spec, classes, y_train, y_test, source) -> tuple[int, tuple[str, ...]]:
    """The number of classes and their names; labels outside 0..C-1 are refused."""
    num_classes = spec.num_classes
    if spec.kind == "folder":
        num_classes = len(classes)
        if num_classes != spec.num_classes:
            logger.warning("%s: folder has %d classes, %s usually has %d", source, num_classes, name, spec.num_classes)
    for y, what in ((y_train, "train"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{source}: {what} labels must be in 0..{num_classes - 1}; got {y.min()}..{y.max()}")
    if len(classes) != num_classes:
        classes = tuple(str(i) for i in range(num_classes))
    return num_classes, classes


def _train_val_positions(name, y_train, val_size, val_seed, train_subset) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the (stratified) validation split and of the training samples kept."""
    n_train = len(y_train)
    if val_size >= n_train:
        raise ValueError(
            f"val_size must be in 0..{n_train - 1} for {name} ({n_train} training samples); got {val_size}"
        )
    rng = np.random.default_rng(val_seed)
    val_pos = stratified_pick(y_train, val_size, rng)
    rest = np.setdiff1d(np.arange(n_train, dtype=np.int64), val_pos, assume_unique=True)
    if train_subset:
        if train_subset > len(rest):
            raise ValueError(
                f"train_subset must be in 0..{len(rest)} for {name} with val_size={val_size}; got {train_subset}"
            )
        rest = rest[stratified_pick(y_train[rest], train_subset, rng)]
    return val_pos, rest


def _build_bundle(name, spec, arrays, classes, source, val_size, val_seed, train_subset, device) -> DatasetBundle:
    x_train, y_train, x_test, y_test = _train_test_arrays(name, arrays, source)
    num_classes, classes = _checked_classes(name, spec, classes, y_train, y_test, source)
    val_pos, rest = _train_val_positions(name, y_train, val_size, val_seed, train_subset)

    def split(x: np.ndarray, y: np.ndarray, pos: np.ndarray) -> Split:
        """Samples ``pos`` of (x, y) on ``device``; ``x`` is already (len(pos), C, H, W)."""
        return Split(
            torch.from_numpy(x).to(device), torch.from_numpy(y[pos]).to(device), torch.from_numpy(pos).to(device)
        )

    x_rest = np.ascontiguousarray(x_train[rest])  # (N, C, H, W), also the input of the statistics
    mean, std = channel_stats(x_rest)
    train = split(x_rest, y_train, rest)
    val = split(np.ascontiguousarray(x_train[val_pos]), y_train, val_pos)
    test = split(x_test, y_test, np.arange(len(y_test), dtype=np.int64))
    logger.info(
        "%s from %s: train %d, val %d, test %d, shape %s",
        name, source, len(rest), len(val_pos), len(y_test), x_train.shape[1:],
    )
    return DatasetBundle(name=name, train=train, val=val, test=test, num_classes=num_classes,
                         input_shape=tuple(int(s) for s in x_train.shape[1:]), mean=mean, std=std,
                         classes=classes, source=source)
