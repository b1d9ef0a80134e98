"""Synthetic label noise on the training split: symmetric, pair and asymmetric (class-map) flips.

:func:`apply_label_noise` is pure (numpy in, numpy out; its only randomness is
``np.random.default_rng(seed)``). It flips an *exact* number of labels, not a Bernoulli draw per
sample: ``n_flip = floor(rate * n_eligible + 0.5)`` positions are chosen uniformly without
replacement among the eligible samples, so the realised rate is the configured one up to
rounding, for every seed. Every flip changes the label (no kind maps a class to itself), so
``flipped`` is exactly ``noisy != clean``.

Kinds (C classes, y a clean label):

* ``symmetric``: every sample is eligible; a flipped label is uniform over the C - 1 *other*
  classes (``rate`` is the fraction of labels that end up wrong, not "resampled uniformly
  over all C classes").
* ``pair``: every sample is eligible; y -> (y + 1) mod C.
* ``asymmetric``: only samples whose class is a key of ``class_map`` are eligible; y ->
  ``class_map[y]``. ``rate`` is then the flip fraction *within* the mapped classes (the
  convention of Patrini et al. 2017); the overall fraction is lower.

:func:`noisy_train_split` applies it to a :class:`DatasetBundle`'s train split (val and test stay
clean) and returns what the run folder records.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

__all__ = [
    "CIFAR10_CLASS_MAP", "KINDS", "MNIST_CLASS_MAP", "NoisyLabels", "apply_label_noise", "check_class_map",
    "noisy_train_split",
]

KINDS = ("symmetric", "pair", "asymmetric")

# The usual asymmetric maps (Patrini et al., "Making deep neural networks robust to label noise:
# a loss correction approach", CVPR 2017), source class -> target class.
MNIST_CLASS_MAP = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
# CIFAR-10: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog
CIFAR10_CLASS_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

_DIGITS = re.compile(r"[0-9]+$")


def _as_class(value: Any) -> int | None:
    """An int class from an int or a string of digits (TOML keys are strings); None otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and _DIGITS.match(value.strip()):
        return int(value.strip())
    return None


def check_class_map(class_map: Mapping[Any, Any] | None, num_classes: int | None = None,
                    key: str = "class_map") -> dict[int, int]:
    """``class_map`` as {source: target} ints, checked; a ValueError names the offending entry.

    Keys and values may be ints or strings of digits. With ``num_classes``, both must lie in
    0..num_classes-1. A class mapped to itself is refused (that flip would change nothing).
    """
    out: dict[int, int] = {}
    for src_raw, dst_raw in (class_map or {}).items():
        where = f"{key}.{src_raw}"
        src, dst = _as_class(src_raw), _as_class(dst_raw)
        if src is None or src < 0:
            raise ValueError(f"{where}: the source class must be an integer >= 0 (a string of digits in TOML)")
        if dst is None or dst < 0:
            raise ValueError(f"{where}: expected a target class, an integer >= 0; got {dst_raw!r}")
        if src in out:
            raise ValueError(f"{where}: class {src} is mapped twice")
        if src == dst:
            raise ValueError(f"{where}: maps class {src} to itself; leave it out of the map instead")
        if num_classes is not None:
            for what, c in (("source class", src), ("target class", dst)):
                if c >= num_classes:
                    raise ValueError(f"{where}: {what} {c} is out of range; allowed: a class in 0..{num_classes - 1}")
        out[src] = dst
    return out


