"""Tests of ban_analysis.data: dataset location, splits, statistics, batches, image folders.

Synthetic datasets are written to tmp_path; every expected value is computed here
independently (numpy, float64) rather than by calling the code under test again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import ban_analysis.data.imagefolder as imagefolder
from ban_analysis.data import (
    AUGMENTATIONS,
    DATASETS,
    DIGITS_TEST_SEED,
    DatasetNotFoundError,
    Split,
    iterate_batches,
    load_dataset,
    stratified_pick,
)

N_TRAIN, N_TEST, SIDE = 200, 50, 8


def write_npz(path: Path, grey: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A CIFAR-like npz: NHWC (or NHW) uint8, 20 train samples per class, labels as uint8."""
    rng = np.random.default_rng(seed)
    shape = (SIDE, SIDE) if grey else (SIDE, SIDE, 3)
    arrays = {
        "x_train": rng.integers(0, 256, (N_TRAIN, *shape), dtype=np.uint8),
        "y_train": np.repeat(np.arange(10, dtype=np.uint8), N_TRAIN // 10),
        "x_test": rng.integers(0, 256, (N_TEST, *shape), dtype=np.uint8),
        "y_test": np.arange(N_TEST, dtype=np.uint8) % 10,
    }
    np.savez(path, **arrays)
    return arrays


def nchw(x: np.ndarray) -> np.ndarray:
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


@pytest.fixture
def cifar_root(tmp_path):
    arrays = write_npz(tmp_path / "cifar10.npz")
    return tmp_path, arrays


# ----------------------------------------------------------------------------------- splits


def test_npz_splits_shapes_and_index_semantics(cifar_root, tmp_path):
    root, arrays = cifar_root
    b = load_dataset("cifar10", root=root, val_size=50, val_seed=1, cache_dir=tmp_path / "cache")
    assert b.name == "cifar10" and b.num_classes == 10 and b.input_shape == (3, SIDE, SIDE)
    assert (len(b.train), len(b.val), len(b.test)) == (150, 50, N_TEST)
    for split in (b.train, b.val, b.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64 and split.index.dtype == torch.int64
    x_train, x_test = nchw(arrays["x_train"]), nchw(arrays["x_test"])
    # index = position in the original training set: the sample and its label are found there.
    for split in (b.train, b.val):
        np.testing.assert_array_equal(split.x.numpy(), x_train[split.index.numpy()])
        np.testing.assert_array_equal(split.y.numpy(), arrays["y_train"][split.index.numpy()])
    np.testing.assert_array_equal(b.test.index.numpy(), np.arange(N_TEST))
    np.testing.assert_array_equal(b.test.x.numpy(), x_test)
    train_ids, val_ids = set(b.train.index.tolist()), set(b.val.index.tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(N_TRAIN))
    # Stratified: 50 of 200 balanced samples -> 5 per class.
    assert np.bincount(b.val.y.numpy(), minlength=10).tolist() == [5] * 10


def test_val_split_seeded_and_independent_of_train_subset(cifar_root, tmp_path):
    root, _ = cifar_root
    kw = dict(root=root, val_size=30, cache_dir=tmp_path / "cache")
    a = load_dataset("cifar10", val_seed=3, **kw)
    again = load_dataset("cifar10", val_seed=3, **kw)
    other = load_dataset("cifar10", val_seed=4, **kw)
    sub = load_dataset("cifar10", val_seed=3, train_subset=40, **kw)
    assert torch.equal(a.val.index, again.val.index) and torch.equal(a.train.index, again.train.index)
    assert not torch.equal(a.val.index, other.val.index)
    assert torch.equal(sub.val.index, a.val.index)  # the val draw comes first
    assert len(sub.train) == 40 and set(sub.train.index.tolist()) <= set(a.train.index.tolist())
    assert np.bincount(sub.train.y.numpy(), minlength=10).tolist() == [4] * 10


def test_mean_std_from_train_split(cifar_root, tmp_path):
    root, arrays = cifar_root
    b = load_dataset("cifar10", root=root, val_size=60, train_subset=100, cache_dir=tmp_path / "cache")
    x = nchw(arrays["x_train"])[b.train.index.numpy()].astype(np.float64) / 255.0
    np.testing.assert_allclose(b.mean, x.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.std, x.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_grey_npz_and_ban_data_env(tmp_path, monkeypatch):
    arrays = write_npz(tmp_path / "mnist.npz", grey=True)
    monkeypatch.setenv("BAN_DATA", str(tmp_path))
    b = load_dataset("mnist", val_size=10, cache_dir=tmp_path / "cache")
    assert b.input_shape == (1, SIDE, SIDE) and len(b.mean) == 1
    assert b.source == str(tmp_path / "mnist.npz")
    np.testing.assert_array_equal(b.test.x[:, 0].numpy(), arrays["x_test"])


def test_xy_only_npz_gets_fixed_digits_test_split(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 17, (100, 8, 8), dtype=np.uint8)
    y = np.arange(100, dtype=np.uint8) % 10
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    a = load_dataset("digits", root=tmp_path, val_size=8, val_seed=0, cache_dir=tmp_path / "c")
    b = load_dataset("digits", root=tmp_path, val_size=8, val_seed=9, cache_dir=tmp_path / "c")
    assert len(a.test) == 20 and len(a.train) + len(a.val) == 80  # 20% test
    assert torch.equal(a.test.x, b.test.x)  # the test split does not depend on val_seed
    np.testing.assert_array_equal(a.test.index.numpy(), np.arange(20))
    # Same draw as documented: stratified 20% with DIGITS_TEST_SEED.
    test_pos = stratified_pick(y.astype(np.int64), 20, np.random.default_rng(DIGITS_TEST_SEED))
    expected = np.round(x[test_pos].astype(np.float64) * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(a.test.x[:, 0].numpy(), expected)
    assert np.bincount(a.test.y.numpy(), minlength=10).tolist() == [2] * 10


def test_stratified_pick_exact_counts():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    picks = stratified_pick(labels, 10, np.random.default_rng(0))
    counts = np.bincount(labels[picks], minlength=3)
    assert len(set(picks.tolist())) == 10 and counts.sum() == 10
    assert counts[0] == 5 and sorted(counts[1:].tolist()) in ([1, 4], [2, 3]) and counts[1] >= 3


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="cifar11"), "allowed: cifar10, cifar100"),
        (dict(name="cifar10", val_size=200), "val_size must be in 0..199"),
        (dict(name="cifar10", val_size=-1), "val_size must be >= 0"),
        (dict(name="cifar10", val_size=50, train_subset=151), "train_subset must be in 0..150"),
        (dict(name="cifar10", image_size=16), "image_size applies only to image folders"),
        (dict(name="cifar10", val_size=1.5), "val_size must be an integer"),
    ],
)
def test_bad_arguments(cifar_root, tmp_path, kwargs, fragment):
    root, _ = cifar_root
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_dataset(root=root, cache_dir=tmp_path / "cache", **kwargs)


