"""Tests for ban_analysis.stats against hand computations, explicit enumeration and statsmodels."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from ban_analysis import stats
from ban_analysis.stats import paired as paired_mod

multitest = pytest.importorskip("statsmodels.stats.multitest")
weightstats = pytest.importorskip("statsmodels.stats.weightstats")
sm_power = pytest.importorskip("statsmodels.stats.power")


def rng0():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- paired_comparison


def test_hand_checked_comparison():
    # d = [1, -2, 3, 4, 5, 6]: every quantity below is computed by hand.
    b = np.array([10.0, 12.0, 10.0, 10.0, 10.0, 10.0])
    a = b + np.array([1.0, -2.0, 3.0, 4.0, 5.0, 6.0])
    r = stats.paired_comparison(a, b, rng=rng0(), n_boot=2000)
    d = a - b
    assert r.n == 6
    assert r.mean_diff == pytest.approx(17 / 6)
    sd = math.sqrt(sum((x - 17 / 6) ** 2 for x in d) / 5)
    assert r.sd_diff == pytest.approx(sd)
    assert r.d_z == pytest.approx((17 / 6) / sd)
    # t = mean / (sd / sqrt(n)) on 5 df, two-sided.
    t = (17 / 6) / (sd / math.sqrt(6))
    assert r.p_ttest == pytest.approx(2 * scipy.stats.t.sf(t, 5))
    # Wilcoxon: ranks 1..6, negative rank sum W- = 2; subsets of {1..6} with sum <= 2: {}, {1}, {2}.
    assert r.wilcoxon_method == "exact"
    assert r.p_wilcoxon == pytest.approx(2 * 3 / 64)
    # Sign flips: flipping a subset with sum F gives 17 - 2F; |17 - 2F| >= 17 iff F <= 0 or
    # F >= 17. F <= 0: {}, {-2}, {1, -2}; F >= 17: their complements. So p = 6 / 64.
    assert r.permutation_method == "exact" and r.n_permutations == 64
    assert r.p_permutation == pytest.approx(6 / 64)
    assert r.a12 == pytest.approx(5 / 6)
    assert r.n_zero_diffs == 0
    assert r.ci_method == "BCa"
    assert r.ci_low < r.mean_diff < r.ci_high


def _enumerated_sign_flip_p(d):
    # Independent of the library: itertools over sign tuples, fractions via integer sums.
    total = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= total - 1e-9
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exact_sign_flip_matches_enumeration(seed):
    gen = np.random.default_rng(seed)
    b = gen.normal(size=9)
    a = b + gen.normal(0.4, 1.0, size=9)
    r = stats.paired_comparison(a, b, rng=rng0(), n_boot=500)
    assert r.permutation_method == "exact"
    assert r.p_permutation == pytest.approx(_enumerated_sign_flip_p(list(a - b)))


def test_sign_flip_with_ties_and_roundoff():
    # Accuracies as counts / 10000: the differences are +-10 / 10000 exactly, but in binary
    # (8009 + 10) / 1e4 - 8009 / 1e4 != (8000 + 10) / 1e4 - 8000 / 1e4, which must not split ties.
    kb = np.array([8009, 8000, 8130, 8001, 8251, 8002, 8382, 8003])
    units = np.array([1, 1, -1, 1, 1, 0, 1, 1])
    a, b = (kb + 10 * units) / 10000, kb / 10000
    assert np.unique(np.abs(a - b)[units != 0]).size > 1  # the roundoff is really there
    r = stats.paired_comparison(a, b, rng=rng0(), n_boot=500)
    # Exact arithmetic: |sum| = 5 of 7 units; the zero difference carries no weight.
    assert r.p_permutation == pytest.approx(_enumerated_sign_flip_p(list(units)))
    assert r.n_zero_diffs == 1
    assert r.a12 == pytest.approx((6 + 0.5) / 8)
    # Wilcoxon with zeros dropped and 7 tied |d|: all midranks 4, W+ = 6 * 4 of 7 * 4; the null
    # distribution of W+ / 4 is Binomial(7, 1/2), so p = 2 * P(X >= 6).
    assert r.wilcoxon_method == "exact_conditional"
    assert r.p_wilcoxon == pytest.approx(2 * (7 + 1) / 128)
    # A zero that roundoff turned into 5.6e-17 is still a tie (counts half in A12).
    r = stats.paired_comparison([0.1 + 0.2, 0.5, 0.6], [0.3, 0.4, 0.7], rng=rng0(), n_boot=500)
    assert r.n_zero_diffs == 1 and r.a12 == pytest.approx(1.5 / 3)


def _enumerated_wilcoxon_p(d):
    d = [x for x in d if x != 0]
    ranks = scipy.stats.rankdata(np.abs(d))
    observed = sum(r for r, x in zip(ranks, d) if x > 0)
    values = [sum(r for r, s in zip(ranks, signs) if s > 0)
              for signs in itertools.product((1, -1), repeat=len(d))]
    lo = np.mean([v <= observed + 1e-9 for v in values])
    hi = np.mean([v >= observed - 1e-9 for v in values])
    return min(1.0, 2 * min(lo, hi))


def test_wilcoxon_conditional_matches_enumeration_with_ties():
    d = np.array([0.3, -0.1, 0.3, 0.2, 0.0, -0.3, 0.5, 0.2, 0.1, 0.4])
    r = stats.paired_comparison(d, np.zeros_like(d), rng=rng0(), n_boot=500)
    assert r.wilcoxon_method == "exact_conditional"
    assert r.p_wilcoxon == pytest.approx(_enumerated_wilcoxon_p(list(d)))


@pytest.mark.parametrize("seed", range(4))
def test_wilcoxon_dp_matches_scipy_exact_without_ties(seed):
    d = np.random.default_rng(seed).normal(0.3, 1.0, size=12)
    assert paired_mod._wilcoxon_exact_conditional(d) == pytest.approx(
        scipy.stats.wilcoxon(d, method="exact").pvalue)
    r = stats.paired_comparison(d, np.zeros_like(d), rng=rng0(), n_boot=500)
    assert r.wilcoxon_method == "exact"
    assert r.p_wilcoxon == pytest.approx(scipy.stats.wilcoxon(d, method="exact").pvalue)
    assert r.p_ttest == pytest.approx(scipy.stats.ttest_rel(d, np.zeros_like(d)).pvalue)


def test_monte_carlo_permutation_for_many_seeds():
    gen = np.random.default_rng(5)
    b = gen.normal(size=20)
    a = b + gen.normal(0.3, 1.0, size=20)
    r1 = stats.paired_comparison(a, b, rng=np.random.default_rng(1), n_boot=500, n_permutations=20000)
    r2 = stats.paired_comparison(a, b, rng=np.random.default_rng(1), n_boot=500, n_permutations=20000)
    assert r1.permutation_method == "monte_carlo" and r1.n_permutations == 20000
    assert r1 == r2  # same generator state -> same numbers
    # scipy's own sign-flip test (exact would need 2^20 patterns; use its Monte Carlo with a bound).
    ref = scipy.stats.permutation_test((a - b,), np.mean, permutation_type="samples",
                                       n_resamples=20000, rng=np.random.default_rng(2)).pvalue
    assert r1.p_permutation == pytest.approx(ref, abs=0.02)
    assert r1.p_permutation > 0
    # Nothing as extreme as 20 positive differences in 1000 draws: p = 1 / 1001, never 0.
    r = stats.paired_comparison(np.arange(1.0, 21.0), np.zeros(20), rng=rng0(), n_boot=500,
                                n_permutations=1000)
    assert r.p_permutation == pytest.approx(1 / 1001)


def test_degenerate_differences():
    r = stats.paired_comparison(np.ones(5), np.ones(5), rng=rng0(), n_boot=500)
    assert (r.ci_low, r.ci_high, r.ci_method) == (0.0, 0.0, "percentile")
    assert r.p_ttest == 1.0 and r.p_wilcoxon == 1.0 and r.p_permutation == 1.0
    assert r.d_z == 0.0 and r.a12 == 0.5 and r.wilcoxon_method == "all_zero"
    r = stats.paired_comparison(np.full(6, 0.93), np.full(6, 0.92), rng=rng0(), n_boot=500)
    assert r.ci_method == "percentile" and r.ci_low == pytest.approx(0.01) == r.ci_high
    assert r.p_ttest == 0.0 and r.d_z == math.inf and r.a12 == 1.0
    assert r.p_permutation == pytest.approx(2 / 64) and r.p_wilcoxon == pytest.approx(2 / 64)


def test_bootstrap_ci_coverage():
    # 600 simulated studies of 10 seeds. A 95% BCa interval at n = 10 really covers ~0.90
    # (measured 0.89-0.91 over 3 x 600 studies): bootstrap intervals are too narrow for tiny n.
    # The band [0.86, 0.95] (binomial sd 0.012) catches a broken interval, not that known bias.
    gen = np.random.default_rng(11)
    hits = 0
    for _ in range(600):
        d = gen.normal(0.2, 1.0, size=10)
        r = stats.paired_comparison(d, np.zeros(10), rng=gen, n_boot=1000)
        hits += r.ci_low <= 0.2 <= r.ci_high
    assert 0.86 <= hits / 600 <= 0.95


# ----------------------------------------------------------------------------- holm / tost


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06.
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])
    assert stats.holm([0.2])[0] == 0.2


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_statsmodels(seed):
    gen = np.random.default_rng(seed)
    p = gen.uniform(0, 0.2, size=7) ** gen.uniform(0.5, 2.0)
    p[2] = p[5]  # a tie
    ours = stats.holm(p)
    np.testing.assert_allclose(ours, multitest.multipletests(p, method="holm")[1], rtol=1e-12)
    assert np.all(ours >= p) and np.all(ours <= 1)
    order = np.argsort(p)
    assert np.all(np.diff(ours[order]) >= 0)


@pytest.mark.parametrize("seed", range(5))
def test_tost_matches_statsmodels(seed):
    gen = np.random.default_rng(seed)
    b = gen.normal(0.9, 0.01, size=10)
    a = b + gen.normal(0.001 * seed, 0.003, size=10)
    margin = 0.005
    expected = weightstats.ttost_paired(a, b, -margin, margin)[0]
    assert stats.tost_paired(a, b, margin) == pytest.approx(expected, rel=1e-9)


def test_tost_behaviour():
    gen = np.random.default_rng(3)
    b = gen.normal(size=30)
    same = b + gen.normal(0, 0.01, size=30)
    assert stats.tost_paired(same, b, 0.05) < 0.001  # clearly equivalent
    assert stats.tost_paired(b + 1.0, b + gen.normal(0, 0.01, size=30), 0.05) > 0.99  # clearly not
    assert stats.tost_paired(np.full(4, 2.0), np.full(4, 1.99), 0.05) == 0.0
    assert stats.tost_paired(np.full(4, 2.0), np.full(4, 1.9), 0.05) == 1.0


# ----------------------------------------------------------------------------- families, power


def _null_family_rejection_rate(gen, n_studies, shared_reference):
    # scores (studies, seeds, 4): column 0 is the reference (BAN), 1..3 are probes; a per-seed
    # offset shared by all columns mimics a shared teacher and cancels in the pairing.
    n_seeds = 10
    seed_offset = gen.normal(size=(n_studies, n_seeds, 1))
    if shared_reference:  # BAN vs each of 3 probes: positively correlated tests
        scores = gen.normal(size=(n_studies, n_seeds, 4)) + seed_offset
        a, b = scores[..., [0, 0, 0]], scores[..., 1:]
    else:  # three disjoint pairs: independent tests
        a = gen.normal(size=(n_studies, n_seeds, 3)) + seed_offset
        b = gen.normal(size=(n_studies, n_seeds, 3)) + seed_offset
    p = scipy.stats.ttest_rel(a, b, axis=1).pvalue  # (studies, 3)
    return np.mean([np.any(stats.holm(row) < 0.05) for row in p])


@pytest.mark.parametrize("shared_reference", [True, False])
def test_family_false_positive_rate_under_null(shared_reference):
    rate = _null_family_rejection_rate(np.random.default_rng(2024), 4000, shared_reference)
    assert 0.03 <= rate <= 0.07


def test_planted_large_effect_is_detected():
    gen = np.random.default_rng(7)
    n = 10
    base = gen.normal(0.9, 0.01, size=n)
    sd = 0.002
    family = {
        "planted": (base + gen.normal(2 * sd, sd, size=n), base),  # true d_z = 2
        "null_1": (base + gen.normal(0, sd, size=n), base),
        "null_2": (base + gen.normal(0, sd, size=n), base),
    }
    fam = stats.family_test(family, rng=np.random.default_rng(0), n_boot=1000)
    comp, p_holm = fam["planted"]
    assert p_holm < 0.01
    assert comp.ci_low > 0 and comp.d_z > 1
    np.testing.assert_allclose(fam.p_holm, stats.holm([c.p_ttest for c in fam.comparisons]))
    # Permutation-based family: the same planted effect clears Holm at 0.05 too.
    fam_perm = stats.family_test(family, rng=np.random.default_rng(0), p_field="p_permutation",
                                 n_boot=1000)
    assert fam_perm["planted"][1] < 0.05


def test_min_detectable_effect_against_monte_carlo_and_statsmodels():
    n, sd = 10, 0.0015
    mde = stats.min_detectable_effect(sd, n)
    # statsmodels solves the same noncentral-t equation for d_z; a paired design with n = 10 detects d_z ~ 1 at 80% power.
    dz = sm_power.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert mde / sd == pytest.approx(dz, rel=1e-4)
    # The normal approximation would be too small by ~11%: make sure we did not use it.
    assert mde > 1.05 * (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)) * sd / math.sqrt(n)
    gen = np.random.default_rng(99)
    d = gen.normal(mde, sd, size=(20000, n))
    power = np.mean(scipy.stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
    assert power == pytest.approx(0.8, abs=0.015)  # Monte Carlo sd 0.003
    assert stats.paired_t_power(mde, sd, n) == pytest.approx(0.8)
    assert stats.min_detectable_effect(sd, 40) < mde  # more seeds, smaller detectable effect


# ----------------------------------------------------------------------------- ratio, means, A12


def test_gain_fraction_estimate_and_joint_resampling():
    gen = np.random.default_rng(4)
    ref = gen.uniform(0.5, 3.0, size=12)  # gains vary a lot across seeds...
    probe = 0.5 * ref + gen.normal(0, 0.01, size=12)  # ...but the probe tracks them within seeds
    est, low, high = stats.gain_fraction(probe, ref, rng=rng0(), n_boot=2000)
    assert est == pytest.approx(probe.mean() / ref.mean())
    assert low < est < high
    # Joint resampling keeps the ratio near 0.5; resampling probe and ref independently would
    # give an interval roughly 20x wider (the spread of mean(ref)).
    assert high - low < 0.03
    idx = np.random.default_rng(1).integers(0, 12, size=(2000, 2, 12))
    independent = probe[idx[:, 0]].mean(1) / ref[idx[:, 1]].mean(1)
    assert np.subtract(*np.percentile(independent, [97.5, 2.5])) > 5 * (high - low)


def test_gain_fraction_constant_and_unbounded():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    r = stats.gain_fraction(0.25 * ref, ref, rng=rng0(), n_boot=500)
    assert tuple(r) == pytest.approx((0.25,) * 3)
    gen = np.random.default_rng(8)
    noisy_ref = gen.normal(0.0, 1.0, size=10) - 0.05  # reference gain indistinguishable from 0
    r = stats.gain_fraction(gen.normal(size=10), noisy_ref, rng=rng0(), n_boot=1000)
    assert (r.ci_low, r.ci_high) == (-math.inf, math.inf) and np.isfinite(r.estimate)
    r = stats.gain_fraction([1.0, 2.0], [1.0, -1.0], rng=rng0(), n_boot=500)
    assert math.isnan(r.estimate) and r.ci_low == -math.inf


def test_mean_ci():
    gen = np.random.default_rng(6)
    x = gen.normal(size=(10, 3))
    x[:, 2] = 0.7  # a constant column: degenerate, CI is the point
    mean, low, high = stats.mean_ci(x, rng=rng0(), n_boot=2000)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    assert mean.shape == low.shape == high.shape == (3,)
    assert np.all(low[:2] < mean[:2]) and np.all(mean[:2] < high[:2])
    assert low[2] == high[2] == pytest.approx(0.7)
    # Width close to a t interval's (BCa vs t differ by a few tens of percent at n = 10).
    t_half = scipy.stats.t.ppf(0.975, 9) * x[:, :2].std(axis=0, ddof=1) / math.sqrt(10)
    np.testing.assert_allclose((high - low)[:2], 2 * t_half, rtol=0.35)
    m1, l1, h1 = stats.mean_ci(x[:, 0], rng=rng0(), n_boot=2000)
    assert isinstance(m1, float) and (l1, h1) == pytest.approx((low[0], high[0]))


def test_probability_of_improvement_matrix_by_hand():
    scores = np.array([[0.9, 0.8, 0.9],
                       [0.7, 0.8, 0.6],
                       [0.5, 0.4, 0.5],
                       [0.6, 0.6, 0.1]])
    m = stats.probability_of_improvement_matrix(scores)
    # col0 vs col1: wins seeds 0, 2; loses 1; ties 3 -> (2 + 0.5) / 4.
    assert m[0, 1] == pytest.approx(2.5 / 4)
    # col0 vs col2: ties 0, 2; wins 1, 3 -> (2 + 1) / 4.
    assert m[0, 2] == pytest.approx(3 / 4)
    np.testing.assert_allclose(m + m.T, np.ones((3, 3)))
    np.testing.assert_allclose(np.diag(m), 0.5)
    r = stats.paired_comparison(scores[:, 0], scores[:, 1], rng=rng0(), n_boot=500)
    assert r.a12 == pytest.approx(m[0, 1])


# ----------------------------------------------------------------------------- bad inputs


GOOD = np.arange(5.0)


@pytest.mark.parametrize("call", [
    lambda: stats.paired_comparison(GOOD, GOOD[:4], rng0()),
    lambda: stats.paired_comparison([1.0], [2.0], rng0()),
    lambda: stats.paired_comparison(GOOD, np.r_[GOOD[:4], np.nan], rng0()),
    lambda: stats.paired_comparison(GOOD, np.r_[GOOD[:4], np.inf], rng0()),
    lambda: stats.paired_comparison(np.ones((5, 2)), np.ones((5, 2)), rng0()),
    lambda: stats.paired_comparison(GOOD, GOOD, None),
    lambda: stats.paired_comparison(GOOD, GOOD, 0),
    lambda: stats.paired_comparison(GOOD, GOOD, rng0(), confidence=1.5),
    lambda: stats.paired_comparison(GOOD, GOOD, rng0(), n_boot=10),
    lambda: stats.holm([]),
    lambda: stats.holm([0.1, 1.2]),
    lambda: stats.holm([0.1, np.nan]),
    lambda: stats.holm([[0.1, 0.2]]),
    lambda: stats.tost_paired(GOOD, GOOD, 0.0),
    lambda: stats.tost_paired(GOOD, GOOD, -1.0),
    lambda: stats.tost_paired(GOOD, GOOD[:3], 0.1),
    lambda: stats.gain_fraction(GOOD, GOOD[:3], rng0()),
    lambda: stats.gain_fraction(GOOD, GOOD, np.random.RandomState(0)),
    lambda: stats.mean_ci(np.ones(1), rng0()),
    lambda: stats.mean_ci(np.ones((2, 2, 2)), rng0()),
    lambda: stats.probability_of_improvement_matrix(GOOD),
    lambda: stats.min_detectable_effect(0.0, 10),
    lambda: stats.min_detectable_effect(1.0, 1),
    lambda: stats.min_detectable_effect(1.0, 10, alpha=0.0),
    lambda: stats.min_detectable_effect(1.0, 10, power=0.01),
    lambda: stats.family_test({"x": (GOOD, GOOD)}, rng0(), p_field="p_foo"),
    lambda: stats.family_test({}, rng0()),
])
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("n", [3, 4, 5])
def test_min_detectable_effect_with_few_seeds_and_small_alpha(n):
    """scipy's nct.cdf gives NaN far in the tail at few seeds and alpha/4; the power must not."""
    mde = stats.min_detectable_effect(0.002, n, alpha=0.0125)
    assert np.isfinite(mde) and mde > 0
    assert stats.paired_t_power(mde, 0.002, n, alpha=0.0125) == pytest.approx(0.8, abs=1e-6)
    assert stats.paired_t_power(-mde, 0.002, n, alpha=0.0125) == pytest.approx(0.8, abs=1e-6)
