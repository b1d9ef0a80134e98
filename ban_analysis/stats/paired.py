"""Statistics across seeds: paired tests, bootstrap intervals, Holm, TOST, effect sizes, power.

The power functions live in :mod:`ban_analysis.stats.power` and are importable from here too.

Pure functions over arrays shaped ``(seeds,)`` or ``(seeds, k)`` (rliable style). Anything random
takes an explicit ``np.random.Generator``; nothing touches the global RNG. Results are small frozen
dataclasses (or NamedTuples where a plain tuple is part of the contract) that the report renders.

Conventions used throughout (the statistical rules in the README, "Statistics across seeds"):
- Pairing is by seed: ``a[i]`` and ``b[i]`` share seed ``i``; every comparison is about ``d = a - b``.
- Roundoff in ``a - b`` (about 1e-16 relative) must not split ties or create fake non-zero
  differences, so rank-, sign- and tie-based quantities (Wilcoxon, sign-flip test, A12, degeneracy
  checks) use ``d`` rounded to 1e-10 of the data scale (``_tidy_diff``). Accuracies differ by
  >= 1e-4, far above that grid. The t-test, d_z and the bootstrap use the raw differences.
- All p-values are two-sided.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import warnings
from typing import Mapping

import numpy as np
import scipy.stats


logger = logging.getLogger(__name__)

# Exact enumeration of all 2^n sign flips costs 2^n * n flops: 16 seeds -> 65536 x 16, ~1 ms.
EXACT_SIGN_FLIP_MAX_N = 16
_TIDY_DECIMALS = 10
# scipy >= 1.15 calls bootstrap's generator `rng`; older releases (>= 1.11 allowed) `random_state`.
_BOOTSTRAP_RNG_KEY = ("rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters
                      else "random_state")


# ----------------------------------------------------------------------------- validation


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a np.random.Generator (e.g. np.random.default_rng(0)), "
                         f"got {type(rng).__name__}")
    return rng


def _as_seeds(x, name: str, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    """Float array with ndim in ``ndim``, at least 2 seeds (axis 0), all finite."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in ndim:
        raise ValueError(f"{name} must have ndim in {ndim} (axis 0 = seeds), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 seeds along axis 0, got shape {arr.shape}")
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be non-empty and finite (no NaN/inf)")
    return arr