# ----------------------------------------------------------------------------------- not found


def test_missing_folder_dataset_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.delenv("BAN_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("imagenette", root=tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    for place in (f"{tmp_path}/imagenette.npz", f"{tmp_path}/imagenette/", f"{tmp_path}/imagenette-<size>/"):
        assert place in message
    with pytest.raises(DatasetNotFoundError, match="BAN_DATA unset"):
        load_dataset("imagewoof", cache_dir=tmp_path / "cache")


def test_missing_root_and_corrupt_npz(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no such folder"):
        load_dataset("imagewang", root=tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    (tmp_path / "digits.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read it as an npz file"):
        load_dataset("digits", root=tmp_path, val_size=0, cache_dir=tmp_path / "cache")


def test_torchvision_fallback_failure_is_reported(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert f"{tmp_path}/cifar10.npz" in message and "torchvision.datasets.CIFAR10" in message
    assert "RuntimeError: no network" in message and str(tmp_path / "cache" / "torchvision") in message


def test_torchvision_fallback_converts_to_uint8(tmp_path, monkeypatch):
    import torchvision

    seen = []

    class FakeMNIST:  # .data as a (N, 28, 28) uint8 tensor and .targets as MNIST has them
        classes = [str(i) for i in range(10)]

        def __init__(self, root, train, download):
            seen.append((root, train, download))
            n = 30 if train else 10
            self.data = torch.arange(n * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 4, 4)
            self.targets = torch.arange(n) % 10

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    b = load_dataset("mnist", root=tmp_path, val_size=10, cache_dir=tmp_path / "cache")
    tv_root = str(tmp_path / "cache" / "torchvision")
    assert seen == [(tv_root, True, True), (tv_root, False, True)]
    assert b.input_shape == (1, 4, 4) and len(b.train) == 20 and len(b.test) == 10
    np.testing.assert_array_equal(b.test.x[:, 0].numpy(), FakeMNIST(None, False, True).data.numpy())


# ----------------------------------------------------------------------------------- batches


def make_split(n: int = 64, channels: int = 3, side: int = 6, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, channels, side, side), generator=g, dtype=torch.int64).to(torch.uint8)  # no zeros
    return Split(x, torch.arange(n) % 10, torch.arange(n) * 3 + 7)


def test_no_augment_normalises_in_order():
    split = make_split(n=50)
    mean, std = (0.2, 0.5, 0.7), (0.3, 0.25, 0.1)
    batches = list(iterate_batches(split, 16, shuffle=False, augment="none", mean=mean, std=std))
    assert [len(y) for _, y, _ in batches] == [16, 16, 16, 2]
    x = torch.cat([b[0] for b in batches])
    expected = (split.x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), split.y)
    assert torch.equal(torch.cat([b[2] for b in batches]), split.index)
    dropped = list(iterate_batches(split, 16, shuffle=False, augment="none", drop_last=True))
    assert [len(y) for _, y, _ in dropped] == [16, 16, 16]


def test_shuffle_is_a_seeded_permutation():
    split = make_split(n=40)

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return list(iterate_batches(split, 7, generator=g, augment="crop_flip", pad=2))

    a, b, c = epoch(0), epoch(0), epoch(1)
    index = torch.cat([i for _, _, i in a])
    assert sorted(index.tolist()) == sorted(split.index.tolist())
    assert not torch.equal(index, split.index)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert not torch.equal(index, torch.cat([i for _, _, i in c]))
    # y and index travel together.
    position = {int(v): k for k, v in enumerate(split.index)}
    for _, y, i in a:
        assert torch.equal(y, split.y[[position[int(v)] for v in i]])


def test_caller_thread_count_is_kept_between_batches():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        seen = [torch.get_num_threads() for _ in iterate_batches(make_split(n=30), 8, generator=g)]
        assert seen == [2, 2, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_flip_reverses_columns():
    split = make_split(n=200)
    g = torch.Generator().manual_seed(0)
    (x, _, index), = list(iterate_batches(split, 200, shuffle=False, generator=g, augment="flip"))
    raw = torch.round(x * 255).to(torch.uint8)  # mean 0, std 1: x * 255 is the pixel
    flipped = torch.tensor([torch.equal(r, o.flip(2)) for r, o in zip(raw, split.x)])
    kept = torch.tensor([torch.equal(r, o) for r, o in zip(raw, split.x)])
    assert bool((flipped | kept).all())
    assert 60 < int(flipped.sum()) < 140  # about half, Binomial(200, 1/2)


def shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (dy, dx) with zero fill: out[i, j] = img[i + dy, j + dx] or 0."""
    c, h, w = img.shape
    out = np.zeros_like(img)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[:, ys, xs] = img[:, max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def test_crop_is_a_zero_padded_shift_of_the_image():
    pad = 2
    split = make_split(n=300, side=6)
    g = torch.Generator().manual_seed(0)
    (x, _, index), = list(iterate_batches(split, 300, shuffle=False, generator=g, augment="crop_flip", pad=pad))
    raw = torch.round(x * 255).to(torch.uint8).numpy()
    seen = set()
    for out, img in zip(raw, split.x.numpy()):
        matches = [
            (dy, dx, flip)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            for flip in (False, True)
            if np.array_equal(out, (lambda s: s[..., ::-1] if flip else s)(shifted(img, dy, dx)))
        ]
        assert matches, "output is no shift/flip of its input"
        seen.add(matches[0][:2])
    assert len(seen) == (2 * pad + 1) ** 2  # every offset in -pad..pad occurs


def test_crop_padding_is_black_after_normalisation():
    split = make_split(n=100, side=4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    g = torch.Generator().manual_seed(1)
    batches = iterate_batches(split, 100, shuffle=False, generator=g, augment="crop_flip", pad=3, mean=mean, std=std)
    (x, _, _), = list(batches)
    fill = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    is_fill = torch.isclose(x, fill.expand_as(x), atol=1e-5).all(dim=1)  # (B, H, W); real pixels are never 0
    assert 0 < is_fill.float().mean() < 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(augment="cutout", generator=torch.Generator()), "allowed: none, flip, crop_flip"),
        (dict(shuffle=True, augment="none"), "explicit torch.Generator"),
        (dict(shuffle=False, augment="flip"), "explicit torch.Generator"),
        (dict(batch_size=0, augment="none", shuffle=False), "batch_size must be >= 1"),
        (dict(pad=-1, generator=torch.Generator()), "pad must be >= 0"),
        (dict(mean=(0.1,), std=(1.0,), augment="none", shuffle=False), "mean and std need 3 values"),
    ],
)
def test_iterate_batches_bad_arguments(kwargs, fragment):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        iterate_batches(make_split(), **kwargs)  # raises at the call, before the first batch


def test_augmentations_constant_matches_docs():
    assert AUGMENTATIONS == ("none", "flip", "crop_flip")
    names = {"cifar10", "cifar100", "mnist", "fashion_mnist", "digits", "imagewang", "imagenette", "imagewoof"}
    assert names == set(DATASETS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batches_on_cuda_match_cpu_with_cpu_generator():
    split = make_split(n=50)
    cpu = list(iterate_batches(split, 16, generator=torch.Generator().manual_seed(0)))
    gpu = list(iterate_batches(split.to("cuda"), 16, generator=torch.Generator().manual_seed(0)))
    for (xc, yc, ic), (xg, yg, ig) in zip(cpu, gpu):
        assert xg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(ig.cpu(), ic)


# ----------------------------------------------------------------------------------- image folders


def make_folder(base: Path) -> dict[str, np.ndarray]:
    """imagenette-16 with train/{a,b,c} (PNG, lossless) and val/{a,b}; returns the square images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {}
    for split, classes in (("train", "abc"), ("val", "ab")):
        for c in classes:
            (base / split / f"n0{c}").mkdir(parents=True)
            for k in range(3):
                arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(arr).save(base / split / f"n0{c}" / f"img{k}.png")
                images[f"{split}/n0{c}/img{k}.png"] = arr
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(base / "train" / "n0a" / "zgrey.png")
    images["train/n0a/zgrey.png"] = np.repeat(grey[:, :, None], 3, axis=2)
    wide = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)  # H=16, W=32: centre crop keeps columns 8..23
    Image.fromarray(wide).save(base / "train" / "n0b" / "zwide.png")
    images["train/n0b/zwide.png"] = wide[:, 8:24]
    (base / "classes.tsv").write_text("n0a\talpha\nn0b\tbeta\nn0c\tgamma\n")
    return images


def test_image_folder_decoding_and_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    images = make_folder(data / "imagenette-16")
    before = sorted(p for p in data.rglob("*"))
    cache = tmp_path / "cache"
    b = load_dataset("imagenette", root=data, val_size=2, cache_dir=cache)
    assert b.input_shape == (3, 16, 16) and b.num_classes == 3 and b.classes == ("alpha", "beta", "gamma")
    assert len(b.train) + len(b.val) == 11 and len(b.test) == 6
    # Files are in sorted order: class a: img0..2, zgrey; class b: img0..2, zwide; class c: img0..2.
    order = [f"train/n0a/img{k}.png" for k in range(3)] + ["train/n0a/zgrey.png"]
    order += [f"train/n0b/img{k}.png" for k in range(3)] + ["train/n0b/zwide.png"]
    order += [f"train/n0c/img{k}.png" for k in range(3)]
    labels = [0] * 4 + [1] * 4 + [2] * 3
    for split in (b.train, b.val):
        for x, y, i in zip(split.x, split.y, split.index):
            np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), images[order[int(i)]])
            assert int(y) == labels[int(i)]
    test_order = [f"val/n0{c}/img{k}.png" for c in "ab" for k in range(3)]
    for x, y, i in zip(b.test.x, b.test.y, b.test.index):
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), images[test_order[int(i)]])
        assert int(y) == (0 if int(i) < 3 else 1)  # val labels index the train classes
    assert sorted(p for p in data.rglob("*")) == before  # nothing written beside the data
    cached = list((cache / "folders").glob("*.npz"))
    assert len(cached) == 1 and cached[0].name.startswith("imagenette-16-16px-")

    def no_decoding(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagefolder, "decode_image", no_decoding)
    again = load_dataset("imagenette", root=data, val_size=2, cache_dir=cache)
    assert torch.equal(again.train.x, b.train.x) and torch.equal(again.test.x, b.test.x)
    monkeypatch.undo()
    # A changed file list is a new cache key.
    class_dir = data / "imagenette-16" / "train" / "n0c"
    (class_dir / "img0.png").rename(class_dir / "img9.png")
    load_dataset("imagenette", root=data, val_size=2, cache_dir=cache)
    assert len(list((cache / "folders").glob("*.npz"))) == 2