def apply_label_noise(labels: np.ndarray, num_classes: int, rate: float, kind: str = "symmetric", seed: int = 0,
                      class_map: Mapping[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(rate * n_eligible)`` labels (see the module docstring for the kinds).

    Args:
        labels: (N,) integer labels in 0..num_classes-1.
        num_classes: C >= 2.
        rate: in [0, 1); 0 returns a copy of ``labels`` and draws no random number.
        kind: "symmetric", "pair" or "asymmetric".
        seed: seed of ``np.random.default_rng``, the only randomness.
        class_map: for "asymmetric": source class -> target class (ints or digit strings).

    Returns:
        ``(noisy, flipped)``: (N,) int64 labels and (N,) bool, ``flipped == (noisy != labels)``.

    Raises:
        ValueError: bad labels, rate, kind or class map (the message names it).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"labels must be a 1-d integer array; got {labels.dtype} of shape {labels.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"rate must be a number in [0, 1); got {rate!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    mapping = check_class_map(class_map, int(num_classes))
    if mapping and kind != "asymmetric":
        raise ValueError(f"class_map applies only to kind 'asymmetric'; got kind {kind!r}")
    clean = labels.astype(np.int64)
    noisy, flipped = clean.copy(), np.zeros(clean.shape, dtype=bool)
    if rate == 0:
        return noisy, flipped  # no generator is even created
    if kind == "asymmetric":
        if not mapping:
            raise ValueError("kind 'asymmetric' needs a class_map (source class -> target class)")
        eligible = np.flatnonzero(np.isin(clean, np.fromiter(mapping, dtype=np.int64)))
    else:
        eligible = np.arange(clean.size, dtype=np.int64)
    n_flip = math.floor(rate * eligible.size + 0.5)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=n_flip, replace=False)) if n_flip else eligible[:0]
    y = clean[chosen]
    if kind == "symmetric":
        new = (y + rng.integers(1, num_classes, size=y.size)) % num_classes  # uniform over the C-1 others
    elif kind == "pair":
        new = (y + 1) % num_classes
    else:
        lookup = np.arange(num_classes, dtype=np.int64)
        lookup[list(mapping)] = list(mapping.values())
        new = lookup[y]
    noisy[chosen] = new
    flipped[chosen] = True
    return noisy, flipped


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
    """The training split's labels before and after noise, as ``label_noise.npz`` stores them.

    Attributes:
        index: (N,) int64 sample ids of the train split (its stored order).
        clean, noisy: (N,) int64 labels; flipped: (N,) bool.
        info: JSON-ready summary for the manifest (configured and realised rates, counts).
    """

    index: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray
    flipped: np.ndarray
    info: dict

    def arrays(self) -> dict[str, np.ndarray]:
        return {"index": self.index, "clean": self.clean, "noisy": self.noisy, "flipped": self.flipped}


def noisy_train_split(bundle, rate: float, kind: str = "symmetric", seed: int = 0,
                      class_map: Mapping[Any, Any] | None = None):
    """``bundle`` with noisy training labels (val and test untouched) and the :class:`NoisyLabels` record.

    The noise is drawn over the train split in its stored order (ascending sample id), so it
    depends on the noise settings and on which samples are in the train split (``val_size``,
    ``val_seed``, ``train_subset``), never on a run seed or an objective.
    """
    import torch

    train = bundle.train
    clean = train.y.cpu().numpy().astype(np.int64)
    noisy, flipped = apply_label_noise(clean, bundle.num_classes, rate, kind, seed, class_map)
    eligible = (np.isin(clean, np.fromiter(check_class_map(class_map), dtype=np.int64))
                if kind == "asymmetric" else np.ones(clean.shape, bool))
    n, n_flip, n_eligible = int(clean.size), int(flipped.sum()), int(eligible.sum())
    info = {"kind": kind, "rate": float(rate), "seed": int(seed),
            "class_map": {str(k): v for k, v in check_class_map(class_map).items()},
            "train_size": n, "eligible": n_eligible, "flipped": n_flip,
            "realised_rate": n_flip / n if n else 0.0,
            "realised_rate_eligible": n_flip / n_eligible if n_eligible else 0.0}
    record = NoisyLabels(index=train.index.cpu().numpy().astype(np.int64), clean=clean, noisy=noisy,
                         flipped=flipped, info=info)
    new_train = dataclasses.replace(train, y=torch.from_numpy(noisy).to(train.y.device))
    return dataclasses.replace(bundle, train=new_train), record
