"""Decode an ImageFolder-layout dataset once into uint8 arrays, cached outside the data folder.

Layout (torchvision ``ImageFolder``, fastai Imagenette/Imagewoof/ImageWang)::

    <folder>/train/<class>/*.JPEG     training images, one sub-folder per class
    <folder>/val/<class>/*.JPEG       the official validation images = our *test* split
    <folder>/classes.tsv              optional: "<class folder>\\t<readable name>" per line

Classes are the sorted names of the ``train/`` sub-folders (as ``ImageFolder`` does); ``val/``
may hold a subset of them (ImageWang's val holds only the 10 Imagewoof classes). Files are
visited in sorted order, so the sample index of an image is stable across machines.

Decoding: every image is opened with PIL and ``.convert("RGB")`` (about 1-2% of ImageNet
images are greyscale or CMYK). The output side ``size`` is ``image_size`` when given, else the
``<size>`` of a folder named ``<name>-<size>`` (``imagewang-64`` -> 64), else the shorter side of
the first training image. An image that is not already ``size x size`` has its shorter side
resized to ``size`` (bicubic, which PIL antialiases when shrinking) and is centre-cropped to a
square, the usual ImageNet evaluation transform; square images are therefore just resized.

Cache: the decoded arrays go to ``<cache_dir>/folders/<folder>-<size>px-<key>.npz``, where
``key`` hashes the folder's absolute path, ``size`` and the list of (relative path, byte size)
of every image, so adding, removing or replacing a file gives a new key. Nothing is ever
written beside the data (shared data folders are read-only). Writes are atomic (temporary
file + ``os.replace``), so concurrent runs at worst decode twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Bump when the decoding rule changes, so stale caches are not reused.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class FolderArrays:
    """A decoded image folder.

    Attributes:
        x_train: (N, S, S, 3) uint8, NHWC.
        y_train: (N,) int64 class indices into ``classes``.
        x_test: (M, S, S, 3) uint8 decoded from ``val/``.
        y_test: (M,) int64.
        classes: class folder names (e.g. WordNet ids), sorted.
        class_names: readable names from ``classes.tsv`` when present, else ``classes``.
        size: the side S of every image.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    size: int


def is_image_folder(path: Path) -> bool:
    """True when ``path`` has ``train/`` and ``val/`` sub-folders."""
    return (path / "train").is_dir() and (path / "val").is_dir()


def size_from_folder_name(path: Path) -> int | None:
    """The ``<size>`` of a folder named ``<name>-<size>`` (``imagewang-64`` -> 64), else None."""
    match = re.search(r"-(\d+)$", path.name)
    return int(match.group(1)) if match else None


def _list_split(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    """Sorted class folders and image files of one split folder.

    Returns:
        (class names found, image paths, class index of each image). With ``classes`` given
        (the training classes), labels index into it and an unknown class is an error.
    """
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not found:
        raise ValueError(f"image folder {split_dir} has no class sub-folders; expected {split_dir}/<class>/*.jpg")
    lookup = {c: i for i, c in enumerate(classes if classes is not None else found)}
    unknown = [c for c in found if c not in lookup]
    if unknown:
        raise ValueError(f"{split_dir} has classes {unknown[:5]} that train/ does not have")
    files: list[Path] = []
    labels: list[int] = []
    for name in found:
        for f in sorted((split_dir / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS:
                files.append(f)
                labels.append(lookup[name])
    if not files:
        raise ValueError(f"image folder {split_dir} holds no images with extensions {IMG_EXTENSIONS}")
    return found, files, labels


def _read_class_names(folder: Path, classes: list[str]) -> tuple[str, ...]:
    tsv = folder / "classes.tsv"
    if not tsv.is_file():
        return tuple(classes)
    names = {}
    for line in tsv.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            names[parts[0].strip()] = parts[1].strip()
    return tuple(names.get(c, c) for c in classes)


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image to a (size, size, 3) uint8 array (rule in the module docstring)."""
    from PIL import Image  # deferred: PIL is only needed for folder datasets

    with Image.open(path) as img:
        img = img.convert("RGB")
        width, height = img.size
        if (width, height) != (size, size):
            scale = size / min(width, height)
            # max(size, ...) guards against rounding the shorter side below size.
            new_w = max(size, round(width * scale))
            new_h = max(size, round(height * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def _decode_all(files: list[Path], size: int, what: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)  # (N, S, S, 3)
    # disable=None: the bar shows only on a terminal, never in logs or tests.
    for i, f in enumerate(tqdm(files, desc=f"decoding {what}", unit="img", disable=None, leave=False)):
        out[i] = decode_image(f, size)
    return out


def _cache_key(folder: Path, size: int, files: list[Path]) -> str:
    payload = {
        "version": _CACHE_VERSION,
        "path": str(folder),
        "size": size,
        "files": [[str(f.relative_to(folder)), f.stat().st_size] for f in files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_image_folder(folder: str | os.PathLike, image_size: int | None, cache_dir: Path) -> FolderArrays:
    """Decode ``folder`` (layout in the module docstring) into uint8 arrays, using the cache.

    Args:
        folder: the dataset folder holding ``train/`` and ``val/``.
        image_size: output side S, or None for the folder's native size.
        cache_dir: the package cache root; arrays go to ``cache_dir/folders/``.

    Returns:
        The decoded :class:`FolderArrays`.
    """
    folder = Path(folder).resolve()
    if not is_image_folder(folder):
        raise ValueError(f"{folder} is not an image folder: expected train/<class>/ and val/<class>/ inside")
    classes, train_files, train_labels = _list_split(folder / "train", None)
    _, test_files, test_labels = _list_split(folder / "val", classes)
    if image_size is not None:
        size = int(image_size)
    else:
        size = size_from_folder_name(folder)
        if size is None:
            from PIL import Image

            with Image.open(train_files[0]) as img:
                size = min(img.size)
    class_names = _read_class_names(folder, classes)

    key = _cache_key(folder, size, train_files + test_files)
    cache_file = Path(cache_dir) / "folders" / f"{folder.name}-{size}px-{key}.npz"
    if cache_file.is_file():
        logger.info("loading decoded image folder %s from cache %s", folder, cache_file)
        with np.load(cache_file) as data:
            x_train, x_test = data["x_train"], data["x_test"]
    else:
        logger.info("decoding %d + %d images of %s at %d px", len(train_files), len(test_files), folder, size)
        x_train = _decode_all(train_files, size, "train")
        x_test = _decode_all(test_files, size, "val")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # np.savez appends ".npz" unless the name ends with it, hence the suffix order.
        tmp = cache_file.with_name(f"{cache_file.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, x_train=x_train, x_test=x_test)
        os.replace(tmp, cache_file)
        logger.info("cached decoded images at %s", cache_file)
    return FolderArrays(
        x_train=x_train,
        y_train=np.asarray(train_labels, dtype=np.int64),
        x_test=x_test,
        y_test=np.asarray(test_labels, dtype=np.int64),
        classes=tuple(classes),
        class_names=class_names,
        size=size,
    )