def test_image_folder_resize_and_folder_choice(tmp_path):
    data = tmp_path / "data"
    make_folder(data / "imagenette-16")
    make_folder(data / "imagenette-32")  # same 16 px files; the name only ranks the choice
    b = load_dataset("imagenette", root=data, val_size=0, image_size=8, cache_dir=tmp_path / "cache")
    assert b.input_shape == (3, 8, 8) and b.source == str((data / "imagenette-16"))
    c = load_dataset("imagenette", root=data, val_size=0, image_size=20, cache_dir=tmp_path / "cache")
    assert c.source == str(data / "imagenette-32") and c.input_shape == (3, 20, 20)
    # Without image_size the largest <name>-<size> folder wins and its name gives the size.
    d = load_dataset("imagenette", root=data, val_size=0, cache_dir=tmp_path / "cache")
    assert d.source == str(data / "imagenette-32") and d.input_shape == (3, 32, 32)


# ----------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.environ.get("BAN_DATA"), reason="BAN_DATA unset")
def test_real_digits(tmp_path):
    b = load_dataset("digits", val_size=100, cache_dir=tmp_path)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert (len(b.train), len(b.val), len(b.test)) == (1338, 100, 359)
    assert int(b.train.x.max()) == 255 and set(b.test.y.tolist()) == set(range(10))


@pytest.mark.skipif(not os.environ.get("BAN_DATA"), reason="BAN_DATA unset")
def test_real_fashion_mnist(tmp_path):
    b = load_dataset("fashion_mnist", val_size=5000, cache_dir=tmp_path)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert np.bincount(b.val.y.numpy(), minlength=10).tolist() == [500] * 10
    assert b.classes[0] == "T-shirt/top" and 0.2 < b.mean[0] < 0.4
