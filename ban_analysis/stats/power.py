"""Power of the paired t-test across seeds: power for a given effect, minimum detectable effect.

Exact noncentral-t computations, used to plan how many seeds a study needs and to report
what a study could have detected. Re-exported by :mod:`ban_analysis.stats`, where the other
statistics live; split from it to keep that file short.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
from scipy.optimize import brentq


def _check_power_args(n, alpha):
    # The same test and message as stats._check_count(n, "n", 2); not imported from stats,
    # which re-exports this module's functions.
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    n = int(n)
    if not (isinstance(alpha, (int, float, np.floating)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return n, float(alpha)


def paired_t_power(effect: float, sd_diff: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test for true mean difference ``effect`` (noncentral t).

    Args:
        effect: true mean paired difference (units of the scores).
        sd_diff: standard deviation of the paired differences (> 0).
        n: number of paired seeds (>= 2).
        alpha: two-sided significance level.
    """
    n, alpha = _check_power_args(n, alpha)
    if not (np.isfinite(sd_diff) and sd_diff > 0) or not np.isfinite(effect):
        raise ValueError(f"sd_diff must be finite > 0 and effect finite, got {sd_diff!r}, {effect!r}")
    df = n - 1
    crit = scipy.stats.t.ppf(1 - alpha / 2, df)
    nc = abs(effect) / sd_diff * math.sqrt(n)  # power is symmetric in the sign of the effect
    upper = scipy.stats.nct.sf(crit, df, nc)
    # scipy's nct.cdf returns NaN far in the tail (large nc, few df: n=4, alpha=0.0125 hit it);
    # that tail is then below 1e-12, so it counts as 0
    lower = scipy.stats.nct.cdf(-crit, df, nc)
    lower = float(lower) if np.isfinite(lower) else 0.0
    upper = float(upper) if np.isfinite(upper) else 1.0
    return min(1.0, upper + lower)


def min_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean paired difference a two-sided paired t-test detects with ``power``.

    Solves paired_t_power(delta) = power on the exact noncentral t distribution (the normal
    approximation (z_{1-a/2} + z_power) sd / sqrt(n) is ~11% too optimistic at n = 10).

    Args:
        sd_diff: sd of the paired differences (> 0), e.g. from a pilot or the study itself.
        n: number of paired seeds (>= 2).
        alpha: two-sided significance level (use alpha / m for a Holm family of m as a bound).
        power: target power in (alpha, 1).

    Returns:
        The minimum detectable effect, in the units of sd_diff (d_z = 1 means one sd_diff).
    """
    n, alpha = _check_power_args(n, alpha)
    if not (np.isfinite(sd_diff) and sd_diff > 0):
        raise ValueError(f"sd_diff must be finite and > 0, got {sd_diff!r}")
    if not (isinstance(power, (int, float, np.floating)) and alpha < power < 1):
        raise ValueError(f"power must lie in (alpha, 1) = ({alpha}, 1), got {power!r}")

    def gap(dz: float) -> float:
        return paired_t_power(dz, 1.0, n, alpha) - power

    high = 1.0
    while gap(high) < 0:  # power rises monotonically in d_z; bracket the root
        high *= 2.0
    return float(brentq(gap, 0.0, high, xtol=1e-10)) * float(sd_diff)
