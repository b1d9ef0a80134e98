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
from ban_analysis.data.bundle import (  # noqa: F401  (re-exported)
    DIGITS_TEST_SEED, DatasetBundle, _build_bundle, channel_stats, stratified_pick,
)
from ban_analysis.registry import Registry
from ban_analysis.data.imagefolder import is_image_folder, load_image_folder, size_from_folder_name

logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DIGITS_TEST_SEED", "DatasetBundle", "DatasetNotFoundError", "DatasetSpec", "Split",
    "channel_stats", "default_cache_dir", "iterate_batches", "load_dataset", "random_crop",
    "random_flip", "stratified_pick",
]

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
