"""Intervals and effect summaries across seeds: the gain fraction, a mean's bootstrap CI, and the
within-seed probability of improvement. Pure functions of arrays shaped (seeds, ...), explicit
numpy Generators; split from ``paired.py`` (the paired tests) to keep both short.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from ban_analysis.stats.paired import (
    _as_pair, _as_seeds, _bootstrap_ci, _check_confidence, _check_count, _check_rng, _mean_ci_1d, _tidy_diff,
)

logger = logging.getLogger("ban_analysis.stats.paired")  # the name users filter on


class GainFraction(NamedTuple):
    """mean(probe_gain) / mean(ref_gain) with its bootstrap CI; unpacks as (estimate, low, high)."""

    estimate: float
    ci_low: float
    ci_high: float


def _ratio_of_means(probe, ref, axis=-1):
    return np.mean(probe, axis=axis) / np.mean(ref, axis=axis)


def gain_fraction(probe_gain, ref_gain, rng: np.random.Generator, confidence: float = 0.95,
                  n_boot: int = 10000) -> GainFraction:
    """Fraction of the reference gain a probe recovers: mean(probe_gain) / mean(ref_gain).

    The CI resamples seeds jointly (paired bootstrap; BCa, percentile if BCa is degenerate).
    A ratio's CI is bounded only if the denominator is bounded away from 0 (Fieller). So when the
    bootstrap CI of mean(ref_gain) contains 0, the honest interval is unbounded and
    (-inf, inf) is returned (logged at INFO); the estimate is NaN if mean(ref_gain) == 0 exactly.
    Readers should then state "BAN's gain is not distinguishable from 0, so no fraction of it can
    be estimated" rather than quote a number.

    Args:
        probe_gain, ref_gain: (n_seeds,) per-seed gains (e.g. probe - teacher, BAN - teacher).
        rng: generator for both bootstraps (the reference's CI, then the ratio's).
        confidence: CI level in (0, 1).
        n_boot: bootstrap resamples (>= 100).
    """
    probe, ref = _as_pair(probe_gain, ref_gain, names=("probe_gain", "ref_gain"))
    _check_rng(rng)
    confidence = _check_confidence(confidence)
    n_boot = _check_count(n_boot, "n_boot", 100)
    ref_mean = float(np.mean(ref))
    estimate = float(np.mean(probe)) / ref_mean if ref_mean != 0 else math.nan
    ref_low, ref_high, _ = _mean_ci_1d(ref, rng, confidence, n_boot)
    if ref_low <= 0.0 <= ref_high:
        logger.info("gain_fraction: CI of mean(ref_gain) [%g, %g] contains 0; ratio CI is unbounded",
                    ref_low, ref_high)
        return GainFraction(estimate, -math.inf, math.inf)
    if np.all(ref != 0) and np.ptp(probe / ref) == 0:  # constant ratio: every resample gives it
        return GainFraction(estimate, estimate, estimate)
    low, high, method = _bootstrap_ci((probe, ref), _ratio_of_means, rng, confidence, n_boot,
                                      paired=True)
    logger.debug("gain_fraction CI by %s: [%g, %g]", method, low, high)
    return GainFraction(estimate, low, high)


def mean_ci(x, rng: np.random.Generator, confidence: float = 0.95,
            n_boot: int = 10000) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """Per-column mean with a bootstrap CI over seeds (BCa, percentile if degenerate).

    Args:
        x: (seeds,) or (seeds, k) scores, seeds >= 2.
        rng: generator, consumed column by column.

    Returns:
        (mean, low, high): floats for 1-D input, (k,) arrays for 2-D input.
    """
    arr = _as_seeds(x, "x", ndim=(1, 2))
    _check_rng(rng)
    confidence = _check_confidence(confidence)
    n_boot = _check_count(n_boot, "n_boot", 100)
    cols = arr[:, None] if arr.ndim == 1 else arr  # (seeds, k)
    ci = np.array([_mean_ci_1d(cols[:, j], rng, confidence, n_boot)[:2] for j in range(cols.shape[1])])
    mean = cols.mean(axis=0)
    if arr.ndim == 1:
        return float(mean[0]), float(ci[0, 0]), float(ci[0, 1])
    return mean, ci[:, 0], ci[:, 1]


def probability_of_improvement_matrix(scores) -> np.ndarray:
    """Within-seed probability of improvement between all column pairs.

    Args:
        scores: (seeds, k) paired scores, seeds >= 2, one column per method.

    Returns:
        (k, k) matrix M with M[i, j] = a12 of column i over column j (fraction of seeds where
        i beats j, ties count half); M + M.T = 1 and the diagonal is 0.5.
    """
    s = _as_seeds(scores, "scores", ndim=(2,))
    k = s.shape[1]
    out = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            tidy = _tidy_diff(s[:, i], s[:, j])
            out[i, j] = np.mean(tidy > 0) + 0.5 * np.mean(tidy == 0)
    return out