def _as_pair(a, b, names=("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a = _as_seeds(a, names[0])
    b = _as_seeds(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"paired inputs need equal shapes, got {names[0]} {a.shape} "
                         f"and {names[1]} {b.shape}")
    return a, b


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float, np.floating)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _tidy_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` rounded to 1e-10 of the data scale, so roundoff neither splits ties nor fakes zeros."""
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), np.finfo(np.float64).tiny)
    return np.round((a - b) / scale, _TIDY_DECIMALS) * scale


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap(data: tuple, statistic, rng, confidence, n_boot, method, paired=False):
    kwargs = dict(n_resamples=n_boot, confidence_level=confidence, method=method, vectorized=True,
                  paired=paired, axis=0)
    kwargs[_BOOTSTRAP_RNG_KEY] = rng
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # BCa on degenerate data warns and returns NaN; we detect that and fall back below.
        warnings.simplefilter("ignore")
        ci = scipy.stats.bootstrap(data, statistic, **kwargs).confidence_interval
    return float(ci.low), float(ci.high)


def _bootstrap_ci(data: tuple, statistic, rng, confidence, n_boot,
                  paired=False) -> tuple[float, float, str]:
    """BCa interval, percentile if BCa is degenerate (non-finite ends). Returns (low, high, method)."""
    low, high = _bootstrap(data, statistic, rng, confidence, n_boot, "BCa", paired)
    if np.isfinite(low) and np.isfinite(high):
        return low, high, "BCa"
    logger.debug("BCa interval degenerate (%s, %s); using the percentile bootstrap", low, high)
    low, high = _bootstrap(data, statistic, rng, confidence, n_boot, "percentile", paired)
    return low, high, "percentile"


def _mean_stat(x, axis=-1):
    return np.mean(x, axis=axis)


def _mean_ci_1d(x: np.ndarray, rng, confidence, n_boot) -> tuple[float, float, str]:
    if np.ptp(x) == 0:
        # Every resample has the same mean: the percentile interval is the point itself (BCa is 0/0).
        return float(x[0]), float(x[0]), "percentile"
    return _bootstrap_ci((x,), _mean_stat, rng, confidence, n_boot)


# ----------------------------------------------------------------------------- exact tests


def _sign_flip_p(d: np.ndarray, rng, n_permutations: int) -> tuple[float, str, int]:
    """Two-sided sign-flip permutation p-value for mean(d) = 0. Returns (p, method, n_patterns)."""
    n = d.size
    # Tidy differences lie on a grid of q = 1e-10 * scale, so distinct sums differ by >= q.
    tol = 0.5 * 10.0 ** (-_TIDY_DECIMALS) * max(float(np.max(np.abs(d))), np.finfo(np.float64).tiny)
    observed = abs(float(np.sum(d)))
    if n <= EXACT_SIGN_FLIP_MAX_N:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n): every sign pattern once
        sums = (1 - 2 * bits) @ d
        return float(np.mean(np.abs(sums) >= observed - tol)), "exact", 2**n
    count, done = 0, 0
    while done < n_permutations:  # chunks bound memory at ~4 MB for any n
        m = min(n_permutations - done, max(1, 500_000 // n))
        signs = 1 - 2 * rng.integers(0, 2, size=(m, n))
        count += int(np.sum(np.abs(signs @ d) >= observed - tol))
        done += m
    # (1 + count) / (1 + N) counts the observed pattern: a valid p-value that is never 0.
    return (1 + count) / (1 + n_permutations), "monte_carlo", n_permutations


def _wilcoxon_exact_conditional(d: np.ndarray) -> float:
    """Exact two-sided Wilcoxon signed-rank p given the tie pattern; zeros dropped (Wilcoxon's rule).

    Midranks of |d| times 2 are integers, so the null distribution of the positive-rank sum is a
    sum of independent {0, w_i} terms, counted exactly by dynamic programming over integer sums.
    """
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    weights = np.rint(2 * scipy.stats.rankdata(np.abs(d))).astype(np.int64)
    counts = np.zeros(int(weights.sum()) + 1)
    counts[0] = 1.0
    for w in weights:  # counts[s] = number of sign patterns with positive (doubled) rank sum s
        counts[w:] = counts[w:] + counts[:-w].copy()
    probs = counts / counts.sum()
    t_plus = int(weights[d > 0].sum())
    p = 2.0 * min(probs[: t_plus + 1].sum(), probs[t_plus:].sum())
    return float(min(1.0, p))


def _wilcoxon_p(d: np.ndarray) -> tuple[float, str]:
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 1.0, "all_zero"
    if nonzero.size == d.size and np.unique(np.abs(d)).size == d.size:
        return float(scipy.stats.wilcoxon(d, method="exact").pvalue), "exact"
    # scipy's "exact" assumes no ties/zeros; ours is exact conditional on the observed ties.
    return _wilcoxon_exact_conditional(d), "exact_conditional"


# ----------------------------------------------------------------------------- paired comparison


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of ``a`` and ``b`` over seeds, about ``d = a - b``.

    Attributes:
        n: number of paired seeds.
        mean_diff: mean(d).
        sd_diff: sd(d, ddof=1).
        ci_low, ci_high: bootstrap CI of mean(d) at ``confidence``.
        ci_method: "BCa", or "percentile" when BCa is degenerate (e.g. all differences equal).
        p_ttest: two-sided paired t-test (scipy.stats.ttest_rel). If all d are equal: 1.0 when
            they are 0, 0.0 otherwise (the limit of t -> 0 / t -> inf).
        p_wilcoxon: two-sided Wilcoxon signed-rank p; zero differences are dropped (Wilcoxon's
            rule) and ties use midranks.
        wilcoxon_method: "exact" (scipy, no ties or zeros), "exact_conditional" (exact null given
            the tie pattern, zeros dropped), or "all_zero" (p = 1).
        n_zero_diffs: number of seeds with a == b (dropped by Wilcoxon, half-counted by a12).
        p_permutation: two-sided sign-flip permutation p for mean(d) = 0.
        permutation_method: "exact" (all 2^n flips, n <= 16) or "monte_carlo" (rng).
        n_permutations: sign patterns used (2^n, or the Monte Carlo count).
        d_z: Cohen's d_z = mean(d) / sd(d, ddof=1); 0 if all d are 0, +-inf if all equal and != 0.
        a12: probability of improvement within pairs: fraction of seeds with a > b, ties count
            half (P(a > b) + 0.5 P(a == b) over paired seeds, not over all cross pairs).
        confidence: the CI's confidence level.
    """

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    ci_method: str
    p_ttest: float
    p_wilcoxon: float
    wilcoxon_method: str
    n_zero_diffs: int
    p_permutation: float
    permutation_method: str
    n_permutations: int
    d_z: float
    a12: float
    confidence: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_comparison(a, b, rng: np.random.Generator, confidence: float = 0.95, n_boot: int = 10000,
                      *, n_permutations: int = 10000) -> PairedComparison:
    """Compare paired per-seed scores ``a`` and ``b`` (about ``a - b``).

    Args:
        a, b: (n_seeds,) scores paired by seed, finite, n_seeds >= 2.
        rng: generator for the bootstrap, then (n > 16 only) the Monte Carlo sign flips.
        confidence: CI level in (0, 1).
        n_boot: bootstrap resamples (>= 100).
        n_permutations: Monte Carlo sign-flip patterns when n > 16 (>= 100).

    Returns:
        PairedComparison (see its docstring for each field's definition).
    """
    a, b = _as_pair(a, b)
    _check_rng(rng)
    confidence = _check_confidence(confidence)
    n_boot = _check_count(n_boot, "n_boot", 100)
    n_permutations = _check_count(n_permutations, "n_permutations", 100)
    d = a - b  # (n,)
    tidy = _tidy_diff(a, b)
    n = d.size
    mean_diff = float(np.mean(d))
    degenerate = np.ptp(tidy) == 0  # all differences equal: sd is 0 up to roundoff
    sd_diff = 0.0 if degenerate else float(np.std(d, ddof=1))

    if degenerate:
        low = high = mean_diff
        ci_method = "percentile"
        p_t = 1.0 if tidy[0] == 0 else 0.0
        d_z = 0.0 if tidy[0] == 0 else math.copysign(math.inf, mean_diff)
    else:
        low, high, ci_method = _bootstrap_ci((d,), _mean_stat, rng, confidence, n_boot)
        p_t = float(scipy.stats.ttest_rel(a, b).pvalue)
        d_z = mean_diff / sd_diff
    p_w, w_method = _wilcoxon_p(tidy)
    p_perm, perm_method, n_patterns = _sign_flip_p(tidy, rng, n_permutations)
    a12 = float(np.mean(tidy > 0) + 0.5 * np.mean(tidy == 0))
    return PairedComparison(
        n=n, mean_diff=mean_diff, sd_diff=sd_diff, ci_low=low, ci_high=high, ci_method=ci_method,
        p_ttest=p_t, p_wilcoxon=p_w, wilcoxon_method=w_method, n_zero_diffs=int(np.sum(tidy == 0)),
        p_permutation=p_perm, permutation_method=perm_method, n_permutations=n_patterns,
        d_z=float(d_z), a12=a12, confidence=confidence)


# ----------------------------------------------------------------------------- families


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error control under any dependence).

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)) (1-based j).

    Args:
        pvalues: (m,) p-values in [0, 1], m >= 1.

    Returns:
        (m,) adjusted p-values in input order; monotone in the raw p-values, capped at 1.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pvalues must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("pvalues must be finite and within [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted


@dataclasses.dataclass(frozen=True)
class FamilyResult:
    """A family of paired comparisons with Holm-adjusted p-values of one chosen test.

    Attributes:
        names: comparison names, in input order.
        comparisons: PairedComparison per name.
        p_field: which p-value was adjusted ("p_ttest", "p_wilcoxon" or "p_permutation").
        p_holm: Holm-adjusted p-values, same order as ``names``.
    """

    names: tuple[str, ...]
    comparisons: tuple[PairedComparison, ...]
    p_field: str
    p_holm: tuple[float, ...]

    def __getitem__(self, name: str) -> tuple[PairedComparison, float]:
        i = self.names.index(name)
        return self.comparisons[i], self.p_holm[i]


_P_FIELDS = ("p_ttest", "p_wilcoxon", "p_permutation")


def family_test(comparisons: Mapping[str, tuple], rng: np.random.Generator, *, p_field: str = "p_ttest",
                confidence: float = 0.95, n_boot: int = 10000) -> FamilyResult:
    """Run ``paired_comparison`` on each named (a, b) pair and Holm-correct one p-value across them.

    Args:
        comparisons: name -> (a, b), each (n_seeds,) paired.
        rng: shared generator, consumed in the mapping's order.
        p_field: the p-value to correct, one of "p_ttest", "p_wilcoxon", "p_permutation".
    """
    if p_field not in _P_FIELDS:
        raise ValueError(f"p_field must be one of {_P_FIELDS}, got {p_field!r}")
    if not comparisons:
        raise ValueError("comparisons must name at least one (a, b) pair")
    names = tuple(comparisons)
    results = tuple(paired_comparison(*comparisons[k], rng, confidence, n_boot) for k in names)
    adjusted = holm([getattr(r, p_field) for r in results])
    return FamilyResult(names, results, p_field, tuple(float(x) for x in adjusted))


# ----------------------------------------------------------------------------- equivalence


def tost_paired(a, b, margin: float) -> float:
    """Equivalence p-value for |mean(a - b)| < margin by two one-sided paired t-tests (TOST).

    p = max(p of H0: mean(d) <= -margin, p of H0: mean(d) >= +margin). Small p supports
    "equivalent within the margin"; the margin must be fixed before looking at the data.

    Args:
        a, b: (n_seeds,) paired scores.
        margin: equivalence margin > 0 in the units of a and b.

    Returns:
        The TOST p-value. If all differences are equal (sd 0): 0.0 when |d| < margin, else 1.0.
    """
    a, b = _as_pair(a, b)
    if not (isinstance(margin, (int, float, np.floating)) and np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
    tidy = _tidy_diff(a, b)
    d = a - b
    if np.ptp(tidy) == 0:
        return 0.0 if abs(float(np.mean(d))) < margin else 1.0
    p_low = scipy.stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_high = scipy.stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(p_low, p_high))


# ----------------------------------------------------------------------------- ratios and means
