"""Datasets by name -> in-memory uint8 splits -> augmented, normalised ``(x, y, index)`` batches.

Every dataset this project uses fits in memory as uint8 (CIFAR-100: 150 MB; ImageWang-64:
230 MB), so it is decoded once into a ``(N, C, H, W)`` uint8 tensor on the training device and
batches are cut, cropped, flipped and normalised there, vectorised over the batch (the airbench
recipe; :func:`iterate_batches`, implemented in :mod:`ban_analysis.data.batches`).
``benchmarks/bench_data.py`` measures this against a torchvision ``Dataset`` + transforms +
``DataLoader``.

Where a dataset comes from (``load_dataset``), in this order:

1. ``root`` if given, else the ``BAN_DATA`` environment variable, is searched for
   ``<name>.npz`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``; images uint8 NHW or
   NHWC; the format of the project's offline data folder), then for an image folder ``<name>``
   or ``<name>-<size>`` (``imagewang-64``; see :mod:`ban_analysis.data.imagefolder`). With several
   ``<name>-<size>`` folders, the one whose size equals ``image_size`` wins, else the smallest
   size >= ``image_size``, else the largest.
2. ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` only: torchvision's dataset class with
   ``download=True`` into ``<cache_dir>/torchvision`` (a no-op once downloaded).
3. Otherwise :class:`DatasetNotFoundError` (a ``FileNotFoundError`` and a ``ValueError``) whose
   one-line message lists every place looked at.

``cache_dir`` defaults to ``$BAN_CACHE``, else ``~/.cache/ban_analysis``.

Splits:

* ``test``: the official test set (an image folder's ``val/``). ``digits`` (the UCI 8x8 set,
  1,797 images, no official split) gets a fixed stratified 20% test split drawn with
  ``np.random.default_rng(DIGITS_TEST_SEED)``, ``DIGITS_TEST_SEED = 0`` (359 test, 1,438
  train images); any other ``x``/``y``-only npz is split the same way. Digits pixels 0..16 are
  scaled to 0..255 by ``round(v * 255 / 16)``.
* ``val``: ``val_size`` samples held out of the training set, stratified by class (per-class
  counts proportional to class frequency, remainders to the largest fractional parts, ties
  broken at random), drawn with ``np.random.default_rng(val_seed)``.
* ``train``: the rest; with ``train_subset > 0`` a stratified subset of that many samples drawn
  with the same generator *after* the validation split, so the validation split does not depend
  on ``train_subset``.

``Split.index`` is a sample's position in the original training set for ``train`` and ``val``
(stable whatever the split), its position in the test set for ``test``. ``mean`` and ``std``
are per-channel statistics of pixel/255 over the final ``train`` split (population std, exact:
computed from a 256-bin histogram per channel).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from ban_analysis.data.batches import AUGMENTATIONS, Split, check_int, iterate_batches, random_crop, random_flip
from ban_analysis.registry import Registry
from ban_analysis.data.imagefolder import is_image_folder, load_image_folder, size_from_folder_name

logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DIGITS_TEST_SEED", "DatasetBundle", "DatasetNotFoundError", "DatasetSpec", "Split",
    "channel_stats", "default_cache_dir", "iterate_batches", "load_dataset", "random_crop",
    "random_flip", "stratified_pick",
]

DIGITS_TEST_SEED = 0  # fixed: the digits test split must be the same for every run and seed
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DatasetSpec:
    """What the package knows about a dataset name.

    Attributes:
        name: registry key.
        num_classes: class count (image folders: checked against the folder, which wins).
        kind: "array" (npz or torchvision) or "folder" (ImageFolder layout).
        torchvision_class: ``torchvision.datasets`` class for the download fallback, or None.
        description: one line for listings.
    """

    name: str
    num_classes: int
    kind: str
    torchvision_class: str | None
    description: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")
for _spec in (
    DatasetSpec("cifar10", 10, "array", "CIFAR10", "CIFAR-10, 32x32 RGB, 50k/10k"),
    DatasetSpec("cifar100", 100, "array", "CIFAR100", "CIFAR-100 fine labels, 32x32 RGB, 50k/10k"),
    DatasetSpec("mnist", 10, "array", "MNIST", "MNIST, 28x28 grey, 60k/10k"),
    DatasetSpec("fashion_mnist", 10, "array", "FashionMNIST", "Fashion-MNIST, 28x28 grey, 60k/10k"),
    DatasetSpec("digits", 10, "array", None, "UCI digits, 8x8 grey, 1,797 images, fixed 20% test split"),
    DatasetSpec("imagewang", 20, "folder", None, "ImageWang (Imagenette + 10% Imagewoof), val = Imagewoof"),
    DatasetSpec("imagenette", 10, "folder", None, "Imagenette, 10 easy ImageNet classes"),
    DatasetSpec("imagewoof", 10, "folder", None, "Imagewoof, 10 dog breeds"),
):
    DATASETS.register(_spec.name, _spec)
del _spec


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset was found nowhere; the message lists the places looked at."""


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


def default_cache_dir() -> Path:
    """``$BAN_CACHE`` if set, else ``~/.cache/ban_analysis``."""
    env = os.environ.get("BAN_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/ban_analysis").expanduser()


