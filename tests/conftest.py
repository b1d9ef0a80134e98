"""Shared fixtures: a tiny learnable synthetic dataset in the offline npz format, run configs,
and small random logit batches for the objective and decomposition tests.

The tiny set is written as ``mnist.npz`` (10 classes, 8x8) into a temporary root, so the loader's
real code path for npz files is what the tests exercise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_data_root() -> Path | None:
    """$BAN_DATA if set (CI sets it to ../shared/data); None makes real-data tests skip."""
    root = os.environ.get("BAN_DATA")
    return Path(root) if root and Path(root).is_dir() else None


requires_real_data = pytest.mark.skipif(real_data_root() is None, reason="BAN_DATA not set")


def write_tiny_npz(folder: Path, name: str = "mnist", n_train: int = 600, n_test: int = 200,
                   classes: int = 10, side: int = 8, seed: int = 0) -> Path:
    """Class-dependent blobs on noise in the (N, H, W) uint8 npz format: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(classes, side, side))

    def make(n):
        y = np.arange(n) % classes
        rng.shuffle(y)
        x = 0.6 * prototypes[y] + rng.normal(0, 50, size=(n, side, side)) + 40
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tiny_npz(root)
    return root


def tiny_config(root: Path, **sections) -> dict:
    """A run config table for the tiny dataset: MLP, 2 epochs, 2 BAN generations."""
    table = {
        "seed": 0,
        "data": {"name": "mnist", "root": str(root), "val_size": 80, "cache_dir": str(root / "cache")},
        "model": {"arch": "mlp", "params": {"widths": [32]}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "eval_batch_size": 256},
        "ban": {"generations": 2, "objective": "ban"},
    }
    for key, value in sections.items():
        table[key] = {**table.get(key, {}), **value} if isinstance(value, dict) else value
    return table


# ------------------------------------------------------- small logit batches (objective tests)


@pytest.fixture
def one_torch_thread():
    """Run on one thread: these tensors are tiny, and on a loaded machine an OpenMP parallel
    region can wait milliseconds for a second core. Results do not depend on it.

    Not autouse: the modules that want it say ``pytestmark = pytest.mark.usefixtures(...)``,
    so the data and training tests keep torch's thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(B: int = 6, C: int = 5, seed: int = 0, dtype=torch.float64, scale: float = 2.0):
    """Random ``(student_logits, teacher_logits, target)``: (B, C), (B, C), (B,) int64.

    Logits are ``scale * N(0, 1)`` drawn in float32 and then cast to ``dtype``, labels uniform,
    all from one generator seeded ``seed``.
    """
    g = gen(seed)
    student = (scale * torch.randn(B, C, generator=g)).to(dtype)
    teacher = (scale * torch.randn(B, C, generator=g)).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    return student, teacher, target