def _pick_sized_folder(candidates: list[tuple[int, Path]], image_size: int | None) -> Path:
    """Among ``<name>-<size>`` folders pick the exact size, else the smallest bigger, else the largest."""
    candidates = sorted(candidates)
    if image_size is not None:
        for size, path in candidates:
            if size >= image_size:
                return path
    return candidates[-1][1]


def _find_in_root(name: str, root: Path, image_size: int | None, looked: list[str]) -> Path | None:
    if not root.is_dir():
        looked.append(f"{root} (no such folder)")
        return None
    npz = root / f"{name}.npz"
    looked.append(str(npz))
    if npz.is_file():
        return npz
    plain = root / name
    looked.append(f"{plain}/ (train/, val/)")
    if is_image_folder(plain):
        return plain
    looked.append(f"{root}/{name}-<size>/")
    sized = []
    for p in root.glob(f"{name}-*"):
        size = size_from_folder_name(p)
        if size is not None and p.name == f"{name}-{size}" and is_image_folder(p):
            sized.append((size, p))
    return _pick_sized_folder(sized, image_size) if sized else None


def _torchvision_arrays(spec: DatasetSpec, cache_dir: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Download (or reuse) ``spec``'s torchvision dataset and return its arrays, unchanged."""
    import torchvision

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    tv_root = cache_dir / "torchvision"
    tv_root.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    printed = io.StringIO()
    # torchvision prints download messages; the library must not print, so they go to the log.
    with contextlib.redirect_stdout(printed):
        for split, train in (("train", True), ("test", False)):
            ds = cls(str(tv_root), train=train, download=True)
            # .data is the whole split already decoded (CIFAR: NHWC numpy; MNIST: NHW tensor).
            arrays[f"x_{split}"] = np.asarray(ds.data, dtype=np.uint8)
            arrays[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    if printed.getvalue().strip():
        logger.info("torchvision: %s", printed.getvalue().strip())
    return arrays, tuple(str(c) for c in getattr(ds, "classes", ()))


# ----------------------------------------------------------------------------------- splitting


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


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    val_size: int = 5000,
    val_seed: int = 0,
    train_subset: int = 0,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> DatasetBundle:
    """Load a dataset by name into memory as uint8 train/val/test splits on ``device``.

    Where it looks and how the splits are made: see the module docstring.

    Args:
        name: one of ``DATASETS``.
        root: folder with ``<name>.npz`` or an image folder; None -> ``$BAN_DATA``.
        val_size: training samples held out for validation (0 = empty val split).
        val_seed: seed of the validation (and train-subset) draw.
        train_subset: keep only this many training samples after the val split (0 = all).
        image_size: output side for image folders (None = native); must be None otherwise.
        cache_dir: downloads and decoded folders; None -> ``$BAN_CACHE`` or ``~/.cache/ban_analysis``.
        device: where the split tensors live.

    Returns:
        The :class:`DatasetBundle`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    check_int(val_size, "val_size", 0)
    check_int(val_seed, "val_seed", 0)
    check_int(train_subset, "train_subset", 0)
    if image_size is not None:
        check_int(image_size, "image_size", 1)
        if spec.kind != "folder":
            folders = ", ".join(n for n, s in DATASETS.items() if s.kind == "folder")
            raise ValueError(
                f"image_size applies only to image folders ({folders}); {name} has a fixed size, use image_size=None"
            )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    looked: list[str] = []
    found = None
    data_root = root if root is not None else os.environ.get("BAN_DATA")
    if data_root:
        found = _find_in_root(name, Path(data_root).expanduser(), image_size, looked)
    else:
        looked.append("no root given and BAN_DATA unset")

    classes: tuple[str, ...] = ()
    if found is not None and found.suffix == ".npz":
        try:
            with np.load(found) as data:
                wanted = ("x", "y", "x_train", "y_train", "x_test", "y_test", "classes")
                arrays = {k: data[k] for k in data.files if k in wanted}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{found}: cannot read it as an npz file ({type(err).__name__}: {err})") from err
        if "classes" in arrays:
            classes = tuple(str(c) for c in arrays.pop("classes"))
        source = str(found)
    elif found is not None:
        folder = load_image_folder(found, image_size, cache)
        arrays = {
            "x_train": folder.x_train, "y_train": folder.y_train, "x_test": folder.x_test, "y_test": folder.y_test
        }
        classes = folder.class_names
        source = str(found)
    elif spec.torchvision_class is not None:
        looked.append(f"torchvision.datasets.{spec.torchvision_class}(download=True) into {cache / 'torchvision'}")
        try:
            arrays, classes = _torchvision_arrays(spec, cache)
        except Exception as err:  # offline, checksum mismatch, disk full: all reported the same way
            looked[-1] += f" -> {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            arrays = None
        source = str(cache / "torchvision")
    else:
        arrays = None
    if arrays is None:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found; looked at: {'; '.join(looked)}. "
            f"Put {name}.npz or an image folder {name}/ or {name}-<size>/ in a folder "
            "and set BAN_DATA or data.root to it"
        )
    return _build_bundle(name, spec, arrays, classes, source, val_size, val_seed, train_subset, device)


def _build_bundle(name, spec, arrays, classes, source, val_size, val_seed, train_subset, device) -> DatasetBundle:
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
    return DatasetBundle(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        mean=mean,
        std=std,
        classes=classes,
        source=source,
    )
